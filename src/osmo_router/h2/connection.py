"""An HTTP/2 connection for gRPC on an asyncio BufferedProtocol, in either role (client or server).

API (stable; add, don't rename):

    config = H2Config(stream_window=2 << 20, max_message_size=4 << 20, keepalive_time=20.0)

    # Server role: one Connection per accepted transport; `on_stream(stream)` is called for every
    # new stream once its request HEADERS arrived (`stream.headers`, a list of (name, value)).
    loop.create_server(lambda: Connection("server", config, on_stream=handle), host, port, ssl=ctx)

    # Client role: the connection sends the preface and SETTINGS itself.
    transport, conn = await loop.create_connection(lambda: Connection("client", config), host, port)
    await conn.ready()                                   # the peer's SETTINGS arrived
    stream = await conn.open_stream([(":method", "POST"), (":scheme", "http"), (":path", "/pkg.Svc/M"),
                                     (":authority", host), ("content-type", "application/grpc"), ("te", "trailers")])
    await stream.write(message_bytes)                    # one gRPC message (prefix added here)
    stream.end()                                         # client half-close (END_STREAM)
    headers = await stream.response_headers()            # response headers (or trailers-only)
    message = await stream.read()                        # bytes, or None at the peer's END_STREAM
    trailers = stream.trailers                           # after read() returned None: grpc-status etc.

    # Server role, in the handler of a stream:
    stream.send_headers([(":status", "200"), ("content-type", "application/grpc")])
    await stream.write(response_bytes)
    stream.end([("grpc-status", "0")])                   # trailers, sent after the queued data
    stream.reset(ErrorCode.CANCEL)                       # or: RST_STREAM, dropping what is queued

    conn.goaway()                  # graceful: no new streams; closes once the running ones end
    conn.close()                   # every stream gets StreamReset(-1); what is queued goes out, then FIN
                                   # (the peer's bytes are read and dropped until its EOF, LINGER s at most)
    await conn.wait_closed()

`stream.read()`/`write()` raise `StreamReset` once the stream was reset by either side or the
connection was lost; `stream.add_close_callback(cb)` runs when the stream is over (a server uses it
to cancel the handler of a call whose peer went away).

Flow control: each stream's receive window (`stream_window`) is given back only as `read` takes
messages (stream.py), so a stream whose reader stalls holds at most its window (plus one partial
message); the connection window is given back on receipt, so one stalled stream never blocks the
others. Outbound DATA follows the peer's stream and connection windows, its INITIAL_WINDOW_SIZE
changes and MAX_FRAME_SIZE, and stops while the transport's buffer is full (pause_writing).

The parts of Connection, by concern: core.py (the state, frames out, the stream table), flow.py (the
windows, WINDOW_UPDATE, outbound DATA), handshake.py (preface, SETTINGS, PING) and dispatch.py (the
other frames in). This module keeps the asyncio protocol, DATA as it arrives (the hot path, called by
h2/reader.py on the class itself), opening streams (client role) and the end of the connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from osmo_router.h2 import frames as fr
from osmo_router.h2.bdp import BDP_PING
from osmo_router.h2.config import H2Config
from osmo_router.h2.dispatch import FrameDispatch
from osmo_router.h2.handshake import settings_first
from osmo_router.h2.stream import Headers, MessageTooLarge, Stream, StreamReset
from osmo_router.h2.writer import VectorWriter
from osmo_router.io.send_buffer import bound_send_buffer, is_tcp

if TYPE_CHECKING:
    from osmo_router.h2.front import LaneTarget

log = logging.getLogger(__name__)

__all__ = ["Connection", "ConnectionClosed", "H2Config", "Stream", "StreamReset"]


def plain_tcp_socket(transport: Any) -> socket.socket | None:
    """The transport's TCP socket if its bytes are the connection's own (no TLS), else None.

    The reader sets its SO_RCVLOWAT on large DATA frames (h2/reader.py); uvloop's is a PseudoSocket,
    whose setsockopt works on the descriptor.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_extra_info("sslcontext") is not None:
        return None
    if transport.get_extra_info("ssl_object") is not None:
        return None
    return sock if is_tcp(sock) else None


class ConnectionClosed(Exception):
    """The connection is closed or going away: no new stream can be opened."""


class Connection(FrameDispatch, asyncio.BufferedProtocol):
    """One HTTP/2 connection (see the module docstring for the API; its constructor and state: core.py)."""

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        """Send our preface (client) and SETTINGS, open the connection window, start the timers."""
        self.transport = transport
        self._output = VectorWriter(transport)
        self.peer_address = transport.get_extra_info("peername")
        self._reader.use_socket(plain_tcp_socket(transport))
        bound_send_buffer(transport.get_extra_info("socket"))
        transport.writelines(self._opening_frames())
        self._timers.start()

    def connection_lost(self, exc: Exception | None) -> None:
        """Every stream still open is reset (-1): readers, writers and close callbacks wake."""
        self.closed = True
        self.write_paused = False  # no transport is left to wait for
        self._reader.use_socket(None)
        if self._front is not None:
            log.debug(
                "h2 connection to %s closed; %d messages passed on by the native front",
                self.peer_address,
                self._front.passed,
            )
            self._front.close()
        self._timers.cancel()
        if self._linger is not None:
            self._linger.cancel()
        if self._bdp is not None:
            self._bdp.cancel()
        self._end_streams()
        # Writers of streams already over (ended by the peer while the transport was paused, so no
        # longer in the table) wait for the transport too: nothing else would wake them now.
        waiters, self.drain_waiters = self.drain_waiters, set()
        for stream in waiters:
            stream.notify_drained()
        for waiter in self._slot_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionClosed("connection lost"))
        if not self._ready.done():
            self._ready.set_exception(ConnectionClosed("connection lost before SETTINGS"))
            self._ready.exception()  # nobody may wait for it: no "never retrieved" warning
        if not self._closed.done():
            self._closed.set_result(None)
        if self.on_close is not None:
            self.on_close(self)

    def pause_writing(self) -> None:
        """The transport's buffer is full: hold DATA until it drains."""
        self.write_paused = True

    def resume_writing(self) -> None:
        """The transport drained: send what the windows allow."""
        self.write_paused = False
        self._control_backlog = 0
        self._flush_blocked()

    # get_buffer and buffer_updated (asyncio.BufferedProtocol) are the reader's (h2/reader.py), set on
    # each connection in its constructor (core.py): every frame in, DATA as it arrives, protocol errors
    # ending the connection with GOAWAY.

    def data_received(self, data: bytes) -> None:
        """The same for a transport that hands over bytes (copied into the read buffers)."""
        view = memoryview(data)
        while view and not self.closed:
            target = self.get_buffer(len(view))
            take = min(len(target), len(view))
            target[:take] = view[:take]
            view = view[take:]
            self.buffer_updated(take)

    # -- DATA as it arrives (h2/reader.py's DataSink) ------------------------------------------------

    def input_pending(self) -> bool:
        """Whether more has arrived behind what is being delivered now (the same read holds more frames)."""
        return self._reader.pending > 0

    def on_frame(self, frame: fr.Frame) -> None:
        """A whole frame from the reader."""
        self._handle(frame)

    def data_begin(self, stream_id: int, flags: int, length: int) -> None:
        """An unpadded DATA frame's header: the windows count it now; its payload follows."""
        if not self._settings_received:
            raise settings_first()
        self._data_stream = None
        self._data_end_stream = bool(flags & fr.END_STREAM)
        self._data_flow = length
        stream = self._data_target(stream_id, length)
        if stream is None:
            return
        try:
            stream.data_begin(length)
        except StreamReset as err:
            stream.reset(err.code)
            return
        self._data_stream = stream

    def data_frame(self, stream_id: int, flags: int, payload: memoryview, last: bool, flow: int = -1) -> None:
        """A whole DATA frame at once (what data_begin, data_piece and data_end do for an unpadded one that
        arrived in one read: a small message's frame, in one call instead of three); `last`: nothing more came
        behind it in the same read (only then may it pass through, Stream.set_passthrough).

        Every small message any process receives comes here, and so does a PADDED frame parsed whole
        (dispatch.py `_on_data`, `flow`: its payload and padding, what counts against the windows).
        """
        if not self._settings_received:
            raise settings_first()
        size = len(payload) if flow < 0 else flow
        # The connection window and the BDP sample count it, as _data_target and data_end do for a frame
        # that arrives in pieces (inline: this runs per message received or relayed, issue 18).
        self._recv_unacked += size
        if self._recv_unacked >= self._connection_window >> 2:
            if self._recv_unacked > self._connection_window:
                raise fr.ProtocolError(fr.ErrorCode.FLOW_CONTROL_ERROR, "the peer overran the connection window")
            self._give_connection_window()
        bdp = self._bdp
        if bdp is not None and bdp.active and bdp.on_data(size):
            self.write_frame(fr.encode(fr.PING, 0, 0, BDP_PING))
        stream = self.streams.get(stream_id)
        if (
            last
            and not flags  # (a burst is left to the reader, whose writer can merge it)
            and stream is not None
            and stream._passthrough is not None
            and stream.pass_through(payload)
        ):
            front = self._front
            if front is not None and stream_id not in front.lanes:  # (the next ones may pass in C)
                front.open_relay_lane(stream)
            return
        if stream is None or stream.ended_in:
            if stream_id > self._last_peer_id and stream_id % 2 != self._next_id % 2:
                raise fr.ProtocolError(fr.ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream we reset or closed: its bytes still counted for the connection window
        if stream.reset_code is not None:
            return
        try:
            stream.received_data(payload, size)
        except StreamReset as err:
            stream.reset(err.code)
            return
        except MessageTooLarge as err:
            self._too_large(stream, str(err))
            return
        if flags & fr.END_STREAM and stream.reset_code is None:
            self._peer_ended(stream)

    def count_received(self, size: int) -> None:
        """`size` DATA bytes passed on by the native front (h2/front.py): the connection window and the BDP
        sample count them, as data_frame does (inline there: per message)."""
        self._recv_unacked += size
        if self._recv_unacked >= self._connection_window >> 2:
            if self._recv_unacked > self._connection_window:
                raise fr.ProtocolError(fr.ErrorCode.FLOW_CONTROL_ERROR, "the peer overran the connection window")
            self._give_connection_window()
        bdp = self._bdp
        if bdp is not None and bdp.active and bdp.on_data(size):
            self.write_frame(fr.encode(fr.PING, 0, 0, BDP_PING))

    def open_lane(self, stream: Stream, listener: Callable[[bytes], bool], target: LaneTarget | None) -> None:
        """Let the native front pass `stream`'s data messages to `target` while `listener` is the stream's
        listener (None: no longer); nothing without a front (h2/front.py)."""
        if self._front is not None and stream.id in self.streams:
            self._front.open_lane(stream, listener, target)

    def data_piece(self, payload: memoryview) -> None:
        """The next bytes of the current DATA frame's payload."""
        stream = self._data_stream
        if stream is None:
            return
        if stream.reset_code is not None:  # reset while its frame was arriving: the rest is dropped
            self._data_stream = None
            return
        try:
            stream.data_piece(payload)
        except MessageTooLarge as err:
            self._data_stream = None
            self._too_large(stream, str(err))

    def data_buffer(self) -> memoryview | None:
        """The message under way on the current DATA frame's stream, to read into directly."""
        stream = self._data_stream
        return stream.direct_buffer() if stream is not None else None

    def data_filled(self, count: int) -> None:
        """`count` bytes were read into `data_buffer`."""
        if self._data_stream is not None:
            self._data_stream.direct_filled(count)

    def data_end(self) -> None:
        """The current DATA frame is complete: its END_STREAM, if it had one."""
        self._count_for_bdp(self._data_flow)
        stream, self._data_stream = self._data_stream, None
        if stream is not None and self._data_end_stream and stream.reset_code is None:
            self._peer_ended(stream)

    # -- client role: opening streams -------------------------------------------------------------------

    async def ready(self) -> None:
        """Until the peer's SETTINGS arrived (ConnectionClosed if the connection was lost first)."""
        await asyncio.shield(self._ready)

    async def open_stream(self, headers: Headers, end_stream: bool = False) -> Stream:
        """Open a stream with these request headers (waits for a slot under the peer's MAX_CONCURRENT_STREAMS)."""
        while True:
            if self.closed or self.lingering or self._goaway_received or self._goaway_sent:
                raise ConnectionClosed("the connection is closed or going away")
            if len(self.streams) < self._peer_max_streams:
                break
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            await waiter
        stream = Stream(self, self._next_id, self._peer_window, self.config.initial_window)
        self._next_id += 2
        self.streams[stream.id] = stream
        self._timers.busy()
        stream.send_headers(headers, end_stream)
        return stream

    # -- ending -------------------------------------------------------------------------------------------

    def goaway(self, code: int = fr.ErrorCode.NO_ERROR, debug: str = "") -> None:
        """Graceful: refuse new streams, let the running ones finish, close once none is left."""
        if not self._goaway_sent:
            self._goaway_sent = True
            self.write_frame(fr.goaway(self._last_peer_id, code, debug.encode()))
        self._close_if_done()

    def fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY with `code`, then close."""
        log.debug("h2 connection error %s: %s", code, message)
        if not self._goaway_sent:
            self._goaway_sent = True
            self.write_frame(fr.goaway(self._last_peer_id, code, message.encode()[:256]))
        self.close()

    def abort(self) -> None:
        """Drop the transport without flushing its buffer."""
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        """Until the connection is lost or closed."""
        await asyncio.shield(self._closed)
