"""A connection's state and what every part of it uses: the stream table, frames out, closing.

`Connection` (connection.py) is built from this and the parts stacked on it: flow.py (the windows
and outbound DATA), handshake.py (preface, SETTINGS, PING), dispatch.py (the other frames in).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, cast

import hpack

from osmo_router.h2 import frames as fr
from osmo_router.h2.bdp import BdpEstimator
from osmo_router.h2.config import H2Config
from osmo_router.h2.front import native_front
from osmo_router.h2.reader import FrameReader
from osmo_router.h2.stream import Headers, Stream
from osmo_router.h2.timers import Timers
from osmo_router.io.byte_shares import ByteShares

if TYPE_CHECKING:
    from osmo_router.h2.connection import Connection
    from osmo_router.h2.writer import VectorWriter

log = logging.getLogger(__name__)

#: Bytes of frames we may queue (acks of the peer's SETTINGS and PINGs, resets, headers, window updates)
#: while the transport's buffer is full because the peer does not read: past it the peer is flooding
#: us with frames we must answer (HTTP/2 settings or ping flood, CVE-2019-9512/9515) and the
#: connection is aborted. Asyncio buffers such answers without limit (uvloop: about 10x their size in
#: memory for 9-byte acks); DATA stops at the transport's high-water mark anyway.
CONTROL_BACKLOG = 1 << 20

#: How long a closed connection waits for its peer's EOF (reading and dropping what it still sends)
#: before the transport is aborted: what we queued goes out in that time, to a peer that reads.
LINGER = 2.0


class ConnectionCore:
    """The state of one HTTP/2 connection, its frames out and its stream table (see connection.py)."""

    _output: VectorWriter  # set in connection_made

    def __init__(
        self,
        role: Literal["client", "server"],
        config: H2Config | None = None,
        on_stream: Callable[[Stream], None] | None = None,
        on_close: Callable[[Connection], None] | None = None,
        uncounted: ByteShares | None = None,
    ) -> None:
        self.role = role
        #: Server role: the bound (per connection, in all) of what streams not yet counted in any byte
        #: budget hold (h2/credit.py UncountedCharge); None: not bounded.
        self.uncounted = uncounted
        self.config = config or H2Config()
        self.on_stream = on_stream
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.write_paused = False
        self._control_backlog = 0  # bytes written by write_frame since the transport's buffer filled
        #: WINDOW_UPDATEs not written yet: they go out with the next frame written, at the latest at the end
        #: of this turn of the event loop (`send_window_update`).
        self._deferred = b""
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self._parser = fr.FrameParser(self.config.max_frame_size, self.config.max_header_list_size)
        whole = cast("Connection", self)  # only Connection, all the parts, is ever made: the reader and timers use it
        self._reader = FrameReader(self._parser, whole, fr.PREFACE if role == "server" else b"")
        # asyncio.BufferedProtocol's two methods per read are the reader's own, with no wrapper call
        # (issue 18). Set here, before any transport exists: uvloop (and its TLS layer) looks them up once,
        # when it makes the transport.
        #: The connection's native front (h2/front.py), which passes a laned stream's small messages on
        #: from C and hands everything else to the reader; None: the reader alone.
        self._front = native_front(whole, self._reader)
        reads = self._front or self._reader
        self.get_buffer = reads.get_buffer
        self.buffer_updated = reads.buffer_updated
        self._data_stream: Stream | None = None  # the stream of the DATA frame arriving
        self._data_end_stream = False  # whether that frame has END_STREAM
        self._data_flow = 0  # and its length
        self._encoder = hpack.Encoder()
        self._decoder = hpack.Decoder(max_header_list_size=self.config.max_header_list_size)
        self._settings_received = False
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._next_id = 1 if role == "client" else 2
        self._last_peer_id = 0
        self._init_windows()
        self._goaway_sent = False
        self._goaway_received = False
        self._slot_waiters: list[asyncio.Future[None]] = []
        self._timers = Timers(whole)
        self.peer_address: Any = None
        #: close() was called: nothing more is sent, what arrives is dropped until the peer's EOF.
        self.lingering = False
        self._linger: asyncio.TimerHandle | None = None

    def _init_windows(self) -> None:
        """The flow-control state (flow.py's) of a new connection: the peer's settings as HTTP/2 has them
        before its SETTINGS, the windows both ways, and the streams waiting on them."""
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
        self._bdp = (
            BdpEstimator(
                self.config.stream_window, self.config.max_stream_window, later=asyncio.get_running_loop().call_later
            )
            if grows
            else None
        )
        self._blocked: dict[int, Stream] = {}  # streams with data waiting for a window or the transport
        #: Streams whose writer waits in `drained` (woken once the transport takes data again).
        self.drain_waiters: set[Stream] = set()

    # -- frames out -----------------------------------------------------------------------------------

    def write_frame(self, data: bytes) -> None:
        """Write an encoded frame (control frames: not flow controlled). A peer that does not read
        while making us write more than CONTROL_BACKLOG of them is cut off (the transport aborted)."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.lingering:
            return
        if self._deferred:
            data, self._deferred = self._deferred + data, b""
        if self.write_paused:
            self._control_backlog += len(data)
            if self._control_backlog > CONTROL_BACKLOG:
                log.info(
                    "h2 connection aborted: its peer does not read and keeps sending frames we must answer "
                    "(%d bytes of them queued)",
                    self._control_backlog,
                    extra={"fields": {"event": "h2_control_flood", "queued_bytes": self._control_backlog}},
                )
                self._goaway_sent = True  # nothing more is sent: the GOAWAY would wait behind the backlog
                transport.abort()
                return
        transport.write(data)

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
        """Give the peer `increment` more bytes on a stream: with the next frame this connection writes,
        at the latest at the end of this turn of the event loop (issue 18: a bulk transfer's window updates
        were each a write of their own, and a wake-up and a read in the peer; now those of one turn, and
        the acknowledgement a resumable stream writes for the same message, share one write).

        The connection's window goes in the same write once a sixteenth of it was received (flow.py
        `_data_target` gives it alone only at a quarter): in a bulk transfer it rides on a stream's.
        """
        frame = fr.window_update(stream_id, increment)
        unacked = self._recv_unacked
        if unacked >= self._connection_window >> 4:
            self._recv_unacked = 0
            frame += fr.window_update(0, unacked)
        if self._deferred:
            self._deferred += frame
            return
        self._deferred = frame
        self._loop.call_soon(self._write_deferred)

    def _write_deferred(self) -> None:
        """The end of the turn: the window updates no other frame took along go out now."""
        if self._deferred:
            self.write_frame(b"")  # (write_frame puts the deferred bytes in front of what it writes)

    def send_reset(self, stream: Stream, code: int) -> None:
        """RST_STREAM for a stream."""
        self.write_frame(fr.rst_stream(stream.id, code))

    # -- the stream table, closing --------------------------------------------------------------------

    def _wake_slot_waiters(self) -> None:
        """Wake the openers waiting for a stream slot: each looks again (a slot, GOAWAY or the close)."""
        waiters, self._slot_waiters = self._slot_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def maybe_forget(self, stream: Stream, force: bool = False) -> None:
        """Drop a stream from the table once it is over."""
        if force or (stream.closed_out and stream.ended_in):
            self.streams.pop(stream.id, None)
            self._blocked.pop(stream.id, None)
            if self._front is not None:
                self._front.close_lane(stream.id)
            self._wake_slot_waiters()
            if not self.streams:
                self._timers.idle()
                self._close_if_done()

    def _close_if_done(self) -> None:
        if (self._goaway_sent or self._goaway_received) and not self.streams:
            self.close()

    def close(self) -> None:
        """Close gracefully within LINGER seconds: streams still open get StreamReset(-1) at once; what is
        queued in the transport (statuses, GOAWAY) goes out, then our FIN (TLS: close_notify).

        Until the peer's EOF the connection reads on and drops what arrives: a socket closed with unread
        bytes (the WINDOW_UPDATEs of a client reading our last data, the rest of its upload) makes the
        kernel send RST and drop what we sent and the peer has not read yet, such as a call's status.
        A peer that neither reads nor closes is cut off (aborted) after LINGER seconds.

        A connection whose peer never finished its handshake (no SETTINGS: a half-sent preface, a
        handshake timeout) has nothing of ours to deliver and closes at once, as before the linger: a
        flood of such connections must not hold the router's descriptors LINGER seconds longer.
        """
        transport = self.transport
        if transport is None or transport.is_closing() or self.lingering:
            return
        if not self._settings_received:
            transport.close()  # (connection_lost ends what is left, as it always did)
            return
        self.lingering = True
        self._reader.discard()
        self._timers.cancel()  # (no keepalive PING, idle or age GOAWAY any more)
        self._end_streams()
        self._linger = asyncio.get_running_loop().call_later(LINGER, self._linger_over)
        if transport.can_write_eof():
            try:
                transport.write_eof()  # FIN once the transport's buffer is written; reading goes on
            except OSError:  # the peer is gone already (shutdown: ENOTCONN)
                transport.abort()
        else:
            transport.close()  # TLS: close_notify after the buffer (asyncio reads the peer's reply)

    def _linger_over(self) -> None:
        if self.transport is not None and not self.closed:
            log.debug("h2 connection aborted: its peer did not close within %gs of ours", LINGER)
            self.transport.abort()

    def _end_streams(self) -> None:
        """Every stream still open is over (-1): readers, writers and close callbacks wake."""
        for stream in list(self.streams.values()):
            stream.gone(-1)
        self.streams.clear()
        self._blocked.clear()
