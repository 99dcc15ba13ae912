"""Session keys whose client left before the agent it asked for joined.

The router asks a registered agent for a session (SessionRequest) when a client joins, and the agent
answers with a Connect stream on that key. A client that goes away first (a closed WebSocket, a
cancelled call) ends the pending session; without a trace of it, the agent's Connect that follows
opens a new one and waits the whole rendezvous timeout for a client that will never come. A user
who opens and drops sessions in a loop would fill the router's pending sessions for everybody that
way, counted against the agent. Remembering such keys for a while lets the router refuse those
Connects at once. Only keys the router asked an agent for are remembered (core/sessions.py).

Bounded: at most MAX_ABANDONED keys (each a checked session key and workflow id, a few hundred
bytes), each forgotten after its time-to-live; when full the oldest goes first (its agent then waits
its rendezvous timeout, as before).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

#: Keys remembered at most (each a scoped key and a deadline).
MAX_ABANDONED = 4096


class AbandonedKeys:
    """A bounded, expiring set of scoped session keys (see the module docstring)."""

    def __init__(self, ttl: float, limit: int = MAX_ABANDONED, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._limit = limit
        self._clock = clock
        self._deadlines: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._deadlines)

    def add(self, scoped_key: str) -> None:
        """Remember a key for the time-to-live."""
        self._expire()
        self._deadlines.pop(scoped_key, None)
        self._deadlines[scoped_key] = self._clock() + self._ttl
        while len(self._deadlines) > self._limit:
            self._deadlines.popitem(last=False)

    def discard(self, scoped_key: str) -> None:
        """Forget a key (a new session uses it again)."""
        self._deadlines.pop(scoped_key, None)

    def __contains__(self, scoped_key: object) -> bool:
        deadline = self._deadlines.get(scoped_key) if isinstance(scoped_key, str) else None
        return deadline is not None and deadline > self._clock()

    def _expire(self) -> None:
        now = self._clock()
        while self._deadlines:
            key, deadline = next(iter(self._deadlines.items()))
            if deadline > now:
                return
            del self._deadlines[key]
