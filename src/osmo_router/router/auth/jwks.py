"""Signing keys from a JWKS URL: cached, refreshed in a worker thread, never on the event loop.

A key id the cache does not know triggers a refresh, but at most one per `min_refresh_interval`
(a stream of tokens with made-up key ids must not turn into a stream of HTTP fetches), and every
caller waits on the same single fetch; a stale set is refreshed at that pace too, so an identity
provider that is down is asked once per interval, not once per token verified. Stale keys keep
serving while a background refresh runs, and a failed refresh keeps the keys it had: an
identity-provider outage must not lock everybody out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import jwt
from jwt.exceptions import PyJWKClientError, PyJWKError

from osmo_router.wire.errors import Unauthenticated

log = logging.getLogger(__name__)

#: Algorithms a JWKS key may carry; symmetric ("oct") keys from a URL are never trusted.
JWKS_ALGORITHMS = frozenset({"RS256", "ES256"})
#: Fetches for unknown key ids are at least this far apart (seconds).
DEFAULT_REFRESH_INTERVAL = 10.0


class JwksKeys:
    """The keys of one JWKS endpoint, by key id."""

    def __init__(
        self,
        url: str,
        *,
        lifespan: float = 300.0,
        min_refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._client = jwt.PyJWKClient(url, cache_jwk_set=False, cache_keys=False, timeout=timeout)
        self._lifespan = lifespan
        self._min_refresh_interval = min_refresh_interval
        self._clock = clock
        self._keys: dict[str, tuple[str, Any]] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._refresh: asyncio.Task[None] | None = None
        self.fetches = 0

    @classmethod
    def for_ttl(cls, url: str, ttl: float) -> JwksKeys:
        """The keys of `url` used for `ttl` seconds per fetch (--jwks-cache-ttl); refreshes never closer than
        the default interval, or than `ttl` when that is shorter (a short TTL is asked for fresh keys)."""
        return cls(url, lifespan=ttl, min_refresh_interval=min(DEFAULT_REFRESH_INTERVAL, ttl))

    async def key(self, kid: str, algorithm: str) -> Any:
        """The verification key with this id for this algorithm; raises Unauthenticated if there is none."""
        entry = await self.find(kid)
        if entry is None:
            raise self.missing(kid)
        key_algorithm, key = entry
        if key_algorithm != algorithm:
            raise Unauthenticated(f"token algorithm {algorithm} does not match its key ({key_algorithm})")
        return key

    def missing(self, kid: str) -> Unauthenticated:
        """The refusal for a key id the endpoint does not list (or for keys that could not be fetched)."""
        if self._fetched_at is None:
            return Unauthenticated(f"cannot verify the token: the signing keys at {self.url} could not be fetched")
        return Unauthenticated(f"token signed by an unknown key (kid {kid[:64]!r})")

    async def find(self, kid: str) -> tuple[str, Any] | None:
        """(algorithm, key) for a key id, refreshing the set when due; None if the endpoint does not list it."""
        now = self._clock()
        entry = self._keys.get(kid)
        if entry is not None:
            stale = self._fetched_at is None or now - self._fetched_at > self._lifespan
            if stale and self._may_refresh(now):  # (a failed refresh is not tried again per token)
                self._start_refresh()
        elif self._may_refresh(now):
            await asyncio.shield(self._start_refresh())
            entry = self._keys.get(kid)
        return entry

    async def close(self) -> None:
        """Wait for a refresh in flight (bounded by the HTTP timeout) so no thread outlives the router."""
        if self._refresh is not None and not self._refresh.done():
            with contextlib.suppress(Exception):
                await asyncio.shield(self._refresh)

    def _may_refresh(self, now: float) -> bool:
        if self._refresh is not None and not self._refresh.done():
            return True
        return self._attempted_at is None or now - self._attempted_at >= self._min_refresh_interval

    def _start_refresh(self) -> asyncio.Task[None]:
        if self._refresh is None or self._refresh.done():
            self._attempted_at = self._clock()
            self._refresh = asyncio.create_task(self._fetch())
        return self._refresh

    async def _fetch(self) -> None:
        self.fetches += 1
        try:
            jwk_set = await asyncio.to_thread(self._client.get_jwk_set, True)
        except (PyJWKClientError, PyJWKError, OSError, ValueError) as err:
            log.warning("cannot fetch signing keys from %s: %s (keeping %d keys)", self.url, err, len(self._keys))
            return
        keys: dict[str, tuple[str, Any]] = {}
        for jwk in jwk_set.keys:
            if jwk.key_id and jwk.algorithm_name in JWKS_ALGORITHMS:
                keys[jwk.key_id] = (jwk.algorithm_name, jwk.key)
        self._keys = keys
        self._fetched_at = self._clock()
        log.info("fetched %d signing keys from %s", len(keys), self.url)
