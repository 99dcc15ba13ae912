"""Pseudo-terminals: open one with a size, make it a child's controlling terminal, resize it."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import termios


def set_size(fd: int, rows: int, cols: int) -> None:
    """Set the window size of a terminal (the kernel sends SIGWINCH to its foreground group)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def open_pty(rows: int, cols: int) -> tuple[int, int]:
    """A (master, slave) pair with the given size; the master is non-blocking."""
    master, slave = pty.openpty()
    set_size(slave, rows or 24, cols or 80)
    os.set_blocking(master, False)
    return master, slave


def become_session_leader_with_tty() -> None:
    """preexec_fn for the child: new session, with its stdin (the PTY slave) as controlling terminal."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def eof_char(fd: int) -> bytes:
    """The terminal's EOF character (usually ^D), written to deliver end-of-input to the reader."""
    try:
        return termios.tcgetattr(fd)[6][termios.VEOF]  # type: ignore[no-any-return]
    except termios.error:
        return b"\x04"
