"""A stream's share of the router's byte budgets: what it holds and may receive, counted as held.

Given byte budgets (`Stream.use_budgets`: the router's relay gives a session's streams its user's
and the process's budgets), a stream counts in them as held everything its peer can make it hold:
what it has received and not yet had read, and the window its peer may still fill. It grows its
window to the connection's `stream_window` and gives window back only while every budget has room
for it, except up to `CREDIT_FLOOR` (so it always moves) and what completes a message that has begun.
Before that, on a server given a bound for them, what a stream holds is charged to its connection's
share of that bound (`UncountedCharge`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Protocol

from osmo_router.io.byte_shares import ByteShares

if TYPE_CHECKING:
    from osmo_router.h2.receive_window import ReceiveWindow

#: Window a stream with budgets may always have, whatever its budgets' room: it never stops.
CREDIT_FLOOR = 64 * 1024


class ByteBudget(Protocol):
    """A shared byte budget (the router's core/budget.py ByteBudget): what `use_budgets` needs of it."""

    limit: int
    used: int
    held: int

    def hold(self, size: int) -> None:
        """Count `size` more bytes as held."""
        ...

    def unhold(self, size: int) -> None:
        """Count `size` fewer bytes as held (and wake whoever waits for room)."""
        ...


class StreamCredit:
    """A stream's bytes counted as held in byte budgets (see the module docstring)."""

    __slots__ = ("budgets", "charged")

    def __init__(self, budgets: tuple[ByteBudget, ...]) -> None:
        self.budgets = budgets
        self.charged = 0

    def allowed(self, stream: ReceiveWindow, grant: int) -> int:
        """How much of `grant` the stream may give back now: all of it while every budget has room,
        else up to CREDIT_FLOOR and what completes a begun message.

        No waiting for room: the floor keeps data arriving, and every DATA frame and every read asks
        again (waking every held-back stream at each byte given back cost O(streams) per message).
        """
        if grant <= 0:
            return grant
        # What was read since the last count is still counted as held: not twice.
        counted = self.charged - stream.exposure
        for budget in self.budgets:
            if budget.used + budget.held - counted + grant > budget.limit:
                break
        else:
            return grant
        return min(grant, max(CREDIT_FLOOR - stream.exposure, stream.missing_window()))

    def sync(self, stream: ReceiveWindow) -> None:
        """Count the stream's exposure now (runs per message taken: `_set` inline)."""
        exposure = stream.exposure
        delta = exposure - self.charged
        if delta:
            self.charged = exposure
            if delta > 0:
                for budget in self.budgets:
                    budget.hold(delta)
            else:
                for budget in self.budgets:
                    budget.unhold(-delta)

    def release(self) -> None:
        """The stream is over: nothing counted any more."""
        self._set(0)

    def _set(self, exposure: int) -> None:
        delta = exposure - self.charged
        if delta > 0:
            for budget in self.budgets:
                budget.hold(delta)
        elif delta < 0:
            for budget in self.budgets:
                budget.unhold(-delta)
        self.charged = exposure


#: What one request header field is counted as (h2/dispatch.py): its name and value twice (the stream's
#: list and the call's metadata) and the Python objects around them (measured: about 155 bytes a field).
HEADER_FIELD_COST = 256


def header_cost(headers: list[tuple[str, str]]) -> int:
    """The memory a stream's request headers are counted as while the stream is uncounted."""
    return sum(HEADER_FIELD_COST + 2 * (len(name) + len(value)) for name, value in headers)


class UncountedCharge:
    """What a server stream may hold before any byte budget counts it (its window, its request headers,
    its largest message past the window), charged to its connection's share of the server's bound
    (ByteShares: per connection and in all). Before its session pairs nothing else bounds it: a
    stream's window reopens for a message under way up to the max message size, and a connection may
    open thousands of streams."""

    __slots__ = ("charged", "covered", "owner", "shares")

    def __init__(self, shares: ByteShares, owner: Hashable, charged: int) -> None:
        self.shares = shares
        self.owner = owner
        self.charged = charged
        self.covered = 0  # the largest message charged so far

    def cover(self, length: int) -> bool:
        """Charge a message of `length` bytes (once: the largest so far); False if there is no room."""
        if length <= self.covered:
            return True
        if not self.shares.take(self.owner, length - self.covered):
            return False
        self.charged += length - self.covered
        self.covered = length
        return True

    def release(self) -> None:
        """Nothing is charged any more (the stream is counted in its session's budgets, or over)."""
        if self.charged:
            self.shares.give(self.owner, self.charged)
            self.charged = self.covered = 0
