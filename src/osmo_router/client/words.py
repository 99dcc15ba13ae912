"""Command-line words the session carries as text: refused, with the word named, when not UTF-8; and
text from the remote side made safe to show on a terminal."""

from __future__ import annotations

import re
from collections.abc import Sequence

import click


def require_utf8(what: str, words: Sequence[str]) -> None:
    """Refuse words that are not UTF-8 (click.UsageError): the protocol carries them as text."""
    for number, word in enumerate(words, start=1):
        try:
            word.encode("utf-8")
        except UnicodeEncodeError:
            shown = word.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            raise click.UsageError(f"{what} word {number} ({shown}) is not UTF-8: the session carries text") from None


#: C0 controls, DEL and C1 controls: a newline breaks a table's rows, an escape sequence drives the terminal.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """`text` with its control characters written as escapes (`\\n`, `\\x1b`), as `ps` shows them harmless."""
    return _CONTROL.sub(lambda m: _NAMED.get(m.group(), f"\\x{ord(m.group()):02x}"), text)
