"""Ids the router takes from its callers (workflow, task, session keys): their checks, and new session keys."""

from __future__ import annotations

import secrets

from osmo_router.wire.errors import InvalidArgument

MAX_ID_LENGTH = 256


def new_session_key() -> str:
    """A fresh 128-bit random session key that never starts with '-' or '_'.

    Users type it on command lines (`osmo-net-client attach KEY`), where a leading '-' reads as an
    option: such draws (1 in 32) are drawn again.
    """
    while (key := secrets.token_urlsafe(16))[0] in "-_":
        pass
    return key


def check_id(kind: str, value: str, *, required: bool) -> None:
    """Refuse empty (when required), over-long or control-character ids."""
    if required and not value:
        raise InvalidArgument(f"{kind} is required")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(f"{kind} is longer than {MAX_ID_LENGTH} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise InvalidArgument(f"{kind} contains control characters")
