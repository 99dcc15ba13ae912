"""One HTTP/2 stream carrying one gRPC call: its messages in, its messages out, its windows.

Inbound (h2/inbound.py), the stream parses gRPC messages out of DATA payloads and gives the peer
window back only as they are taken; with byte budgets it counts what it holds in them
(h2/credit.py). Outbound (here), `write` queues one message and returns once all of it went to the
transport (the peer's windows and the transport's buffer allow it), so a writer is held back by a
peer that does not read, and holds at most one message.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from osmo_router.h2 import frames as fr
from osmo_router.h2.credit import CREDIT_FLOOR
from osmo_router.h2.inbound import MessageTooLarge, StreamInbound, StreamReset

if TYPE_CHECKING:
    from osmo_router.h2.connection import Connection

Headers = list[tuple[str, str]]


class Stream(StreamInbound):
    """One stream. Created by `Connection.open_stream` (client role) or for the peer's HEADERS (server role)."""

    def __init__(self, conn: Connection, stream_id: int, send_window: int, recv_window: int) -> None:
        super().__init__(conn, stream_id, recv_window)
        #: The request headers (server role) or response headers (client role), once received.
        self.headers: Headers | None = None
        #: The trailers (client role; for a trailers-only response also the headers), once received.
        self.trailers: Headers | None = None
        self.send_window = send_window
        self.headers_sent = False
        self.closed_out = False  # our END_STREAM went out
        self._out: deque[memoryview] = deque()
        self._out_bytes = 0
        self._end_after: Headers | None = None  # trailers to send once the data has gone out
        self._end_pending = False
        self._drained: asyncio.Future[None] | None = None
        self._headers_event: asyncio.Future[None] | None = None

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
        return self.conn.send_now(self, len(message) + 5, message, False)

    def try_write_framed(self, framed: memoryview) -> bool:
        """`try_write` of a message with its gRPC prefix, as another stream received it (pass_through)."""
        if self.closed_out or self._end_pending or self.reset_code is not None or not self.headers_sent:
            return False
        return self.conn.send_now(self, len(framed), framed, True)

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
        self.maybe_closed()  # (the peer may have ended first: its uncounted charge goes back then)
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
        if self.ended_in and self.conn.role == "client":
            # The response was complete (its trailers came) before the reset or the connection's loss:
            # what the server sent before them stays readable, as after a normal close (maybe_closed).
            # A command's last output and its exit status are not lost to a router exiting right after.
            self._release_credit()
        else:
            self._drop_received()
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
            self._release_credit()
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


__all__ = ["CREDIT_FLOOR", "Headers", "MessageTooLarge", "Stream", "StreamReset"]
