"""The local terminal in TTY mode: raw mode restored on every exit path, and its size."""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import sys
import termios
import tty
from collections.abc import Iterator


def terminal_size(fd: int = 1) -> tuple[int, int]:
    """(rows, cols) of the terminal on fd, else of stdin, else $LINES/$COLUMNS or 24x80."""
    for candidate in (fd, 0, 2):
        with contextlib.suppress(OSError):
            rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(candidate, termios.TIOCGWINSZ, b"\0" * 8))
            if rows and cols:
                return rows, cols
    return int(os.environ.get("LINES", 24)), int(os.environ.get("COLUMNS", 80))


@contextlib.contextmanager
def raw_mode(fd: int = 0) -> Iterator[bool]:
    """Put a terminal in raw mode for the duration; yields False (and does nothing) if fd is no terminal."""
    if not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield True
    finally:
        # A terminal that hung up (its window closed) has no mode to give back: EIO is not an error.
        with contextlib.suppress(termios.error):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        with contextlib.suppress(OSError):
            sys.stdout.flush()
