"""glibc malloc settings for processes that move bulk data in large buffers.

Every 1 MiB frame is a fresh bytes object (read, protobuf, gRPC), in the client, the agent and the
router alike. With glibc's defaults the heap gives freed space back to the kernel as soon as 128 KiB
sit free at its top, so each new buffer page-faults its memory in again: on an rsync upload that
was a large share of the client's and the agent's CPU (docs/bench/NOTES.md). Keeping up to TRIM_THRESHOLD of
freed memory for reuse (and serving buffers below the largest gRPC message from the heap, not from
fresh mmaps) avoids it, at the price of that much retained memory. A no-op where malloc is not
glibc's.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Final

log = logging.getLogger(__name__)

#: mallopt parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
#: Buffers up to the largest gRPC message (4 MiB) come from the heap.
MMAP_THRESHOLD: Final = 4 * 1024 * 1024 + 1
#: Freed memory kept for reuse before the heap shrinks.
TRIM_THRESHOLD: Final = 64 * 1024 * 1024

_done = False


def tune_for_bulk() -> bool:
    """Apply the settings once per process; True if they took effect."""
    global _done
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    log.debug("malloc tuned for bulk transfers: %s", _done)
    return _done
