"""The standard descriptors made safe to use: one the caller closed is opened again on /dev/null.

With descriptor 1 closed (`osmo-net-client exec ... >&-`, or a supervisor that closes it), the next
socket takes descriptor 1: output meant for stdout would go into it, and libuv (uvloop), which never
closes a descriptor below 3, aborts the process when that socket is closed ("uv__close: Assertion
`fd > STDERR_FILENO' failed"). OpenSSH guards its standard descriptors the same way
(sanitise_stdfd): what a closed one would have taken in or given out is nothing.
"""

from __future__ import annotations

import os
import sys


def sanitise_std_fds() -> None:
    """Open /dev/null on each of descriptors 0, 1 and 2 that is closed, and give Python a stream for it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free descriptor: this one
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    # Python leaves a stream None when its descriptor was closed at start-up.
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))


__all__ = ["sanitise_std_fds"]
