"""What aiohttp may hold unread behind a WebSocket side, counted in the byte budgets (ws/sides.py).

aiohttp reads a WebSocket's socket ahead of its reader: one message being assembled (up to its
`max_msg_size`) and a queue it pauses past twice its chunk size (2 x 256 KiB), plus one read of
256 KiB. A side reads only within a reservation of that worst case in its budgets (`read_reservation`),
or, once paired and without one, with its socket paused between the relay's reads; and a side paused
for want of room watches its TCP connection (`peer_closed`) so that a peer leaving is noticed anyway.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable
from typing import Any

from osmo_router.router.core.budget import ByteBudget

#: What aiohttp may read ahead of a WebSocket's reader besides one message: its queue pauses the
#: socket past twice its chunk size (2 x 256 KiB), and asyncio reads 256 KiB at a time.
READ_AHEAD = 3 * 256 * 1024
#: What a paired side without a reservation may hold once it paused its socket after a message: the
#: rest of the read that completed it and one more read that came in before the pause (2 x 256 KiB).
PAUSED_READ = 2 * 256 * 1024
#: How often a side paused for want of room looks whether its peer's TCP connection ended.
PEER_CHECK_INTERVAL = 0.5
#: TCP states (linux/tcp_states.h) of a connection whose peer closed (FIN: CLOSE_WAIT) or reset it (CLOSE).
_TCP_CLOSE, _TCP_CLOSE_WAIT = 7, 8


def try_reserve(budgets: tuple[ByteBudget, ...], size: int) -> bool:
    """Reserve `size` in every budget if it fits in all of them (ByteBudget.reserve_fits)."""
    if not all(budget.reserve_fits(size) for budget in budgets):
        return False
    for budget in budgets:
        budget.reserve(size)
    return True


async def reserve(budgets: tuple[ByteBudget, ...], size: int) -> None:
    """Reserve `size` in every budget, waiting for reservations given back."""
    woken_by: ByteBudget | None = None
    while not try_reserve(budgets, size):
        blocking = next(budget for budget in budgets if not budget.reserve_fits(size))
        if woken_by is not None and woken_by is not blocking:
            woken_by.unreserve(0)  # room there, but we wait on another budget: pass the wake-up on
        woken_by = blocking
        waiter = asyncio.get_running_loop().create_future()
        blocking.notify_reserve(size, waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                blocking.unreserve(0)  # woken, then paired or gone: pass the wake-up on
            raise


def tcp_closed(sock: Any) -> bool:
    """Whether the peer of a TCP socket closed or reset its connection, even with its data unread.

    The kernel's TCP state says so at once (CLOSE_WAIT once its FIN arrived, CLOSE after a reset),
    where reading would first have to take every byte queued before the FIN.
    """
    # asyncio hands out a TransportSocket (socket.socket's getsockopt and family), not the socket.
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return True  # the descriptor is gone
    return state in (_TCP_CLOSE, _TCP_CLOSE_WAIT)


async def peer_closed(transport: asyncio.BaseTransport | None, interval: float = PEER_CHECK_INTERVAL) -> None:
    """Return once the peer of `transport`'s TCP connection closed or reset it (looked at every `interval`).

    For a side whose reading is paused: it reads no close frame, no EOF and no reset, and aiohttp's
    heartbeat is stopped (its pong could not be read), so without this a peer that left was noticed
    only when the side read again (its session paired or timed out, up to an hour).
    """
    sock = transport.get_extra_info("socket") if transport is not None else None
    # Polled: the kernel tells nobody of a FIN on a socket nobody reads (no event to wait on).
    while not (transport is None or transport.is_closing() or tcp_closed(sock)):  # noqa: ASYNC110
        await asyncio.sleep(interval)


async def until_peer_closed(wait: Awaitable[Any], transport: asyncio.BaseTransport | None) -> bool:
    """Await `wait` (of a side whose reading is paused); False, `wait` cancelled, if the peer left first.

    True only when `wait` completed (a reservation it took is then held, even if the peer left too)."""
    done = asyncio.ensure_future(wait)
    gone = asyncio.ensure_future(peer_closed(transport))
    try:
        await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (done, gone):
            task.cancel()
        await asyncio.gather(done, gone, return_exceptions=True)
    return done.done() and not done.cancelled() and done.exception() is None


class PairedReads:
    """What aiohttp may hold behind a paired side, counted in the budgets its messages are queued under.

    A paired side whose relay is held back (its queue or its user's budget full) does not read, and
    aiohttp kept reading for it: about one message and 768 KiB per session outside every budget (50
    sessions of one user sending 4 MiB messages to peers that read nothing grew the router by 240 MiB
    over her 4 MiB budget). Now the side reads freely only while it holds a reservation of that worst
    case (`read_reservation`) in the budgets; without one (reservations take at most half a budget) it
    pauses its socket after each message the relay takes and resumes when the relay reads again, and
    what aiohttp had read by then (at most PAUSED_READ) counts as held meanwhile. So a held-back
    session holds at most one of the two, counted, and a reading one pays two system calls a message.
    """

    def __init__(self, size: int) -> None:
        """`size`: the side's read reservation (its max message size and READ_AHEAD)."""
        self._size = size
        self._budgets: tuple[ByteBudget, ...] = ()
        self._reserved: tuple[ByteBudget, ...] = ()
        self._held: tuple[ByteBudget, ...] = ()
        self.active = False  # paired with budgets: reads are bounded

    def use(self, budgets: tuple[ByteBudget, ...]) -> None:
        """Count the side's reads in `budgets` from now on (the relay's inbound queue's)."""
        self._budgets = budgets
        self.active = bool(budgets)
        self.free()

    def free(self) -> bool:
        """Whether the side may read without pausing: it holds (or now takes) a reservation."""
        if self._reserved or not self.active:
            return True
        if try_reserve(self._budgets, self._size):
            self._reserved = self._budgets
            return True
        return False

    def hold_paused(self) -> None:
        """The side paused its socket after a message: what aiohttp read meanwhile counts as held."""
        if self.active and not self._held:
            self._held = self._budgets
            for budget in self._held:
                budget.hold(PAUSED_READ)

    def unhold_paused(self) -> None:
        """The side reads again: aiohttp's buffer is drained into the message the relay reads."""
        held, self._held = self._held, ()
        for budget in held:
            budget.unhold(PAUSED_READ)

    def release(self) -> None:
        """The session ended: give everything back (idempotent)."""
        self.active = False
        self.unhold_paused()
        reserved, self._reserved = self._reserved, ()
        for budget in reserved:
            budget.unreserve(self._size)
