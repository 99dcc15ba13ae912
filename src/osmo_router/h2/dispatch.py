"""Frame dispatch: the frames in other than SETTINGS, PING and WINDOW_UPDATE, and the handler table."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from osmo_router.h2 import frames as fr
from osmo_router.h2.credit import UncountedCharge, header_cost
from osmo_router.h2.flow import FlowControl
from osmo_router.h2.handshake import Handshake, settings_first
from osmo_router.h2.stream import Headers, Stream
from osmo_router.io.byte_shares import ByteShares

if TYPE_CHECKING:
    from osmo_router.h2.connection import Connection

log = logging.getLogger(__name__)


class FrameDispatch(Handshake):
    """Each whole frame to its handler (a part of Connection; DATA as it arrives is Connection's)."""

    def _handle(self, frame: fr.Frame) -> None:
        if not self._settings_received and not (frame.kind == fr.SETTINGS and not frame.flags & fr.ACK):
            raise settings_first()
        handler = self._handlers.get(frame.kind)
        if handler is not None:  # unknown frame types (and PRIORITY, PUSH_PROMISE to a server) are ignored
            handler(self, frame)

    def _on_data(self, frame: fr.Frame) -> None:
        # A PADDED DATA frame, parsed whole (unpadded ones come piecewise or whole to Connection.data_frame,
        # which delivers this one too: `flow`, padding included, is what it counts against the windows).
        self.data_frame(frame.stream_id, frame.flags, frame.payload, False, frame.flow)

    def data_frame(self, stream_id: int, flags: int, payload: memoryview, last: bool, flow: int = -1) -> None:
        """A whole DATA frame to its stream (Connection's)."""
        raise NotImplementedError

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
        if self.config.max_header_fields and len(headers) > self.config.max_header_fields:
            log.info(
                "h2 stream refused: %d request header fields (at most %d)", len(headers), self.config.max_header_fields
            )
            self.write_frame(fr.rst_stream(stream_id, fr.ErrorCode.ENHANCE_YOUR_CALM))
            return
        charge = None
        if self.uncounted is not None and (charge := self._charge_new_stream(self.uncounted, headers)) is None:
            self.write_frame(fr.rst_stream(stream_id, fr.ErrorCode.REFUSED_STREAM))
            return
        # (only Connection, the whole of which a stream needs, is ever made)
        stream = Stream(cast("Connection", self), stream_id, self._peer_window, self.config.initial_window)
        stream.uncounted = charge
        stream.headers = headers
        self.streams[stream_id] = stream
        self._timers.busy()
        if flags & fr.END_STREAM:
            stream.received_end()
        if self.on_stream is not None:
            self.on_stream(stream)

    def _charge_new_stream(self, bound: ByteShares, headers: Headers) -> UncountedCharge | None:
        """A new stream's charge in the connection's share of the uncounted bound: its headers and the
        window it starts with (what its peer may make it hold); None if there is no room (the stream is
        refused: the peer may retry it once others ended or paired)."""
        cost = header_cost(headers) + self.config.initial_window
        if not bound.take(self, cost):
            log.info(
                "h2 stream refused: what the connection's streams hold before their sessions are counted "
                "is at its bound (%d of %d bytes here, %d of %d in all)",
                bound.owned(self),
                bound.per_owner,
                bound.used,
                bound.total,
                extra={"fields": {"event": "h2_uncounted_full"}},
            )
            return None
        return UncountedCharge(bound, self, cost)

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

    def _on_goaway(self, frame: fr.Frame) -> None:
        last = int.from_bytes(frame.payload[:4], "big") & 0x7FFFFFFF
        self._goaway_received = True
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last and stream_id % 2 == self._next_id % 2:
                stream.gone(fr.ErrorCode.REFUSED_STREAM)
        self._wake_slot_waiters()
        self._close_if_done()

    _handlers: dict[int, Callable[[FrameDispatch, fr.Frame], None]] = {
        fr.DATA: _on_data,
        fr.HEADERS: _on_headers,
        fr.RST_STREAM: _on_rst_stream,
        fr.SETTINGS: Handshake._on_settings,
        fr.PING: Handshake._on_ping,
        fr.GOAWAY: _on_goaway,
        fr.WINDOW_UPDATE: FlowControl._on_window_update,
    }


def _str(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value
