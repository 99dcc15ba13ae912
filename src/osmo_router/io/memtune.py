"""glibc malloc settings for processes that move bulk data in large buffers, and giving memory back.

Every 1 MiB frame is a fresh bytes object (read, protobuf, gRPC), in the client, the agent and the
router alike. Three settings, made once per process by `tune()`:

- **Keep freed memory while busy.** With glibc's defaults the heap gives freed space back to the
  kernel as soon as 128 KiB sit free at its top, so each new buffer page-faults its memory in
  again: on an rsync upload that was a large share of the client's and the agent's CPU.
  Up to TRIM_THRESHOLD of freed memory is kept for reuse, and buffers below the largest gRPC
  message come from the heap, not from fresh mmaps (MMAP_THRESHOLD).
- **One arena** (ARENA_MAX; MALLOC_ARENA_MAX or glibc.malloc.arena_max in GLIBC_TUNABLES, when
  set, win). glibc gives threads that allocate at once (gRPC's poller and executor
  threads beside Python's) arenas of their own, up to 8 per core. The free memory at the top of a
  thread's arena goes back only when a free() leaves more than TRIM_THRESHOLD there, and
  malloc_trim() does not shrink it: after 300 MiB of exec and forward traffic an idle router kept
  136-166 MiB (63 MiB fresh) even after malloc_trim(0), 2-3 arenas holding 8-24 MiB each of
  almost nothing in use. With a single arena, the main heap, malloc_trim(0) gives all of it back
  (router 64 MiB, agent 47-55 MiB); bulk throughput is unchanged within the noise
  (docs/bench/NOTES.md, "Memory given back when idle").
- **Give it back when idle.** The retained memory is returned by `release()` (malloc_trim(0)),
  which `trim_when_idle()` calls once the process has gone quiet after its sessions ended.

A no-op where malloc is not glibc's.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from typing import Any, Final

log = logging.getLogger(__name__)

#: mallopt parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
M_ARENA_MAX: Final = -8
#: Buffers up to the largest gRPC message (4 MiB) come from the heap.
MMAP_THRESHOLD: Final = 4 * 1024 * 1024 + 1
#: Freed memory kept for reuse before the heap shrinks (while busy; release() returns it).
TRIM_THRESHOLD: Final = 64 * 1024 * 1024
#: Malloc arenas: one, so that release() can give everything back (see the module).
ARENA_MAX: Final = 1
#: Seconds of quiet after a session ended before the memory is given back.
IDLE_DELAY: Final = 2.0
#: "Quiet": the process used at most this share of one core over IDLE_DELAY (else it waits again).
IDLE_CPU_SHARE: Final = 0.05

_done = False
_libc: Any = None
#: VmRSS (KiB) right after the last release(), 0 before the first.
_released_kib = 0


def _c_library() -> Any:
    """The C library if its malloc is glibc's (has mallopt and malloc_trim), else None."""
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(None)
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
        else:
            _libc = libc
    return _libc or None


def tune() -> bool:
    """Apply the settings once per process, before it starts threads; True if they took effect."""
    global _done
    if _done:
        return True
    libc = _c_library()
    if libc is None:
        return False
    settings = [(M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    if not _arena_max_set_by_environment():
        settings.append((M_ARENA_MAX, ARENA_MAX))
    _done = all(libc.mallopt(param, value) for param, value in settings)
    log.debug("malloc tuned for bulk transfers: %s", _done)
    return _done


def _arena_max_set_by_environment() -> bool:
    """True if the operator chose the arena count (MALLOC_ARENA_MAX, GLIBC_TUNABLES): theirs wins."""
    return "MALLOC_ARENA_MAX" in os.environ or "glibc.malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", "")


#: The name the callers used before release() existed.
tune_for_bulk = tune


def release() -> bool:
    """Give the heap's free memory back to the kernel now (malloc_trim(0)); True if some was.

    Takes a few milliseconds for a hundred MiB; the next bulk transfer page-faults what it needs
    in again, so call it when the process is idle (trim_when_idle), not per session.
    """
    libc = _c_library()
    if libc is None:
        return False
    global _released_kib
    before, started = _rss_kib(), time.perf_counter()
    released = bool(libc.malloc_trim(0))
    after = _released_kib = _rss_kib()
    log.debug(
        "memory given back: RSS %d -> %d KiB in %.1f ms",
        before,
        after,
        (time.perf_counter() - started) * 1000,
        extra={"fields": {"event": "memory_released", "rss_before_kib": before, "rss_after_kib": after}},
    )
    return released


class _IdleTrim:
    """At most one pending idle check per process."""

    def __init__(self) -> None:
        self.handle: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.cpu = 0.0

    def arm(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        if self.handle is not None and self.loop is loop:
            return  # already waiting: the check that is pending covers this call too
        self.cpu = time.process_time()
        self.loop = loop
        self.handle = loop.call_later(delay, self.check, delay)

    def check(self, delay: float) -> None:
        self.handle = None
        used = time.process_time() - self.cpu
        if used > IDLE_CPU_SHARE * delay:
            self.arm(delay)  # still moving data (a session outlived the one that ended): wait again
            return
        release()


_idle_trim = _IdleTrim()


def trim_when_idle(delay: float = IDLE_DELAY) -> None:
    """Give memory back once the process is quiet: call it whenever a session ends (cheap, debounced).

    From the call on, the process is checked every `delay` seconds; the first time it used at most
    IDLE_CPU_SHARE of a core over that window (every process thread counted), release() runs once.
    Quiet is measured, not inferred from the sessions: a port-forward's watch session stays open
    while its connections come and go, and a bulk session may outlive the short one that ended.
    Needs a running event loop; a no-op where malloc is not glibc's.
    """
    if _c_library() is None:
        return
    _idle_trim.arm(delay)


def released_kib() -> int:
    """VmRSS in KiB right after the last release() (0 before the first): what the process is down to."""
    return _released_kib


def _rss_kib() -> int:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


__all__ = ["release", "released_kib", "trim_when_idle", "tune", "tune_for_bulk"]
