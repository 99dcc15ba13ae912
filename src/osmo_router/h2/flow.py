"""Connection flow control: the windows both ways (WINDOW_UPDATE, BDP growth) and outbound DATA."""

from __future__ import annotations

import logging

from osmo_router.h2 import frames as fr
from osmo_router.h2.bdp import BDP_PING
from osmo_router.h2.core import ConnectionCore
from osmo_router.h2.stream import Stream

log = logging.getLogger(__name__)

#: Client role: DATA bytes written with one writelines at most (see Connection.flush).
FLUSH_BATCH = 256 * 1024
#: Up to this size (frame payload) a message written by `send_now` is joined with its header into one buffer.
SMALL_MESSAGE = 4096


class FlowControl(ConnectionCore):
    """The connection's windows and the sending of queued DATA (a part of Connection)."""

    def _count_for_bdp(self, flow: int) -> None:
        """A DATA frame arrived whole: its bytes count for the bandwidth sample (h2/bdp.py)."""
        bdp = self._bdp
        if bdp is not None and bdp.active and bdp.on_data(flow):
            self.write_frame(fr.encode(fr.PING, 0, 0, BDP_PING))

    def _data_target(self, stream_id: int, flow: int) -> Stream | None:
        """Count a DATA frame against the connection window; its stream, if it still takes data."""
        self._recv_unacked += flow
        if self._recv_unacked >= self._connection_window >> 2:
            if self._recv_unacked > self._connection_window:
                raise fr.ProtocolError(fr.ErrorCode.FLOW_CONTROL_ERROR, "the peer overran the connection window")
            self._give_connection_window()
        stream = self.streams.get(stream_id)
        if stream is None or stream.ended_in:
            if stream_id > self._last_peer_id and stream_id % 2 != self._next_id % 2:
                raise fr.ProtocolError(fr.ErrorCode.PROTOCOL_ERROR, "DATA on an idle stream")
            return None  # a stream we reset or closed: its bytes still count for the connection window
        return stream

    def _give_connection_window(self) -> None:
        """The connection window is given back on receipt (one stalled stream never blocks the others),
        in steps of a quarter window: called when the bytes received since the last step reach one."""
        self.write_frame(fr.window_update(0, self._recv_unacked))
        self._recv_unacked = 0

    def _grow_windows(self, stream_window: int) -> None:
        """Let every stream have up to `stream_window` unread, taken up by each stream as its reader
        reads (stream.py `_grant`): a stream whose reader stalled keeps the window it had. New streams
        start at the configured window (SETTINGS stay as sent) and grow on their first read."""
        self.stream_window = stream_window
        if (wanted := 2 * stream_window) > self._connection_window:
            self.write_frame(fr.window_update(0, wanted - self._connection_window))
            self._connection_window = wanted
        log.debug("h2 stream window grown to %d bytes", stream_window)

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

    def send_now(self, stream: Stream, length: int, body: bytes | memoryview, framed: bool) -> bool:
        """Write one gRPC message of `length` bytes with its prefix (`framed`: `body` carries the prefix,
        as another stream received it) as one DATA frame right now, if nothing stands in the way; else
        False, with nothing changed (the caller then queues it as usual).

        The common case of a relay hop and of every message a forward sends (nothing queued on the
        stream, the windows open, the transport not paused): the bytes `flush` would write for it,
        without queueing views and taking them back off. Stream.try_write and try_write_framed call it.
        """
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
        if framed:
            head = fr.HEADER.pack(length << 8 | fr.DATA, 0, stream.id)  # (fr.header)
        else:  # (fr.data_message_prefix, spelt out: one call less per message sent)
            head = fr.DATA_MESSAGE.pack(length << 8 | fr.DATA, 0, stream.id, 0, length - 5)
        if self._deferred:  # window updates of this turn go in the same write (core.py send_window_update)
            head, self._deferred = self._deferred + head, b""
        if length <= SMALL_MESSAGE:
            transport.write(head + body)  # one small copy is cheaper than a vector of three
        elif framed:  # a view of the read buffer (pass_through): what the transport keeps must be a copy
            self._output.writelines_borrowed((head, body))
        else:
            self._output.writelines((head, body))  # (no join: see writer.py)
        self._timers.strikes = 0  # (Timers.sent_data, inline: per message sent)
        return True

    def sent_natively(self, stream: Stream, length: int) -> None:
        """A message of `length` bytes (its prefix included) that the native front wrote on `stream`, as
        `send_now` would have (h2/front.py): what send_now counts."""
        self.send_window -= length
        stream.send_window -= length
        self._timers.sent_data()

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
            if self._deferred and not out:  # (as in send_now)
                out.append(self._deferred)
                self._deferred = b""
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
