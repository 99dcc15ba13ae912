"""Byte budgets shared by many relay queues: per user, and for the whole process.

A session's queues are bounded on their own (`--flow-control-bytes` per direction); these bound what
all of one user's sessions queue together (`--user-buffer-bytes`), and what every session queues
(`--total-buffer-bytes`, by default half the container's memory limit). A queue whose budget is
spent stops reading from its sender until its own or another queue of the budget drains: backpressure,
never more memory. Only the user's own sessions wait on a user budget, so one user filling it is
not noticed by the others.
"""

from __future__ import annotations

import asyncio
from collections import deque
from pathlib import Path

#: Whole-process budget when the container's memory limit cannot be read.
DEFAULT_TOTAL_BYTES = 2 * 1024**3
#: Default of one user's budget.
DEFAULT_USER_BYTES = 256 * 1024**2


class ByteBudget:
    """At most `limit` bytes taken at once; a taker that does not fit waits for bytes given back.

    Bytes come in two kinds: `used`, queued in a relay queue, and `held`, a message a reader has in
    hand while its queue or this budget has no room for it (it is in memory all the same). Both
    count against every other taker; a holder is not held back by its own message, and anything
    fits while nothing is queued, so holders never wait for each other alone.
    """

    __slots__ = ("_reservers", "_waiters", "held", "limit", "reserved", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.held = 0
        #: Of `held`, what readers reserved before reading (`try_reserve`), at most half the limit.
        self.reserved = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._reservers: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def counted(self) -> int:
        """Every byte the budget knows of: queued and held."""
        return self.used + self.held

    def fits(self, size: int, holding: bool = False) -> bool:
        """Whether `size` more bytes fit (anything fits when nothing is queued).

        `holding`: the caller's `size` bytes are already counted as held (see `hold`), so not twice.
        Other holders count against a holder too: while a user's held messages fill what her queues
        leave, her readers go in one at a time, each once nothing of hers is queued. That throttles
        the user whose sessions back up, not the others: letting holders in beside each other (only
        the queued bytes counted) raised another user's echo p99 from 1 ms to 37-65 ms while 24
        never-read streams filled (test_native_hostile_e2e, 2026-12-01), for no memory saved.
        """
        others_held = self.held - (size if holding else 0)
        return not self.used or self.used + others_held + size <= self.limit

    def try_take(self, size: int, holding: bool = False) -> bool:
        """Take `size` bytes if they fit (`fits`); False otherwise. Held bytes stay held until `unhold`."""
        if not self.fits(size, holding):
            return False
        self.used += size
        return True

    def hold(self, size: int) -> None:
        """Count a message a reader holds while it waits for room."""
        self.held += size

    def unhold(self, size: int) -> None:
        """The held message was queued (taken) or dropped; others may fit now."""
        self.held -= size
        if self._waiters:  # (per relayed message: no call when nobody waits)
            self._wake()

    def give(self, size: int) -> None:
        """Give bytes back and wake whoever waits for room."""
        self.used -= size
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        """Wake, first come first served, the waiters that fit now (every waiter holds its message: `notify`).

        While the counted bytes are within the limit, every holder fits (its message is counted already),
        so all are woken. Past it (other holders' windows count too: thousands of streams of one user)
        only an empty queue lets one in, so one is woken, and only then: waking every waiter at every
        byte given back or unheld cost O(waiters) per message, O(n^2) in all (3,000 connections of one
        port-forward took a minute with the router at 100% CPU, 2,000 took 5 s).
        """
        waiters = self._waiters
        while waiters:
            waiter = waiters[0]
            if waiter.done():
                waiters.popleft()
                continue
            if self.used + self.held <= self.limit:
                waiters.popleft()
                waiter.set_result(None)
                continue
            if not self.used:  # anything fits while nothing is queued: one taker, who queues
                waiters.popleft()
                waiter.set_result(None)
            return

    def notify(self, waiter: asyncio.Future[None]) -> None:
        """Complete `waiter` when its message may fit; the waiter holds its message (`hold`) meanwhile."""
        self._waiters.append(waiter)

    def reserve_fits(self, size: int) -> bool:
        """Whether a reservation of `size` fits: reservations together take at most half the limit (the
        rest stays for the queues), and one always fits while none is held, so a budget smaller than one
        reservation still lets one reader in."""
        return not self.reserved or self.reserved + size <= self.limit // 2

    def reserve(self, size: int) -> None:
        """Hold `size` bytes a reader may fill before it knows what it read (see `reserve_fits`)."""
        self.reserved += size
        self.hold(size)

    def unreserve(self, size: int) -> None:
        """Give a reservation back; wake, first come first served, the reservers that fit now."""
        self.reserved -= size
        self.unhold(size)
        woken = 0
        while self._reservers:
            want, waiter = self._reservers[0]
            if waiter.done():
                self._reservers.popleft()
                continue
            if woken and not (self.reserved + woken + want <= self.limit // 2):
                return
            if not woken and not self.reserve_fits(want):
                return
            self._reservers.popleft()
            waiter.set_result(None)
            woken += want

    def notify_reserve(self, size: int, waiter: asyncio.Future[None]) -> None:
        """Complete `waiter` when a reservation of `size` may fit (a reservation was given back)."""
        self._reservers.append((size, waiter))


class Budgets:
    """The whole process's budget and one per user, each user's held while any of its sessions lives."""

    def __init__(self, per_user: int, total: int) -> None:
        self.per_user = per_user
        self.total = ByteBudget(total)
        self._users: dict[str, tuple[ByteBudget, int]] = {}
        #: The sessions' opening messages the router keeps (held in the budgets), per user and in all.
        self._inits: dict[str, int] = {}
        self._init_total = 0

    def init_fits(self, user: str, size: int) -> bool:
        """Whether another session's opening message of `size` bytes fits: a user's kept opening messages
        alone may fill her budget, and all of them the process's, never more."""
        return self._inits.get(user, 0) + size <= self.per_user and self._init_total + size <= self.total.limit

    def hold_init(self, user: str, size: int) -> None:
        """Count a session's opening message, kept while it lives, as held (the user's budget acquired)."""
        budget, _ = self._users[user]
        budget.hold(size)
        self.total.hold(size)
        self._inits[user] = self._inits.get(user, 0) + size
        self._init_total += size

    def unhold_init(self, user: str, size: int) -> None:
        """The session whose opening message was counted (`hold_init`) ended; before `release`."""
        if not size or user not in self._users:
            return
        self._users[user][0].unhold(size)
        self.total.unhold(size)
        left = self._inits.get(user, 0) - size
        if left > 0:
            self._inits[user] = left
        else:
            self._inits.pop(user, None)
        self._init_total -= size

    def acquire(self, user: str) -> tuple[ByteBudget, ByteBudget]:
        """The budgets a session of `user` queues under (call `release` when it ends)."""
        budget, holders = self._users.get(user, (None, 0))
        if budget is None:
            budget = ByteBudget(self.per_user)
        self._users[user] = (budget, holders + 1)
        return budget, self.total

    def release(self, user: str) -> None:
        """A session of `user` ended."""
        budget, holders = self._users.get(user, (None, 0))
        if budget is None:
            return
        if holders > 1:
            self._users[user] = (budget, holders - 1)
        else:
            del self._users[user]


def container_memory_limit(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The container's memory limit in bytes (cgroup v2, else v1), or None when there is none."""
    for name in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            text = (cgroup / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 writes a huge number for "no limit"
            return int(text)
    return None


def default_total_bytes(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Half the container's memory limit (the rest is the process, gRPC's own buffers and headroom)."""
    limit = container_memory_limit(cgroup)
    return DEFAULT_TOTAL_BYTES if limit is None else max(limit // 2, 64 * 1024**2)
