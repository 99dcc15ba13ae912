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
    conn.close()                   # at once: every stream gets StreamReset(-1)
    await conn.wait_closed()

`stream.read()`/`write()` raise `StreamReset` once the stream was reset by either side or the
connection was lost; `stream.add_close_callback(cb)` runs when the stream is over (a server uses it
to cancel the handler of a call whose peer went away).

Flow control: each stream's receive window (`stream_window`) is given back only as `read` takes
messages (stream.py), so a stream whose reader stalls holds at most its window (plus one partial
message); the connection window is given back on receipt, so one stalled stream never blocks the
others. Outbound DATA follows the peer's stream and connection windows, its INITIAL_WINDOW_SIZE
changes and MAX_FRAME_SIZE, and stops while the transport's buffer is full (pause_writing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, Literal

import hpack

from osmo_router.h2 import frames as fr
from osmo_router.h2.bdp import BDP_PING, BdpEstimator
from osmo_router.h2.config import H2Config
from osmo_router.h2.reader import FrameReader
from osmo_router.h2.stream import Headers, MessageTooLarge, Stream, StreamReset
from osmo_router.h2.timers import Timers
from osmo_router.h2.writer import VectorWriter

log = logging.getLogger(__name__)

#: Client role: DATA bytes written with one writelines at most (see Connection.flush).
FLUSH_BATCH = 256 * 1024
#: Up to this size (frame payload) a message written by `try_send` is joined with its header into one buffer.
SMALL_MESSAGE = 4096

__all__ = ["Connection", "ConnectionClosed", "H2Config", "Stream", "StreamReset"]


class ConnectionClosed(Exception):
    """The connection is closed or going away: no new stream can be opened."""


class Connection(asyncio.BufferedProtocol):
    """One HTTP/2 connection (see the module docstring for the API)."""

    def __init__(
        self,
        role: Literal["client", "server"],
        config: H2Config | None = None,
        on_stream: Callable[[Stream], None] | None = None,
        on_close: Callable[[Connection], None] | None = None,
    ) -> None:
        self.role = role
        self.config = config or H2Config()
        self.on_stream = on_stream
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.write_paused = False
        self.closed = False
        self._parser = fr.FrameParser(self.config.max_frame_size, self.config.max_header_list_size)
        self._reader = FrameReader(self._parser, self)
        self._preface_view = memoryview(bytearray(len(fr.PREFACE)))
        self._data_stream: Stream | None = None  # the stream of the DATA frame arriving
        self._data_end_stream = False  # whether that frame has END_STREAM
        self._data_flow = 0  # and its length
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=self.config.max_header_list_size)
        self._preface_pending = role == "server"
        self._settings_received = False
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._next_id = 1 if role == "client" else 2
        self._last_peer_id = 0
        self._peer_window = fr.DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self._peer_max_frame = fr.DEFAULT_MAX_FRAME
        self._peer_max_streams = 2**31 - 1
        self.send_window = fr.DEFAULT_WINDOW  # connection-level, outbound
        self._recv_unacked = 0  # connection-level, inbound: received and not yet given back
        #: Our receive windows now: what a reading stream may have unread (grows with the link, h2/bdp.py),
        #: and the connection's.
        self.stream_window = self.config.stream_window
        self._connection_window = max(self.config.connection_window, fr.DEFAULT_WINDOW)
        grows = self.config.max_stream_window > self.config.stream_window
        self._bdp = BdpEstimator(self.config.stream_window, self.config.max_stream_window) if grows else None
        self._blocked: dict[int, Stream] = {}  # streams with data waiting for a window or the transport
        #: Streams whose writer waits in `drained` (woken once the transport takes data again).
        self.drain_waiters: set[Stream] = set()
        self._goaway_sent = False
        self._goaway_received = False
        self._slot_waiters: list[asyncio.Future[None]] = []
        self._timers = Timers(self)
        self.peer_address: Any = None

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        """Send our preface (client) and SETTINGS, open the connection window, start the timers."""
        self.transport = transport
        self._output = VectorWriter(transport)
        self.peer_address = transport.get_extra_info("peername")
        config = self.config
        settings = {
            fr.SETTINGS_INITIAL_WINDOW_SIZE: config.initial_window,
            fr.SETTINGS_MAX_FRAME_SIZE: config.max_frame_size,
            fr.SETTINGS_MAX_HEADER_LIST_SIZE: config.max_header_list_size,
        }
        if self.role == "server":
            settings[fr.SETTINGS_MAX_CONCURRENT_STREAMS] = config.max_concurrent_streams
        else:
            settings[fr.SETTINGS_ENABLE_PUSH] = 0
        out = [fr.encode_settings(settings)]
        if self.role == "client":
            out.insert(0, fr.PREFACE)
        if config.connection_window > fr.DEFAULT_WINDOW:
            out.append(fr.window_update(0, config.connection_window - fr.DEFAULT_WINDOW))
        transport.writelines(out)
        self._timers.start()

    def connection_lost(self, exc: Exception | None) -> None:
        """Every stream still open is reset (-1): readers, writers and close callbacks wake."""
        self.closed = True
        self._timers.cancel()
        for stream in list(self.streams.values()):
            stream.gone(-1)
        self.streams.clear()
        self._blocked.clear()
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
        self._flush_blocked()

    def get_buffer(self, sizehint: int) -> memoryview:
        """asyncio.BufferedProtocol: where the transport reads to (see h2/reader.py)."""
        if self._preface_pending:
            return self._preface_view
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        """Handle every complete frame (and DATA as it arrives); protocol errors end the connection with GOAWAY."""
        try:
            if self._preface_pending:
                self._take_preface(nbytes)
            else:
                self._reader.buffer_updated(nbytes)
        except fr.ProtocolError as err:
            self.fail(err.code, str(err))
            return
        if self._recv_unacked >= self._connection_window >> 2:
            self.write_frame(fr.window_update(0, self._recv_unacked))
            self._recv_unacked = 0

    def data_received(self, data: bytes) -> None:
        """The same for a transport that hands over bytes (copied into the read buffers)."""
        view = memoryview(data)
        while view and not self.closed:
            target = self.get_buffer(len(view))
            take = min(len(target), len(view))
            target[:take] = view[:take]
            view = view[take:]
            self.buffer_updated(take)

    def _take_preface(self, count: int) -> None:
        # The client preface is read into a buffer of its own size: nothing past it is read with it.
        buf = self._timers.preface_buf
        buf += self._preface_view[:count]
        if len(buf) < len(fr.PREFACE):
            self._preface_view = memoryview(bytearray(len(fr.PREFACE) - len(buf)))
            if not fr.PREFACE.startswith(bytes(buf)):
                self.close()
            return
        self._preface_pending = False
        if buf != fr.PREFACE:
            self.close()
        buf.clear()

    # -- frames in ------------------------------------------------------------------------------------

    def _handle(self, frame: fr.Frame) -> None:
        if not self._settings_received and not (frame.kind == fr.SETTINGS and not frame.flags & fr.ACK):
            raise fr.ProtocolError(fr.ErrorCode.PROTOCOL_ERROR, "the first frame must be SETTINGS")
        handler = self._handlers.get(frame.kind)
        if handler is not None:  # unknown frame types (and PRIORITY, PUSH_PROMISE to a server) are ignored
            handler(self, frame)

    # -- DATA as it arrives (h2/reader.py's DataSink) ------------------------------------------------

    def on_frame(self, frame: fr.Frame) -> None:
        """A whole frame from the reader."""
        self._handle(frame)

    def data_begin(self, stream_id: int, flags: int, length: int) -> None:
        """An unpadded DATA frame's header: the windows count it now; its payload follows."""
        if not self._settings_received:
            raise fr.ProtocolError(fr.ErrorCode.PROTOCOL_ERROR, "the first frame must be SETTINGS")
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

    def _count_for_bdp(self, flow: int) -> None:
        """A DATA frame arrived whole: its bytes count for the bandwidth sample (h2/bdp.py)."""
        if self._bdp is not None and self._bdp.on_data(flow):
            self.write_frame(fr.encode(fr.PING, 0, 0, BDP_PING))

    def _data_target(self, stream_id: int, flow: int) -> Stream | None:
        """Count a DATA frame against the connection window; its stream, if it still takes data."""
        self._recv_unacked += flow
        if self._recv_unacked > self._connection_window:
            raise fr.ProtocolError(fr.ErrorCode.FLOW_CONTROL_ERROR, "the peer overran the connection window")
        stream = self.streams.get(stream_id)
        if stream is None or stream.ended_in:
            if stream_id > self._last_peer_id and stream_id % 2 != self._next_id % 2:
                raise fr.ProtocolError(fr.ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
            return None  # a stream we reset or closed: its bytes still count for the connection window
        return stream

    def _on_data(self, frame: fr.Frame) -> None:
        # A PADDED DATA frame, parsed whole (unpadded ones come piecewise: data_begin above).
        flow = frame.flow
        stream = self._data_target(frame.stream_id, flow)
        self._count_for_bdp(flow)
        if stream is None:
            return
        try:
            stream.received_data(frame.payload, flow)
        except StreamReset as err:
            stream.reset(err.code)
            return
        except MessageTooLarge as err:
            self._too_large(stream, str(err))
            return
        if frame.flags & fr.END_STREAM:
            self._peer_ended(stream)

    def _too_large(self, stream: Stream, message: str) -> None:
        from osmo_router.h2.grpc import RESOURCE_EXHAUSTED, status_trailers

        if self.role == "client" or stream.closed_out:
            stream.reset(fr.ErrorCode.CANCEL)
            return
        # The status at once (data still queued is dropped with the reset that follows).
        trailers = status_trailers(RESOURCE_EXHAUSTED, message, headers=not stream.headers_sent)
        stream.send_headers(trailers, end_stream=True)
        # NO_ERROR: the response is complete, the client need not send the rest (RFC 9113 8.1).
        stream.reset(fr.ErrorCode.NO_ERROR)

    def _on_headers(self, frame: fr.Frame) -> None:
        try:
            headers = [(_str(k), _str(v)) for k, v in self._decoder.decode(bytes(frame.payload))]
        except Exception as err:  # hpack's errors, oversized lists included
            raise fr.ProtocolError(fr.ErrorCode.COMPRESSION_ERROR, f"bad header block: {err}") from None
        stream = self.streams.get(frame.stream_id)
        if stream is not None:
            self._more_headers(stream, headers, frame.flags)
        elif self.role == "server" and frame.stream_id > self._last_peer_id:
            self._new_stream(frame.stream_id, headers, frame.flags)
        elif frame.stream_id > self._last_peer_id or frame.stream_id % 2 == self._next_id % 2:
            if frame.stream_id >= self._next_id:
                raise fr.ProtocolError(fr.ErrorCode.PROTOCOL_ERROR, "HEADERS on an idle stream")

    def _new_stream(self, stream_id: int, headers: Headers, flags: int) -> None:
        if stream_id % 2 == 0:
            raise fr.ProtocolError(fr.ErrorCode.PROTOCOL_ERROR, "even stream id from a client")
        self._last_peer_id = stream_id
        if self._goaway_sent or len(self.streams) >= self.config.max_concurrent_streams:
            self.write_frame(fr.rst_stream(stream_id, fr.ErrorCode.REFUSED_STREAM))
            return
        stream = Stream(self, stream_id, self._peer_window, self.config.initial_window)
        stream.headers = headers
        self.streams[stream_id] = stream
        self._timers.busy()
        if flags & fr.END_STREAM:
            stream.received_end()
        if self.on_stream is not None:
            self.on_stream(stream)

    def _more_headers(self, stream: Stream, headers: Headers, flags: int) -> None:
        if self.role == "client" and stream.headers is None:
            stream.headers = headers
            if flags & fr.END_STREAM:
                stream.trailers = headers
            stream.headers_arrived()
        elif flags & fr.END_STREAM:
            stream.trailers = headers
        else:
            stream.reset(fr.ErrorCode.PROTOCOL_ERROR)
            return
        if flags & fr.END_STREAM:
            self._peer_ended(stream)

    def _peer_ended(self, stream: Stream) -> None:
        stream.received_end()
        stream.maybe_closed()
        self.maybe_forget(stream)

    def _on_rst_stream(self, frame: fr.Frame) -> None:
        stream = self.streams.get(frame.stream_id)
        if stream is None:
            return
        code = int.from_bytes(frame.payload, "big")
        if code == fr.ErrorCode.NO_ERROR and stream.ended_in and self.role == "client":
            # A complete response, then "stop sending" (RFC 9113 8.1): the response stays readable.
            stream.stop_sending()
            return
        stream.gone(code)
        if self.role == "server" and not self._timers.peer_reset_allowed():
            raise fr.ProtocolError(fr.ErrorCode.ENHANCE_YOUR_CALM, "too many stream resets")

    def _on_settings(self, frame: fr.Frame) -> None:
        if frame.flags & fr.ACK:
            return
        for key, value in fr.decode_settings(frame.payload):
            if key == fr.SETTINGS_INITIAL_WINDOW_SIZE:
                delta, self._peer_window = value - self._peer_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == fr.SETTINGS_MAX_FRAME_SIZE:
                self._peer_max_frame = value
            elif key == fr.SETTINGS_MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
            elif key == fr.SETTINGS_HEADER_TABLE_SIZE:
                self._encoder.header_table_size = value
        self.write_frame(fr.encode(fr.SETTINGS, fr.ACK, 0))
        if not self._settings_received:
            self._settings_received = True
            self._timers.handshake_done()
            if not self._ready.done():
                self._ready.set_result(None)
        self._flush_blocked()
        self._wake_slot_waiters()

    def _on_ping(self, frame: fr.Frame) -> None:
        if frame.flags & fr.ACK:
            payload = bytes(frame.payload)
            if payload == BDP_PING and self._bdp is not None:
                grown = self._bdp.on_ack()
                if grown is not None:
                    self._grow_windows(grown)
                return
            self._timers.ping_acked(payload)
            return
        if self._timers.ping_received():
            self.write_frame(fr.encode(fr.PING, fr.ACK, 0, frame.payload))

    def _grow_windows(self, stream_window: int) -> None:
        """Let every stream have up to `stream_window` unread, taken up by each stream as its reader
        reads (stream.py `_grant`): a stream whose reader stalled keeps the window it had. New streams
        start at the configured window (SETTINGS stay as sent) and grow on their first read."""
        self.stream_window = stream_window
        if (wanted := 2 * stream_window) > self._connection_window:
            self.write_frame(fr.window_update(0, wanted - self._connection_window))
            self._connection_window = wanted
        log.debug("h2 stream window grown to %d bytes", stream_window)

    def _on_goaway(self, frame: fr.Frame) -> None:
        last = int.from_bytes(frame.payload[:4], "big") & 0x7FFFFFFF
        self._goaway_received = True
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last and stream_id % 2 == self._next_id % 2:
                stream.gone(fr.ErrorCode.REFUSED_STREAM)
        self._wake_slot_waiters()
        self._close_if_done()

    def _on_window_update(self, frame: fr.Frame) -> None:
        increment = int.from_bytes(frame.payload, "big") & 0x7FFFFFFF
        if frame.stream_id == 0:
            if not increment:
                raise fr.ProtocolError(fr.ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > fr.MAX_WINDOW:
                raise fr.ProtocolError(fr.ErrorCode.FLOW_CONTROL_ERROR, "connection window overflow")
            self._flush_blocked()
            return
        stream = self.streams.get(frame.stream_id)
        if stream is None:
            return
        if not increment or stream.send_window + increment > fr.MAX_WINDOW:
            stream.reset(fr.ErrorCode.FLOW_CONTROL_ERROR if increment else fr.ErrorCode.PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.unsent:  # grpc peers acknowledge every message: most updates find nothing waiting
            self.flush(stream)

    _handlers: dict[int, Callable[[Connection, fr.Frame], None]] = {
        fr.DATA: _on_data,
        fr.HEADERS: _on_headers,
        fr.RST_STREAM: _on_rst_stream,
        fr.SETTINGS: _on_settings,
        fr.PING: _on_ping,
        fr.GOAWAY: _on_goaway,
        fr.WINDOW_UPDATE: _on_window_update,
    }

    # -- frames out -----------------------------------------------------------------------------------

    def write_frame(self, data: bytes) -> None:
        """Write an encoded frame (control frames: not flow controlled)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send_headers(self, stream: Stream, headers: Headers, end_stream: bool) -> None:
        """Encode and send a HEADERS frame (with CONTINUATIONs past the peer's max frame size)."""
        block = self._encoder.encode(headers)
        flags = fr.END_STREAM if end_stream else 0
        limit = self._peer_max_frame
        if len(block) <= limit:
            self.write_frame(fr.encode(fr.HEADERS, flags | fr.END_HEADERS, stream.id, block))
        else:
            out = [fr.encode(fr.HEADERS, flags, stream.id, block[:limit])]
            for pos in range(limit, len(block), limit):
                last = fr.END_HEADERS if pos + limit >= len(block) else 0
                out.append(fr.encode(fr.CONTINUATION, last, stream.id, block[pos : pos + limit]))
            self.write_frame(b"".join(out))
        self._timers.sent_data()

    def send_window_update(self, stream_id: int, increment: int) -> None:
        """Give the peer `increment` more bytes on a stream."""
        self.write_frame(fr.window_update(stream_id, increment))

    def send_reset(self, stream: Stream, code: int) -> None:
        """RST_STREAM for a stream."""
        self.write_frame(fr.rst_stream(stream.id, code))

    def try_send(self, stream: Stream, message: bytes) -> bool:
        """Write one gRPC message as one DATA frame right now, if nothing stands in the way; else False.

        The common case of a relay hop (nothing queued on the stream, the windows open, the transport
        not paused): the same bytes `flush` would write for it, without queueing views and taking
        them back off. False changes nothing; the caller then queues the message as usual.
        """
        length = len(message) + 5
        transport = self.transport
        if (
            stream._out_bytes
            or self.write_paused
            or length > stream.send_window
            or length > self.send_window
            or length > self._peer_max_frame
            or transport is None
            or transport.is_closing()
        ):
            return False
        self.send_window -= length
        stream.send_window -= length
        prefix = fr.data_message_prefix(stream.id, length - 5)
        if length <= SMALL_MESSAGE:
            transport.write(prefix + message)  # one small copy is cheaper than a vector of three
        else:
            self._output.writelines((prefix, message))  # (no join: see writer.py)
        self._timers.sent_data()
        return True

    def flush(self, stream: Stream) -> None:
        """Send what the windows and the transport allow of a stream's queued data, then its end if due."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        # Client role: the DATA frames of up to FLUSH_BATCH bytes in one writelines (a 128 KiB message
        # to a grpc peer, 16 KiB frames, was 8 system calls); between batches the transport's
        # pause_writing can stop us. Server role: one writelines per frame, as measured for issue 18.
        batch = FLUSH_BATCH if self.role == "client" else 0
        out: list[bytes | memoryview] = []
        pending = 0
        while stream.unsent and not self.write_paused:
            room = min(stream.unsent, stream.send_window, self.send_window, self._peer_max_frame)
            if room <= 0:
                break
            out.append(fr.header(fr.DATA, 0, stream.id, room))
            out.extend(stream.take(room))
            self.send_window -= room
            pending += room
            if pending >= batch:
                self._output.writelines(out)
                self._timers.sent_data()
                out, pending = [], 0
        if out:
            self._output.writelines(out)
            self._timers.sent_data()
        if stream.unsent:
            self._blocked[stream.id] = stream
            return
        self._blocked.pop(stream.id, None)
        due, trailers = stream.pending_end()
        if due:
            if trailers is not None:
                self.send_headers(stream, trailers, end_stream=True)
            else:
                self.write_frame(fr.encode(fr.DATA, fr.END_STREAM, stream.id))
            stream.end_sent()
            stream.maybe_closed()
        if not self.write_paused:
            stream.notify_drained()

    def _flush_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self.write_paused:
                return
            self.flush(stream)
        if not self.write_paused and self.drain_waiters:
            # Writers that waited only for the transport (their own data had gone out) are woken; the
            # others stay: their data may yet go out while the transport is paused again, and then
            # only the next resume wakes them (flush does not while paused).
            waiters, self.drain_waiters = self.drain_waiters, set()
            for stream in waiters:
                if stream.unsent:
                    self.drain_waiters.add(stream)
                else:
                    stream.notify_drained()

    def maybe_forget(self, stream: Stream, force: bool = False) -> None:
        """Drop a stream from the table once it is over."""
        if force or (stream.closed_out and stream.ended_in):
            self.streams.pop(stream.id, None)
            self._blocked.pop(stream.id, None)
            self._wake_slot_waiters()
            if not self.streams:
                self._timers.idle()
                self._close_if_done()

    # -- client role: opening streams -------------------------------------------------------------------

    async def ready(self) -> None:
        """Until the peer's SETTINGS arrived (ConnectionClosed if the connection was lost first)."""
        await asyncio.shield(self._ready)

    async def open_stream(self, headers: Headers, end_stream: bool = False) -> Stream:
        """Open a stream with these request headers (waits for a slot under the peer's MAX_CONCURRENT_STREAMS)."""
        while True:
            if self.closed or self._goaway_received or self._goaway_sent:
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

    def _wake_slot_waiters(self) -> None:
        waiters, self._slot_waiters = self._slot_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- ending -------------------------------------------------------------------------------------------

    def goaway(self, code: int = fr.ErrorCode.NO_ERROR, debug: str = "") -> None:
        """Graceful: refuse new streams, let the running ones finish, close once none is left."""
        if not self._goaway_sent:
            self._goaway_sent = True
            self.write_frame(fr.goaway(self._last_peer_id, code, debug.encode()))
        self._close_if_done()

    def _close_if_done(self) -> None:
        if (self._goaway_sent or self._goaway_received) and not self.streams:
            self.close()

    def fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY with `code`, then close."""
        log.debug("h2 connection error %s: %s", code, message)
        if not self._goaway_sent:
            self._goaway_sent = True
            self.write_frame(fr.goaway(self._last_peer_id, code, message.encode()[:256]))
        self.close()

    def close(self) -> None:
        """Close the transport now (streams still open get StreamReset(-1) from connection_lost)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Drop the transport without flushing its buffer."""
        if self.transport is not None:
            self.transport.abort()

    async def wait_closed(self) -> None:
        """Until the connection is lost or closed."""
        await asyncio.shield(self._closed)


def _str(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
