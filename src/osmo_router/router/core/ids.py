"""Ids the router takes from its callers (workflow, task, session keys): their checks, and new session keys."""

from __future__ import annotations

from osmo_router.wire.errors import InvalidArgument
from osmo_router.wire.keys import new_session_key as new_session_key  # the router's callers import it here

MAX_ID_LENGTH = 256


def check_id(kind: str, value: str, *, required: bool) -> None:
    """Refuse empty (when required), over-long or control-character ids."""
    if required and not value:
        raise InvalidArgument(f"{kind} is required")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(f"{kind} is longer than {MAX_ID_LENGTH} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise InvalidArgument(f"{kind} contains control characters")
