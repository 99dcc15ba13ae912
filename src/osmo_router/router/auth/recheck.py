"""Credentials of long-lived streams, checked again: at their expiry and every recheck interval.

A token is verified when a stream opens. A `Register` stream (and the standby streams parked on its
registration) lives for days, so it is checked again: it ends at the token's `exp`, and every
`--credential-recheck` the token is verified afresh (no cache), so a key removed from the JWKS, or a
token the identity provider no longer vouches for, ends the stream within that bound. The agent
then re-registers with the token it holds now (`--token-file` is read at every call); its sessions
in flight are streams of their own and go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from osmo_router.router.auth.identity import Authenticator, Identity
from osmo_router.wire.errors import Unauthenticated


class CredentialWatch:
    """When a stream's credential is due for another check, and the check itself."""

    def __init__(
        self,
        auth: Authenticator,
        metadata: Sequence[tuple[str, str | bytes]],
        identity: Identity,
        interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._auth = auth
        self._metadata = tuple(metadata)
        self._subject = identity.subject
        self._expires = identity.expires
        self._interval = interval
        self._clock = clock
        self._next = clock() + interval

    def due_in(self) -> float:
        """Seconds until the next check is due (0 when it is due now)."""
        due = self._next if self._expires is None else min(self._next, self._expires)
        return max(0.0, due - self._clock())

    async def check(self) -> None:
        """Raise Unauthenticated when the credential expired or no longer verifies; else schedule the next check."""
        now = self._clock()
        if self._expires is not None and now >= self._expires:
            raise Unauthenticated("the agent's token expired: renew it and register again")
        try:
            identity = await self._auth.revalidate(self._metadata)
        except Unauthenticated as err:
            raise Unauthenticated(f"the agent's token is no longer valid ({err.message})") from None
        if identity.subject != self._subject:
            raise Unauthenticated("the agent's token now names another subject")
        self._expires = identity.expires
        self._next = now + self._interval
