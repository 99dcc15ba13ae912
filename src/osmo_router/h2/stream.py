"""One HTTP/2 stream carrying one gRPC call: its messages in, its messages out, its windows.

Inbound, the stream parses gRPC length-prefixed messages out of DATA payloads and queues them for
`read`; it gives the peer window back only as `read` takes messages, so what a stalled reader
makes us hold is bounded by the window we advertise (plus at most one partial message: a message
larger than the window must be able to arrive whole). Outbound, `write` queues one message and
returns once all of it went to the transport (the peer's windows and the transport's buffer allow
it), so a writer is held back by a peer that does not read, and holds at most one message.

Given byte budgets (`use_budgets`: the router's relay gives a session's streams its user's and the
process's budgets), a stream counts in them as held everything its peer can make it hold: what it
has received and not yet had read, and the window its peer may still fill. It grows its window to
the connection's `stream_window` and gives window back only while every budget has room for it,
except up to `CREDIT_FLOOR` (so it always moves) and what completes a message that has begun.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from osmo_router.h2 import frames as fr
from osmo_router.io.buffers import finish, new_message

if TYPE_CHECKING:
    from osmo_router.h2.connection import Connection

#: Window a stream with budgets may always have, whatever its budgets' room: it never stops.
CREDIT_FLOOR = 64 * 1024

Headers = list[tuple[str, str]]

_EMPTY_VIEW = memoryview(b"")


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


class StreamReset(Exception):
    """The stream ended abnormally: the peer reset it (`code`), we did, or the connection was lost (`code` -1)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or f"stream reset ({code})")
        self.code = code


class MessageTooLarge(Exception):
    """A received message is longer than the connection's max_message_size."""


class Stream:
    """One stream. Created by `Connection.open_stream` (client role) or for the peer's HEADERS (server role)."""

    def __init__(self, conn: Connection, stream_id: int, send_window: int, recv_window: int) -> None:
        self.conn = conn
        self.id = stream_id
        #: The request headers (server role) or response headers (client role), once received.
        self.headers: Headers | None = None
        #: The trailers (client role; for a trailers-only response also the headers), once received.
        self.trailers: Headers | None = None
        #: Set when the peer ended its side (END_STREAM) or the stream was reset.
        self.ended_in = False
        self.reset_code: int | None = None
        self.send_window = send_window
        self.headers_sent = False
        self.closed_out = False  # our END_STREAM went out
        self._recv_window = recv_window  # what we let this stream's peer have unread
        self._recv_left = recv_window  # what the peer may still send before our next WINDOW_UPDATE
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
        self._out: deque[memoryview] = deque()
        self._out_bytes = 0
        self._end_after: Headers | None = None  # trailers to send once the data has gone out
        self._end_pending = False
        self._readable: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._headers_event: asyncio.Future[None] | None = None
        self._loop = asyncio.get_running_loop()  # (asyncio.get_running_loop is a getpid() per call)
        self._closed = self._loop.create_future()
        self._credit: _Credit | None = None  # set by use_budgets
        self._listener: Callable[[bytes], bool] | None = None  # see set_listener
        self._listened = False  # the listener took a message since the window was last looked at
        #: Whether the stream may take up the connection's (grown) window: from the start unless the
        #: connection starts streams smaller (H2Config.initial_stream_window), else once `use_budgets`.
        self._may_grow = recv_window >= conn.config.stream_window

    # -- inbound ---------------------------------------------------------------------------------

    def received_data(self, payload: memoryview, flow_length: int) -> None:
        """A whole DATA payload (padding removed); `flow_length` is what it counted against the windows."""
        self.data_begin(flow_length)
        self._inflight = 0
        self._assemble(payload)
        if not self._gave_back_listened():
            self._grant()
        self._wake_reader()

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
        if not self._gave_back_listened():
            self._grant_if_stuck()
        self._wake_reader()

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
            self._grant()

    def _assemble(self, payload: memoryview) -> None:
        max_message = self.conn.config.max_message_size
        pos, size = 0, len(payload)
        while pos < size:
            if not self._need and not self._head and size - pos >= 5:
                length = int.from_bytes(payload[pos + 1 : pos + 5], "big")
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

    def _grant(self) -> None:
        """Give the peer back the window its read messages used (in steps of a quarter window)."""
        if self.ended_in or self.reset_code is not None:
            if self._credit is not None:
                self._credit.sync(self)
            return
        grant = self._recv_window - self._queued - self._recv_left - self._inflight
        # Worth sending: a quarter window, or anything to a peer that has no window left.
        least = max(self._recv_window >> 2, 1) if self._recv_left > 0 else 1
        # The budgets only ever lower a grant: one too small to send is not put to them (per message).
        if grant >= least:
            if self._credit is not None:
                grant = self._credit.allowed(self, grant)
            if grant >= least:
                self._recv_left += grant
                self.conn.send_window_update(self.id, grant)
        if self._credit is not None:
            self._credit.sync(self)

    def use_budgets(self, budgets: tuple[ByteBudget, ...]) -> None:
        """Take up the connection's full stream window from now on; with `budgets`, count what this
        stream holds and may receive in them, and grow only as they have room (see the module
        docstring). Once (the relay calls it for every stream it reads)."""
        if (self._may_grow and (self._credit is not None or not budgets)) or self.closed:
            return
        self._may_grow = True
        if budgets:
            self._credit = _Credit(budgets)
        self._take_up_window()
        self._grant()

    def _taken(self) -> None:
        """A message left the stream (read, or taken by the listener): give its window back, grown with
        the link if the connection's window grew (h2/bdp.py: a stream takes that up as it reads)."""
        if self._may_grow:
            self._take_up_window()
        self._grant()

    def _take_up_window(self) -> None:
        """Let the peer have up to the connection's stream window now (it grows with the link)."""
        self._recv_window = max(self._recv_window, self.conn.stream_window)

    @property
    def exposure(self) -> int:
        """Bytes this stream holds unread (a message under way included) plus the window its peer has
        filled (a DATA frame still arriving) or may still fill."""
        open_window = 0 if self.ended_in or self.reset_code is not None else max(0, self._recv_left)
        return open_window + self._inflight + self._queued + self._filled + len(self._head)

    def _missing(self) -> int:
        """Window the message under way still needs beyond what the peer may send now."""
        missing = self._need - self._filled if self._need else (5 - len(self._head) if self._head else 0)
        return max(0, missing - self._recv_left - self._inflight)

    def _wake_reader(self) -> None:
        # Only with something to read: a message taken by the listener, or a piece of one, wakes nobody.
        if self._readable is not None and not self._readable.done() and self.has_message():
            self._readable.set_result(None)

    # -- outbound --------------------------------------------------------------------------------

    def send_headers(self, headers: Headers, end_stream: bool = False) -> None:
        """Send HEADERS now (request or response headers; with end_stream, a trailers-only response)."""
        self.headers_sent = True
        self.conn.send_headers(self, headers, end_stream)
        if end_stream:
            self.end_sent()

    def write_nowait(self, message: bytes | bytearray | memoryview) -> None:
        """Queue one gRPC message and send what the windows allow; never waits."""
        if self.closed_out or self._end_pending:
            raise StreamReset(fr.ErrorCode.STREAM_CLOSED, "write after the end of the stream")
        if self.reset_code is not None:
            raise StreamReset(self.reset_code)
        self._out.append(memoryview(b"\x00" + len(message).to_bytes(4, "big")))
        if message:
            self._out.append(memoryview(message))
        self._out_bytes += 5 + len(message)
        self.conn.flush(self)

    def try_write(self, message: bytes) -> bool:
        """Send one gRPC message at once if it can all go to the transport now (nothing queued before it,
        the windows open); False otherwise, with nothing done (use `write`). Never raises."""
        if self.closed_out or self._end_pending or self.reset_code is not None or not self.headers_sent:
            return False
        return self.conn.try_send(self, message)

    async def write(self, message: bytes | bytearray | memoryview) -> None:
        """Queue one gRPC message; return once it all went to the transport (StreamReset if the stream ends)."""
        self.write_nowait(message)
        await self.drained()

    async def drained(self) -> None:
        """Wait until everything queued went to the transport."""
        while self._out_bytes or self.conn.write_paused:
            if self.reset_code is not None:
                raise StreamReset(self.reset_code)
            self._drained = asyncio.get_running_loop().create_future()
            self.conn.drain_waiters.add(self)
            try:
                await self._drained
            finally:
                self._drained = None
                self.conn.drain_waiters.discard(self)
        if self.reset_code is not None:
            raise StreamReset(self.reset_code)

    def end(self, trailers: Headers | None = None) -> None:
        """End our side once the queued data went out: with trailers (server role), else an empty END_STREAM DATA."""
        if self.closed_out or self._end_pending or self.reset_code is not None:
            return
        self._end_pending = True
        self._end_after = trailers
        self.conn.flush(self)

    @property
    def unsent(self) -> int:
        """Bytes queued and not yet written to the transport."""
        return self._out_bytes

    def take(self, room: int) -> list[memoryview]:
        """Up to `room` queued bytes, as views (for the connection's DATA frames)."""
        pieces: list[memoryview] = []
        out = self._out
        taken = 0
        while room and out:
            head = out[0]
            if len(head) <= room:
                pieces.append(out.popleft())
                room -= len(head)
                taken += len(head)
            else:
                pieces.append(head[:room])
                out[0] = head[room:]
                taken += room
                room = 0
        self._out_bytes -= taken
        self.send_window -= taken
        return pieces

    def pending_end(self) -> tuple[bool, Headers | None]:
        """(True, trailers) once the data went out and an end is due (the connection sends it)."""
        return (self._end_pending and not self._out_bytes and not self.closed_out), self._end_after

    def end_sent(self) -> None:
        """Our END_STREAM went out (the connection calls it)."""
        self.closed_out = True
        self._end_pending = False
        self.conn.maybe_forget(self)

    def notify_drained(self) -> None:
        """Wake the writer waiting in `drained` (all went out, or the stream ended)."""
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def reset(self, code: int = fr.ErrorCode.CANCEL) -> None:
        """Reset the stream (RST_STREAM to the peer); what is queued either way is dropped."""
        if self.reset_code is None and not (self.closed_out and self.ended_in):
            self.conn.send_reset(self, code)
        self.gone(code)

    def gone(self, code: int) -> None:
        """The stream is over abnormally (reset by either side, or connection lost): wake everyone."""
        if self.reset_code is None and not (self.closed_out and self.ended_in):
            self.reset_code = code
        self._out.clear()
        self._out_bytes = 0
        self._messages.clear()
        self._queued = 0
        self._message, self._into = b"", _EMPTY_VIEW  # a message under way is dropped: no more of it is taken
        self._need = self._filled = 0
        if self._credit is not None:
            self._credit.release()
            self._credit = None  # over: nothing is counted again
        self._wake_reader()
        self.notify_drained()
        self.headers_arrived()
        if not self._closed.done():
            self._closed.set_result(None)
        self.conn.maybe_forget(self, force=True)

    def stop_sending(self) -> None:
        """The peer, its response complete, asked us to stop sending (RST_STREAM NO_ERROR): drop what is
        queued out and close our side, but keep the messages received for `read` (RFC 9113 8.1)."""
        self._out.clear()
        self._out_bytes = 0
        self._end_pending = False
        self.closed_out = True
        self.notify_drained()
        self.maybe_closed()
        self.conn.maybe_forget(self)

    def maybe_closed(self) -> None:
        """Both sides ended normally: the stream is closed."""
        if self.closed_out and self.ended_in and not self._closed.done():
            if self._credit is not None:
                self._credit.release()
                self._credit = None
            self._closed.set_result(None)

    # -- client role: the response --------------------------------------------------------------

    def headers_arrived(self) -> None:
        """The response headers (or trailers-only) arrived, or the stream ended."""
        if self._headers_event is not None and not self._headers_event.done():
            self._headers_event.set_result(None)

    async def response_headers(self) -> Headers:
        """The response headers (for a trailers-only response, the trailers); StreamReset if reset first."""
        while self.headers is None and self.reset_code is None:
            self._headers_event = asyncio.get_running_loop().create_future()
            await self._headers_event
        if self.headers is None:
            raise StreamReset(self.reset_code if self.reset_code is not None else -1)
        return self.headers

    async def wait_closed(self) -> None:
        """Until the stream is closed (both sides ended, or reset, or the connection lost)."""
        await asyncio.shield(self._closed)

    @property
    def closed(self) -> bool:
        """Whether the stream is over."""
        return self._closed.done()

    def add_close_callback(self, callback: object) -> None:
        """Call `callback(future)` once the stream is over."""
        self._closed.add_done_callback(callback)  # type: ignore[arg-type]


class _Credit:
    """A stream's bytes counted as held in byte budgets (see the module docstring)."""

    __slots__ = ("budgets", "charged")

    def __init__(self, budgets: tuple[ByteBudget, ...]) -> None:
        self.budgets = budgets
        self.charged = 0

    def allowed(self, stream: Stream, grant: int) -> int:
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
        return min(grant, max(CREDIT_FLOOR - stream.exposure, stream._missing()))

    def sync(self, stream: Stream) -> None:
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
