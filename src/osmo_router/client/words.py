"""Command-line words the session carries as text: refused, with the word named, when not UTF-8."""

from __future__ import annotations

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
