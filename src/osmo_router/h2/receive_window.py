"""A stream's receive window: given back to the peer as messages are taken, within the byte budgets.

What a stalled reader makes us hold is bounded by the window we advertise (plus at most one partial
message: a message larger than the window must be able to arrive whole). With byte budgets the window
grows and is given back only as they have room (h2/credit.py). The base of h2/inbound.py's
`StreamInbound`, which assembles the messages and keeps the state declared here.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from osmo_router.h2.credit import ByteBudget, StreamCredit, UncountedCharge

if TYPE_CHECKING:
    from osmo_router.h2.connection import Connection

#: A stream takes up the connection's grown window once it received (in all) its own window >> this:
#: a bulk stream at once (the BDP sample that grew the window was mostly its bytes, and the next
#: sample, sent at once, needs the larger window to grow it further), resume's ack stream (20 bytes
#: per 2 MiB acknowledged) only after some 25 GB the other way at the configured 2 MiB window.
GROW_SHIFT = 3


class ReceiveWindow:
    """The window half of a stream's inbound side (the state is StreamInbound's, set in its __init__)."""

    conn: Connection
    id: int
    ended_in: bool
    reset_code: int | None
    _recv_window: int  # what we let this stream's peer have unread
    _recv_left: int  # what the peer may still send before our next WINDOW_UPDATE
    _granted: int  # all the window the peer was ever given (its initial window and our updates)
    _queued: int
    _head: bytearray
    _need: int
    _filled: int
    _inflight: int
    _credit: StreamCredit | None
    uncounted: UncountedCharge | None
    _listened: bool
    _may_grow: bool
    _closed: asyncio.Future[None]

    def _gave_back_listened(self) -> bool:
        """Give back, as if read, the window of what the listener took since the last look; False if
        it took nothing (then the caller grants as it would without a listener)."""
        if not self._listened:
            return False
        self._listened = False
        self._taken()
        return True

    def _grant_if_stuck(self) -> None:
        """Give back the bytes of the message under way now if it could not complete otherwise (it is
        larger than what the peer may still send); else they go back with the message, once read: one
        WINDOW_UPDATE per message, not one per read of it."""
        missing = self._need - self._filled if self._need else (5 - len(self._head) if self._head else 0)
        if missing > self._recv_left + self._inflight:
            if self.uncounted is not None and not self.uncounted.cover(self._need):
                return  # no room for it before the stream is counted: it waits (its session pairs, or it times out)
            self._grant()

    def _grant(self) -> None:
        """Give the peer back the window its read messages used (in steps of a quarter window)."""
        credit = self._credit
        if self.ended_in or self.reset_code is not None:
            if credit is not None:
                credit.sync(self)
            return
        window, left = self._recv_window, self._recv_left
        grant = window - self._queued - left - self._inflight
        # Worth sending: a quarter window, or anything to a peer that has no window left.
        least = (window >> 2 or 1) if left > 0 else 1
        # The budgets only ever lower a grant: one too small to send is not put to them (per message).
        if grant >= least:
            if credit is not None:
                grant = credit.allowed(self, grant)
            if grant >= least:
                self._recv_left += grant
                self._granted += grant
                self.conn.send_window_update(self.id, grant)
        if credit is not None:
            credit.sync(self)

    def use_budgets(self, budgets: tuple[ByteBudget, ...]) -> None:
        """Take up the connection's full stream window from now on; with `budgets`, count what this
        stream holds and may receive in them, and grow only as they have room (see the module
        docstring). Once (the relay calls it for every stream it reads)."""
        if self.uncounted is not None:
            self.uncounted.release()
            self.uncounted = None
        if (self._may_grow and (self._credit is not None or not budgets)) or self._closed.done():
            return
        self._may_grow = True
        if budgets:
            self._credit = StreamCredit(budgets)
        self._take_up_window()
        self._grant()

    def _taken(self) -> None:
        """A message left the stream (read, or taken by the listener): give its window back, grown with
        the link if the connection's window grew and the stream uses its own (see `_take_up_window`)."""
        if self._may_grow and self.conn.stream_window > self._recv_window:
            self._take_up_window()  # (a call only while the connection's window is above this stream's)
        self._grant()

    def _take_up_window(self) -> None:
        """Let the peer have up to the connection's stream window now (it grows with the link, h2/bdp.py),
        beyond the configured one only once the stream has received an eighth of its window (GROW_SHIFT).

        The connection's window grows for the connection's busiest stream; a stream that carries little
        (resume's acks, a terminal's keystrokes) has no use for it, and its open window counts as held
        in the byte budgets all the same (credit.py). Issue 18: iperf3 -P 8 up after a round down left
        the eight sessions' ack streams at the 16 MiB the last round grew the connection to: with the
        data streams' 16 MiB that was the user's whole 256 MiB budget, and the data streams got
        CREDIT_FLOOR-sized grants (64 KiB DATA frames, 6-11 router reads per MiB instead of 2.5)."""
        window, configured = self.conn.stream_window, self.conn.config.stream_window
        # (A stream that starts smaller, H2Config.initial_stream_window, is measured against the configured
        # window: its opening message alone must not grow it.)
        if window > configured and self._granted - self._recv_left < max(self._recv_window, configured) >> GROW_SHIFT:
            window = configured
        self._recv_window = max(self._recv_window, window)

    @property
    def exposure(self) -> int:
        """Bytes this stream holds unread (a message under way included) plus the window its peer has
        filled (a DATA frame still arriving) or may still fill."""
        left = self._recv_left
        open_window = left if left > 0 and not self.ended_in and self.reset_code is None else 0
        return open_window + self._inflight + self._queued + self._filled + (len(self._head) if self._head else 0)

    def missing_window(self) -> int:
        """Window the message under way still needs beyond what the peer may send now."""
        missing = self._need - self._filled if self._need else (5 - len(self._head) if self._head else 0)
        return max(0, missing - self._recv_left - self._inflight)

    def _release_credit(self) -> None:
        if self.uncounted is not None:
            self.uncounted.release()
            self.uncounted = None
        if self._credit is not None:
            self._credit.release()
            self._credit = None
