"""The last bound on one user's memory: the router watches its own RSS and ends the held-back sessions
of the user who has the most of them once it passes `--memory-guard-bytes`.

The budgets (core/budget.py) bound what the relay queues. What they cannot bound is gRPC core's own
buffering of the streams the router stops reading: each such stream keeps up to its HTTP/2 receive
window, which BDP probing (kept on: it is what gives one stream its full throughput) sizes at
max(4 MiB, 2 x the estimated bandwidth-delay product). Against a sender that pushes large messages
as fast as it can, the estimate, and with it the window of every stream of the connection, grows
by doubling: 22 to 530 MiB per held-back stream were measured on loopback (docs/bench/NOTES.md).
gRPC Python offers no way to cap the window with BDP probing on (its memory-pressure input, the
resource quota, is not settable from Python).

So: every `interval` the guard reads the process's RSS. Above the limit, it takes the sessions
whose reader is held back (a queue of theirs is full, so gRPC buffers for their sender), picks the
user with the most of them, ends those with RESOURCE_EXHAUSTED, and gives the freed memory back
(malloc_trim). For a second after that only more of the same user's sessions are ended, while the
memory of the ended ones is being freed: one user's flood ends her own sessions only.

The same loop asks for a trim once the process is quiet (memtune.trim_when_idle) every TRIM_EVERY
seconds while its RSS is well above what the last trim left: gRPC frees the buffers of a stream whose
reader took its time long after the session ended, when no session end asks for a trim.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Callable

from osmo_router.io import memtune
from osmo_router.router.core.sessions import Session
from osmo_router.wire.errors import ResourceExhausted

log = logging.getLogger(__name__)

#: Seconds between two reads of the RSS.
INTERVAL = 0.05
#: Seconds after ending one user's sessions during which the guard ends only more of hers (gRPC and
#: malloc_trim give the memory of the ended ones back meanwhile; another user is not blamed for it).
PAUSE = 1.0
#: How long after ending sessions the freed memory is given back (the calls are torn down first).
RELEASE_DELAY = 0.5
#: Every this many seconds, a process whose RSS is TRIM_SLACK above what the last trim left asks for
#: a trim once it is quiet: gRPC frees some buffers long after their session ended (a stream whose
#: reader took its time), when no session end asks for one.
TRIM_EVERY = 10.0
TRIM_SLACK = 16 * 1024 * 1024


class ResidentSize:
    """The process's resident set size in bytes (0 when unknown), by one `pread` of /proc/self/statm.

    The file stays open: opening it is five system calls (openat, fstat, lseek, read, close), about
    27 us on the 2-core VM against 2 us for the pread, twenty times a second (INTERVAL). The
    descriptor names the process that opened it, so a reader made before a fork reads the parent's.
    """

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._fd = -1

    def __call__(self) -> int:
        if self._fd < 0:
            return 0
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return 0

    def close(self) -> None:
        """Close the descriptor; every later reading is 0."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def default_limit(total_buffer_bytes: int, container_limit: int | None) -> int:
    """Three quarters of the container's memory limit; without one, the total budget and half again."""
    if container_limit is not None:
        return container_limit * 3 // 4
    return total_buffer_bytes * 3 // 2


class MemoryGuard:
    """Ends the held-back sessions of the heaviest user while the process's RSS is above `limit`."""

    def __init__(
        self,
        limit: int,
        sessions: Callable[[], list[Session]],
        on_end: Callable[[str, int], None],
        rss: Callable[[], int] | None = None,
    ) -> None:
        self.limit = limit
        self._sessions = sessions
        self._on_end = on_end
        self._rss = rss  # (None: a ResidentSize of the guard's own, for as long as it runs)
        #: The user whose sessions were ended last, and until when only hers are (see PAUSE).
        self._last_user: str | None = None
        self._last_until = 0.0

    async def run(self, interval: float = INTERVAL) -> None:
        """Check every `interval` seconds, for ever (cancel to stop)."""
        loop = asyncio.get_running_loop()
        next_trim = loop.time() + TRIM_EVERY
        own = ResidentSize() if self._rss is None else None
        read_rss = own or self._rss
        assert read_rss is not None
        try:
            while True:
                await asyncio.sleep(interval)
                rss = read_rss()
                if rss > self.limit:
                    self.check(rss)
                if loop.time() >= next_trim:
                    next_trim = loop.time() + TRIM_EVERY
                    if rss > memtune.released_kib() * 1024 + TRIM_SLACK:
                        memtune.trim_when_idle()
        finally:
            if own is not None:
                own.close()

    def check(self, rss: int) -> bool:
        """End the held-back sessions of the user with the most of them; False when none is held back."""
        held = [s for s in self._sessions() if s.error is None and (s.to_agent.held_back or s.to_client.held_back)]
        now = asyncio.get_running_loop().time()
        if now < self._last_until:
            held = [s for s in held if s.user == self._last_user]
        if not held:
            return False
        user, count = collections.Counter(s.user for s in held).most_common(1)[0]
        error = ResourceExhausted(
            f"the router's memory is above its guard ({self.limit >> 20} MiB): the sessions of {user} "
            "that their readers hold back were ended"
        )
        for session in held:
            if session.user == user:
                session.fail(error)
        log.warning(
            "memory guard: RSS %d MiB above %d MiB; ended %d held-back sessions of %s",
            rss >> 20,
            self.limit >> 20,
            count,
            user,
            extra={"fields": {"event": "memory_guard", "rss_bytes": rss, "user": user, "sessions": count}},
        )
        self._last_user, self._last_until = user, now + PAUSE
        self._on_end(user, count)
        asyncio.get_running_loop().call_later(RELEASE_DELAY, memtune.release)
        return True
