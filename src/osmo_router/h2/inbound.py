"""A stream's inbound side: gRPC messages parsed out of DATA payloads.

The stream parses gRPC length-prefixed messages out of DATA payloads and queues them for `read`
(or hands each to a listener); it gives the peer window back only as messages are taken
(h2/receive_window.py, its base).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from osmo_router.h2 import frames as fr
from osmo_router.h2.credit import StreamCredit, UncountedCharge
from osmo_router.h2.receive_window import ReceiveWindow
from osmo_router.io.buffers import finish, new_message

if TYPE_CHECKING:
    from osmo_router.h2.connection import Connection

_EMPTY_VIEW = memoryview(b"")


class StreamReset(Exception):
    """The stream ended abnormally: the peer reset it (`code`), we did, or the connection was lost (`code` -1)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"stream reset ({code})")
        self.code = code


class MessageTooLarge(Exception):
    """A received message is longer than the connection's max_message_size."""


class StreamInbound(ReceiveWindow):
    """A stream's identity, lifetime and inbound side (the base of h2/stream.py's `Stream`)."""

    def __init__(self, conn: Connection, stream_id: int, recv_window: int) -> None:
        self.conn = conn
        self.id = stream_id
        #: Set when the peer ended its side (END_STREAM) or the stream was reset.
        self.ended_in = False
        self.reset_code: int | None = None
        self._recv_window = recv_window  # what we let this stream's peer have unread
        self._recv_left = recv_window  # what the peer may still send before our next WINDOW_UPDATE
        self._granted = recv_window  # all the window the peer was ever given (receive_window.py)
        self._messages: deque[bytes] = deque()
        self._queued = 0  # bytes (with prefixes) of complete messages not yet read
        self._head = bytearray()  # the prefix of the next message, when it came split
        self._message: bytes | bytearray = b""  # the message being assembled (see io/buffers.py)
        self._into = _EMPTY_VIEW  # a writable view of all of it
        self._need = 0  # its length (0: none under way)
        self._filled = 0  # its bytes received so far
        self._growing = False  # it is assembled piecewise (see _start_message), not read into in place
        self._inflight = 0  # bytes of the current DATA frame counted against the window, not yet here
        self.compressed_received = False
        self._readable: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()  # (asyncio.get_running_loop is a getpid() per call)
        self._closed = self._loop.create_future()  # done once the stream is over (Stream.closed)
        self._credit: StreamCredit | None = None  # set by use_budgets
        #: What it holds before use_budgets, charged to the connection's share (server role, h2/dispatch.py).
        self.uncounted: UncountedCharge | None = None
        self._listener: Callable[[bytes], bool] | None = None  # see set_listener
        self._listened = False  # the listener took a message since the window was last looked at
        self._passthrough: Callable[[memoryview], bool] | None = None  # see set_passthrough
        #: Whether the stream may take up the connection's (grown) window: from the start unless the
        #: connection starts streams smaller (H2Config.initial_stream_window), else once `use_budgets`.
        self._may_grow = recv_window >= conn.config.stream_window

    def received_data(self, payload: memoryview, flow_length: int) -> None:
        """A whole DATA payload (padding removed); `flow_length` is what it counted against the windows."""
        # (data_begin, _gave_back_listened, _taken and, for a payload that is exactly one whole message,
        # _queue, inline: this runs once per message received, issue 18)
        self._recv_left -= flow_length
        if self._recv_left < 0:
            raise StreamReset(fr.ErrorCode.FLOW_CONTROL_ERROR, "the peer overran the stream window")
        self._inflight = 0
        size = len(payload)
        if (
            size >= 5
            and not self._need
            and not self._head
            and not payload[0]
            and int.from_bytes(payload[1:5], "big") == size - 5
            and size - 5 <= self.conn.config.max_message_size
        ):
            # Exactly one whole message (most small ones come so): no assembly walk.
            message = bytes(payload[5:])
            listener = self._listener
            if listener is not None and not self._messages and self.reset_code is None and listener(message):
                self._listened = True
            else:
                self._messages.append(message)
                self._queued += size
        else:
            self._assemble(payload)
        if self._listened:
            # Its window goes back as if read, grown with the link (see _taken).
            self._listened = False
            if self._may_grow and self.conn.stream_window > self._recv_window:
                self._take_up_window()  # (only while the connection's window is above this stream's)
        self._grant_if_due()
        if self._messages or self.reset_code is not None:  # (else nothing new to read: a listener took it)
            self._wake_reader()

    def taken_directly(self, flow_length: int) -> None:
        """A whole message of `flow_length` DATA bytes that the native front passed to its socket
        (h2/front.py): what `received_data` counts for a message its listener took."""
        self._recv_left -= flow_length
        if self._recv_left < 0:
            raise StreamReset(fr.ErrorCode.FLOW_CONTROL_ERROR, "the peer overran the stream window")
        self._inflight = 0
        if self._may_grow and self.conn.stream_window > self._recv_window:
            self._take_up_window()
        self._grant_if_due()

    def _grant_if_due(self) -> None:
        """Give window back if enough was taken (`_grant`), or count the exposure in the budgets."""
        if self._credit is not None or self.ended_in or self.reset_code is not None:
            self._grant()
        else:
            # _grant's test, inline: most messages leave too little to give back yet (one call less each).
            window, left = self._recv_window, self._recv_left
            if window - self._queued - left >= ((window >> 2 or 1) if left > 0 else 1):
                self._grant()

    def data_begin(self, flow_length: int) -> None:
        """A DATA frame's header: its `flow_length` counts against the stream window now; its payload
        follows in pieces (`data_piece`, `direct_filled`)."""
        self._recv_left -= flow_length
        if self._recv_left < 0:
            raise StreamReset(fr.ErrorCode.FLOW_CONTROL_ERROR, "the peer overran the stream window")
        self._inflight = flow_length

    def data_piece(self, payload: memoryview) -> None:
        """The next piece of the current DATA frame's (unpadded) payload, as it arrived."""
        self._inflight -= len(payload)
        self._assemble(payload)
        self._after_pieces()

    def direct_buffer(self) -> memoryview | None:
        """Where the rest of the message being assembled goes, for the transport to read into; None
        unless one is under way (its prefix arrived)."""
        if self._need and not self._growing and self.reset_code is None:
            return self._into[self._filled :]
        return None

    def direct_filled(self, count: int) -> None:
        """`count` payload bytes were read straight into `direct_buffer`."""
        self._inflight -= count
        self._filled += count
        if self._filled == self._need:
            self._complete()
        self._after_pieces()

    def _after_pieces(self) -> None:
        # Runs per read of a message's bytes (a bulk message takes several): the two calls that most
        # reads would make for nothing are skipped by their own first test, inline (issue 18).
        if not (self._listened and self._gave_back_listened()):
            self._grant_if_stuck()
        if self._messages or self.ended_in or self.reset_code is not None:  # (else _wake_reader does nothing)
            self._wake_reader()

    def _assemble(self, payload: memoryview) -> None:
        max_message = self.conn.config.max_message_size
        pos, size = 0, len(payload)
        while pos < size:
            if not self._need and not self._head and size - pos >= 5:
                length = int.from_bytes(payload[pos + 1 : pos + 5], "big")
                if payload[pos] or length > max_message:  # (the common case costs no call)
                    self._check(payload[pos], length, max_message)
                if size - pos >= 5 + length:  # whole in this payload: one copy, straight out of it
                    self._queue(bytes(payload[pos + 5 : pos + 5 + length]), length + 5)
                    pos += 5 + length
                    continue
                self._start_message(length, size - pos - 5)
                pos += 5
            pos = self._append_partial(payload, pos, max_message)

    def _append_partial(self, payload: memoryview, pos: int, max_message: int) -> int:
        if not self._need:  # the prefix, split across payloads
            head = self._head
            take = min(5 - len(head), len(payload) - pos)
            head += payload[pos : pos + take]
            pos += take
            if len(head) < 5:
                return pos
            length = int.from_bytes(head[1:5], "big")
            flag = head[0]
            head.clear()
            self._check(flag, length, max_message)
            if not length:
                self._queue(b"", 5)
                return pos
            self._start_message(length, len(payload) - pos)
        take = min(self._need - self._filled, len(payload) - pos)
        if self._growing:
            self._message += payload[pos : pos + take]
        else:
            self._into[self._filled : self._filled + take] = payload[pos : pos + take]
        self._filled += take
        if self._filled == self._need:
            self._complete()
        return pos + take

    def _start_message(self, length: int, here: int) -> None:
        """A message of `length` bytes (checked) begins, `here` of them in the payload at hand.

        Allocated once at its length when the peer may send all of it now (the windows bound what a
        peer makes us hold, not the lengths it announces); else it grows as its bytes arrive (and is
        copied once at the end, as any message assembled in pieces used to be).
        """
        self._growing = length > here + self._inflight + max(self._recv_left, 0)
        if self._growing:
            self._message, self._into = bytearray(), _EMPTY_VIEW
        else:
            self._message, self._into = new_message(length)
        self._need = length
        self._filled = 0

    def _complete(self) -> None:
        self._queue(finish(self._message), self._need + 5)
        self._message, self._into = b"", _EMPTY_VIEW
        self._need = self._filled = 0

    def _check(self, flag: int, length: int, max_message: int) -> None:
        if flag & 1:
            self.compressed_received = True
        if length > max_message:
            raise MessageTooLarge(f"received message larger than max ({length} vs. {max_message})")

    def _queue(self, message: bytes, framed: int) -> None:
        listener = self._listener
        if listener is not None and not self._messages and self.reset_code is None and listener(message):
            self._listened = True
            return
        self._messages.append(message)
        self._queued += framed

    def set_listener(self, listener: Callable[[bytes], bool] | None) -> None:
        """Offer each complete message to `listener(message)` as it arrives, while nothing is queued for
        `read` before it: True means it took the message (its window goes back as if read), False
        leaves it queued for `read`, and every later message behind it, in order. It runs inside the
        connection's data_received, so it must not raise or wait. Saves the reader a wake-up per
        message when its consumer keeps up (issue 18)."""
        self._listener = listener

    def set_passthrough(self, passthrough: Callable[[memoryview], bool] | None) -> None:
        """Offer a DATA payload that is exactly one whole uncompressed message, arriving with nothing
        before it (nothing queued, no message under way, nothing more in the same read), to
        `passthrough(payload)` as it is, its 5-byte prefix included: True means it took the message
        (sent it on as is: its window goes back as if read), False leaves it to the usual path
        (listener or queue). The relay's hop with no parsing or copy of the message (issue 18); it
        runs inside the connection's data callback, so it must not raise or wait."""
        self._passthrough = passthrough

    def pass_through(self, payload: memoryview) -> bool:
        """Give a whole DATA payload (no flags, nothing behind it in its read: the connection checks) to
        the passthrough if it qualifies (`set_passthrough`); False, with nothing counted, otherwise. The
        connection checked its own window and counts the frame in it when this returns True."""
        size = len(payload)
        if (
            size < 6
            or size > self._recv_left
            or self._messages
            or self._need
            or self._head
            or self.ended_in
            or self.reset_code is not None
            or payload[0]
            or int.from_bytes(payload[1:5], "big") != size - 5
            or size - 5 > self.conn.config.max_message_size
            or not self._passthrough(payload)  # type: ignore[misc]
        ):
            return False
        self.taken_through(size)
        return True

    def taken_through(self, size: int) -> None:
        """A whole message of `size` DATA bytes went on as it arrived (the passthrough, or the router's
        native front: h2/front.py): its window goes back as if read."""
        self._recv_left = left = self._recv_left - size
        # _taken, inline (per relayed message): its window goes back as if read, grown with the link.
        if self._may_grow and self.conn.stream_window > self._recv_window:
            self._take_up_window()  # (only while the connection's window is above this stream's)
        window = self._recv_window
        if (
            left + self._queued + self._inflight <= window - ((window >> 2 or 1) if left > 0 else 1)
            or self.ended_in
            or self.reset_code is not None
        ):
            self._grant()  # a window update is due (every quarter window): _grant decides, with the budgets
            return
        # Else _grant would send nothing and only count the stream's exposure in its budgets (credit.sync),
        # which is this, inline (three calls less per relayed message, issue 18): the exposure property
        # with nothing queued or under way (checked above), and the budgets told of the change.
        credit = self._credit
        if credit is not None:
            delta = left + self._inflight + self._queued + self._filled - credit.charged
            if delta:
                credit.charged += delta
                if delta > 0:
                    for budget in credit.budgets:
                        budget.hold(delta)
                else:
                    for budget in credit.budgets:
                        budget.unhold(-delta)

    def received_end(self) -> None:
        """The peer's END_STREAM."""
        self.ended_in = True
        if self._credit is not None:
            self._credit.sync(self)  # the peer's open window is no longer its to fill
        self._wake_reader()

    def has_message(self) -> bool:
        """Whether `read` would return at once."""
        return bool(self._messages) or self.ended_in or self.reset_code is not None

    def more_queued(self) -> bool:
        """Whether a complete message is queued for `read` (more of what arrived is waiting)."""
        return bool(self._messages)

    def read_nowait(self) -> bytes | None:
        """The next message if one is queued (None when none is, or at the end: check `has_message`)."""
        if self._messages:
            message = self._messages.popleft()
            self._queued -= len(message) + 5
            self._taken()
            return message
        if self.reset_code is not None:
            raise StreamReset(self.reset_code)
        return None

    async def read(self) -> bytes | None:
        """The next message; None once the peer ended its side; StreamReset if the stream was reset."""
        while not self.has_message():
            self._readable = self._loop.create_future()
            try:
                await self._readable
            finally:
                self._readable = None
        return self.read_nowait()

    def _drop_received(self) -> None:
        """The stream is over abnormally: what it holds is dropped, a message under way included (no more
        of it is taken), and nothing is counted in the budgets again."""
        self._messages.clear()
        self._queued = 0
        self._message, self._into = b"", _EMPTY_VIEW
        self._need = self._filled = 0
        self._release_credit()

    def _wake_reader(self) -> None:
        # Only with something to read: a message taken by the listener, or a piece of one, wakes nobody.
        readable = self._readable
        if (
            readable is not None
            and not readable.done()
            and (self._messages or self.ended_in or self.reset_code is not None)  # (has_message, inline)
        ):
            readable.set_result(None)
