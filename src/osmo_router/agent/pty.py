"""Pseudo-terminals: open one with a size, make it a child's controlling terminal, resize it."""

from __future__ import annotations

import fcntl
import os
import pty
import shutil
import struct
import sys
import termios

#: Largest number of rows or columns: the kernel's window size fields are 16-bit.
MAX_SIZE = 65535


def size_error(rows: int, cols: int) -> str | None:
    """Why (rows, cols) is not a terminal size (0 means the default), or None if it is one."""
    if not (0 <= rows <= MAX_SIZE and 0 <= cols <= MAX_SIZE):
        return f"terminal size {rows}x{cols} is out of range: rows and columns must be within 0-{MAX_SIZE}"
    return None


def set_size(fd: int, rows: int, cols: int) -> bool:
    """Set the window size of a terminal; True if it changed (the kernel then sends SIGWINCH to its
    foreground group, and only then).

    Raises ValueError for a size out of range (see size_error), OSError if fd is not a terminal.
    """
    if (problem := size_error(rows, cols)) is not None:
        raise ValueError(problem)
    wanted = struct.pack("HHHH", rows, cols, 0, 0)
    before = fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(len(wanted)))
    fcntl.ioctl(fd, termios.TIOCSWINSZ, wanted)
    return before[:4] != wanted[:4]


def open_pty(rows: int, cols: int) -> tuple[int, int]:
    """A (master, slave) pair with the given size (0: 24 rows, 80 columns); the master is non-blocking.

    Raises ValueError for a size out of range, OSError if no terminal could be opened; on any
    failure both descriptors are closed again.
    """
    if (problem := size_error(rows, cols)) is not None:
        raise ValueError(problem)
    master, slave = pty.openpty()
    try:
        set_size(slave, rows or 24, cols or 80)
        os.set_blocking(master, False)
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


#: Run by a fresh interpreter when `setsid` is missing: new session, stdin as controlling terminal, exec.
_CTTY_HELPER = (
    "import fcntl, os, sys, termios\n"
    "os.setsid()\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
    "try:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "except OSError as err:\n"
    "    sys.stderr.write(f'{sys.argv[1]}: {err.strerror}\\n')\n"
    "    sys.exit(127)\n"
)


def with_controlling_tty(argv: list[str]) -> list[str]:
    """argv that runs `argv` as a session leader whose controlling terminal is its stdin.

    A preexec_fn would do this in the forked child, but forking the multi-threaded agent (gRPC's
    threads and fork handlers) and running Python there crashes now and then; so the child
    exec's `setsid --ctty` (util-linux or busybox) or, failing that, a fresh interpreter.
    """
    setsid = shutil.which("setsid")
    if setsid is not None:
        return [setsid, "-c", *argv]
    return [sys.executable, "-I", "-S", "-c", _CTTY_HELPER, *argv]


def eof_char(fd: int) -> bytes:
    """The terminal's EOF character (usually ^D), written to deliver end-of-input to the reader."""
    try:
        return termios.tcgetattr(fd)[6][termios.VEOF]  # type: ignore[no-any-return]
    except termios.error:
        return b"\x04"
