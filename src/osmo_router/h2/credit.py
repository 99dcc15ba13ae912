"""A stream's share of the router's byte budgets: what it holds and may receive, counted as held.

Given byte budgets (`Stream.use_budgets`: the router's relay gives a session's streams its user's
and the process's budgets), a stream counts in them as held everything its peer can make it hold:
what it has received and not yet had read, and the window its peer may still fill. It grows its
window to the connection's `stream_window` and gives window back only while every budget has room
for it, except up to `CREDIT_FLOOR` (so it always moves) and what completes a message that has begun.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from osmo_router.h2.inbound import StreamInbound

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

    def allowed(self, stream: StreamInbound, grant: int) -> int:
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

    def sync(self, stream: StreamInbound) -> None:
        """Count the stream's exposure now."""
        self._set(stream.exposure)

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
