"""Session keys, drawn by the router and by a client that names its own session (the WebSocket transport)."""

from __future__ import annotations

import hashlib
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


#: Domain of the hash that names a session after its resume secret (ResumeToken.key_from_secret).
_SECRET_KEY_DOMAIN = b"osmo-router session key from resume secret\0"


def key_of_secret(secret: str) -> str:
    """The key of a session its client asked to be named after its resume `secret` (key_from_secret).

    A one-way hash (SHA-256, 128 bits kept, in hex: it never starts with '-' or '_'): the key names
    the session in logs, listings and `attach` without telling the secret that a resume must present,
    and nobody can choose a secret whose key is one already in use (another user's session).
    """
    return hashlib.sha256(_SECRET_KEY_DOMAIN + secret.encode()).hexdigest()[:32]
