"""Session keys, drawn by the router and by a client that names its own session (the WebSocket transport)."""

from __future__ import annotations

import secrets

#: Characters a key never starts with: a leading '-' reads as an option on a command line, and
#: '_' is kept out too (one rule for both, as the router has always drawn keys).
_NOT_FIRST = "-_"


def new_session_key() -> str:
    """A fresh 128-bit random session key that never starts with '-' or '_'.

    Users type it on command lines (`osmo-net-client attach KEY`), where a leading '-' reads as an
    option: such draws (1 in 32) are drawn again.
    """
    while (key := secrets.token_urlsafe(16))[0] in _NOT_FIRST:
        pass
    return key
