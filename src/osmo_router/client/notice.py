"""The client's own lines on stderr: `osmo-net-client: [COMMAND: ]MESSAGE`, one line each, from one writer."""

from __future__ import annotations

import contextlib
import sys

#: What every line of the client's own starts with.
PROGRAM = "osmo-net-client"


def say(message: str, command: str = "", *, tty: bool | None = None) -> None:
    """Write `message` on stderr as one line of this program's, `command` (`exec`, `rsync`...) naming who says it.

    `tty`: True frames the line with "\\r\\n" on both sides (in raw mode a bare "\\n" moves down without returning
    to the line's start, and the session's output may have left the cursor mid-line); False writes a plain line
    (before or after a session); None frames it when stderr is a terminal (a line said during a session, whose
    terminal may be raw). Nothing is written when stderr is gone (a terminal that hung up, a closed pipe).
    """
    line = f"{PROGRAM}: {command}: {message}" if command else f"{PROGRAM}: {message}"
    with contextlib.suppress(OSError):
        framed = sys.stderr.isatty() if tty is None else tty
        sys.stderr.write(f"\r\n{line}\r\n" if framed else f"{line}\n")
        sys.stderr.flush()


__all__ = ["PROGRAM", "say"]
