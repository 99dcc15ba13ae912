"""The receiving half of a connection: a read buffer for asyncio.BufferedProtocol, and the frame walk.

A bulk gRPC message (1 MiB) arrives as one large DATA frame over several transport reads. Parsed
whole, it was copied three times on its way to the reader (into the parser's buffer, into the
stream's partial message, out of it as bytes). Here the transport reads into a buffer we hand it
(`get_buffer`): our read buffer for frame headers, control frames and small messages, or, while a
DATA frame's payload continues a message whose length is known, the message itself
(`DataSink.data_buffer`, see io/buffers.py), so the kernel's copy is the only one. Unpadded DATA
payloads go to the sink piecewise, as they arrive; every other frame (PADDED DATA included) is
parsed whole by `FrameParser` as before.

The connection's `get_buffer` and `buffer_updated` are this reader's methods themselves (set on the
connection when it is made, h2/connection.py): no wrapper call per read (issue 18). So the reader also
checks a server's client preface, and turns a ProtocolError into the connection's GOAWAY (`fail`).

Fewer reads per large frame (issue 18): on a plain TCP connection, once a read drained the socket in the
middle of a DATA frame with at least LOWAT_MIN payload bytes still to come, the socket's SO_RCVLOWAT is
set to those bytes (at most LOWAT_MAX), so the kernel wakes us once the rest of the frame is there, not at
every segment; it goes back to 1 before any read that may hold a frame header. See `FrameReader.use_socket`
for why no path can stall on it.
"""

from __future__ import annotations

import socket
from typing import Protocol

from osmo_router.h2 import frames as fr

#: The read buffer of a busy connection (one whose reads fill what they are offered).
READ_SIZE = 256 * 1024
#: The read buffer of a quiet connection (a router holds one connection per agent and client: an
#: idle one keeps this much). After a DATA frame of READ_SIZE or more, the read for the next frame
#: header is this small too: that frame is likely as large, and what a read brings of its payload
#: into the read buffer is copied out again, while the rest of it is read straight into its message.
HEADER_READ = 16 * 1024
#: Reads this small, this many in a row, make a busy connection quiet again.
SMALL_READ, QUIET_AFTER = 4 * 1024, 32
#: A DATA frame with at least this much payload still to come after a read that drained the socket gets
#: the socket's low-water mark (below this, the wake-ups saved do not pay for two setsockopt calls).
LOWAT_MIN = 128 * 1024
#: The low-water mark's ceiling (a frame is at most our SETTINGS_MAX_FRAME_SIZE, 1 MiB by default; the
#: kernel caps it too, at half of tcp_rmem's maximum).
LOWAT_MAX = 1 << 20


class DataSink(Protocol):
    """Where `FrameReader` delivers frames (the connection)."""

    def on_frame(self, frame: fr.Frame) -> None:
        """A whole frame (anything but unpadded DATA)."""

    def data_begin(self, stream_id: int, flags: int, length: int) -> None:
        """An unpadded DATA frame's header; its `length` payload bytes follow."""

    def data_piece(self, payload: memoryview) -> None:
        """The next payload bytes of the current DATA frame (a view valid during the call)."""

    def data_frame(self, stream_id: int, flags: int, payload: memoryview, last: bool) -> None:
        """An unpadded DATA frame that arrived whole (a view valid during the call); `last`: nothing more
        arrived behind it in the same read."""

    def data_end(self) -> None:
        """The current DATA frame's payload is complete."""

    def data_buffer(self) -> memoryview | None:
        """Where the current DATA frame's next bytes may be read to directly (None: the read buffer)."""

    def data_filled(self, count: int) -> None:
        """`count` bytes of the current DATA frame were read into the last `data_buffer`."""

    def fail(self, code: int, message: str) -> None:
        """A connection error (a ProtocolError raised by the frame walk or a sink method): GOAWAY, close."""

    def close(self) -> None:
        """Close at once (the peer's bytes are no HTTP/2 client preface)."""


class FrameReader:
    """Hands the transport its read buffers and walks the frames in what arrived."""

    def __init__(self, parser: fr.FrameParser, sink: DataSink, preface: bytes = b"") -> None:
        self._parser = parser
        self._sink = sink
        self._preface = preface  # what must arrive before any frame (a server's: the client preface)
        self._capacity = HEADER_READ  # the read buffer's usual size now (READ_SIZE while busy)
        self._small_reads = 0  # small reads in a row
        self._buf = bytearray(HEADER_READ)
        self._view = memoryview(self._buf)  # of all of _buf (kept: one per buffer, not one per read)
        self._start = 0  # first byte not yet parsed
        self._end = 0  # end of what arrived
        self._need = 0  # bytes from _start a whole frame needs (0: unknown, a header at least)
        self._left = 0  # payload bytes of the current DATA frame not yet delivered
        self._direct = False  # the last buffer handed out was the sink's
        self._large = False  # the last DATA frame was large (see HEADER_READ)
        self._offered = 0  # the size of the last read buffer handed out (ours or the sink's)
        self._socket: socket.socket | None = None  # whose SO_RCVLOWAT we may set (see use_socket)
        self._lowat = 1  # the SO_RCVLOWAT we set last (1: the kernel's default)
        #: Set by `discard`: reads go on (to reach the peer's EOF) and what they bring is dropped.
        self.discarding = False

    def use_socket(self, sock: socket.socket | None) -> None:
        """The connection's socket, to set its SO_RCVLOWAT on large DATA frames (None: never, from now on).

        Only for plain TCP (the connection checks): under TLS the socket's bytes are not the frames' bytes.
        Why the low-water mark cannot stall a connection (Linux, net/ipv4/tcp.c and include/net/tcp.h):

        - It is set only to payload bytes of a DATA frame whose header already arrived, never above what
          is left of that frame, and back to 1 before any read that may need a frame header (the frame's
          end, `discard`, a frame read into our own buffer). HTTP/2 (RFC 9113 6.9.1) lets a sender send
          a DATA frame only within its flow-control windows, so once its header is here the rest of its
          payload comes whatever WINDOW_UPDATEs we send or hold back.
        - `tcp_set_rcvlowat` caps the mark at half of tcp_rmem[2] (half of SO_RCVBUF if that was set;
          we set none) and raises sk_rcvbuf (and the window clamp) to fit it, so the receive window can
          hold the bytes we wait for: a frame larger than the socket's buffer still arrives whole.
        - `tcp_poll` reports EPOLLIN when `tcp_epollin_ready` (bytes >= the mark, or receive-memory
          pressure, or a receive window down to one MSS) and, whatever the mark, on the peer's FIN
          (RCV_SHUTDOWN) and on an error (EPOLLERR): a peer that sends half a frame and closes or resets
          is seen at once; one that sends a frame slowly, in pieces, is read when the last piece is in.
        - The mark only decides when epoll reports the socket readable: a non-blocking recv returns what
          is there whatever it is, so the transport's reads (libuv reads again at once after a read that
          filled its buffer) deliver as before.
        """
        # (None comes with the connection's loss: its descriptor may be closed, even taken by another
        # socket, so nothing is set on it)
        self._socket, self._lowat = sock, 1

    def _set_lowat(self, value: int) -> None:
        """Set the socket's SO_RCVLOWAT (a closed socket: none from now on)."""
        sock = self._socket
        if sock is None:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
        except OSError:
            self._socket, value = None, 1  # (closed under us: no read waits on it any more)
        self._lowat = value

    def discard(self) -> None:
        """Drop everything from now on, unparsed (a connection closed by us, reading to its peer's EOF)."""
        self.discarding = True
        self._direct = False
        self._start = self._end = self._left = self._need = 0
        if self._lowat > 1:
            self._set_lowat(1)  # (the linger reads to the peer's EOF: any byte may be the last)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """The buffer for the transport's next read (asyncio.BufferedProtocol's; `sizehint` is not used)."""
        if self._start == self._end:
            if self._left:
                target = self._sink.data_buffer()
                if target is not None and len(target):
                    self._direct = True
                    if len(target) > self._left:
                        target = target[: self._left]
                    self._offered = len(target)
                    return target
                if self._lowat > 1:  # (read into ours: it may take the frame's end and a header)
                    self._set_lowat(1)
            elif self._view.nbytes == self._capacity:
                # Everything parsed and the buffer at its usual size (between small messages, the
                # common case, or after a large frame): as _make_room would leave it, without its
                # work (per read).
                self._direct = False
                self._start = self._end = 0
                if self._large:  # (the next frame's header first: its payload may go in place)
                    self._offered = HEADER_READ
                    return self._view[:HEADER_READ]
                self._offered = self._capacity
                return self._view
        self._direct = False
        self._make_room()
        if self._large and self._start == self._end:
            self._offered = HEADER_READ
            return self._view[:HEADER_READ]
        self._offered = len(self._buf) - self._end
        return self._view[self._end :]

    @property
    def pending(self) -> int:
        """Bytes read and not yet parsed: during a delivery, what arrived behind the current piece."""
        return self._end - self._start

    def _make_room(self) -> None:
        # Never resized in place: the transport may still hold a view of the last buffer.
        start, end, need, capacity = self._start, self._end, self._need, self._capacity
        kept = end - start
        if not kept:
            self._start = self._end = 0
            if len(self._buf) != capacity and need <= capacity:
                self._buf = bytearray(capacity)  # busy, quiet again, or grown for one large frame
                self._view = memoryview(self._buf)
            if need <= len(self._buf):
                return
        room = capacity // 4
        if len(self._buf) - end >= max(need - kept, room):
            return
        if max(need, kept + room) <= len(self._buf):
            self._buf[:kept] = self._buf[start:end]  # same length: allowed while views exist
        else:
            grown = bytearray(max(need, kept + room, capacity))
            grown[:kept] = self._buf[start:end]
            self._buf, self._view = grown, memoryview(grown)
        self._start, self._end = 0, kept

    def buffer_updated(self, count: int) -> None:
        """`count` bytes were read into the last buffer: deliver them; a ProtocolError ends the connection.

        The connection's own buffer_updated (no wrapper: issue 18). The try costs nothing in Python 3.11
        unless it catches; the frame walk is inline (a small message's read is one frame: one call less).
        """
        if self.discarding:
            return  # (the same buffer is handed out again: what arrives is dropped)
        try:
            if self._direct:
                self._direct = False
                left = self._left = self._left - count
                self._sink.data_filled(count)
                if not left:
                    self._sink.data_end()
                if self._socket is not None and not self.discarding:
                    self._lowat_after_direct(count, left)
                return
            self._end += count
            if self._preface and not self._took_preface():
                return
            # A busy connection gets the larger read buffer; a quiet one the smaller again (inline: per read).
            if count >= self._offered:
                self._small_reads = 0
                self._capacity = READ_SIZE
            elif count < SMALL_READ:
                self._small_reads += 1
                if self._small_reads >= QUIET_AFTER:
                    self._capacity = HEADER_READ
            # The frame walk, here rather than in a method of its own: this runs once per read of every
            # connection, and a small message's read is one frame (one call less per message, issue 18).
            buf, view, sink, parser = self._buf, self._view, self._sink, self._parser
            start, end = self._start, self._end
            while True:
                if self.discarding:
                    # A frame of this read closed the connection (Connection.close: a GOAWAY received
                    # with no stream open, the last stream's end after ours): what follows it is dropped
                    # too. Walked on, a HEADERS frame opened a call whose writes met the transport past
                    # its write_eof (RuntimeError: the transport is not is_closing() while it lingers).
                    return
                if self._left:
                    take = min(self._left, end - start)
                    if not take:
                        break
                    self._left -= take
                    start += take
                    self._start = start
                    sink.data_piece(view[start - take : start])
                    if not self._left:
                        sink.data_end()
                    continue
                if end - start < 9:
                    break
                word, flags, stream_id = fr.HEADER.unpack_from(buf, start)
                length, kind = word >> 8, word & 0xFF
                if length > parser.max_frame_size:
                    raise fr.ProtocolError(fr.ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes")
                stream_id &= 0x7FFFFFFF
                if kind == fr.DATA and not flags & fr.PADDED and stream_id and not parser.in_header_block:
                    if end - start >= 9 + length:  # all here: one call (a small message's frame)
                        start += 9 + length
                        self._start = start
                        self._large = length >= READ_SIZE
                        sink.data_frame(stream_id, flags, view[start - length : start], start == end)
                        continue
                    start += 9
                    self._start = start
                    self._left = length
                    self._large = length >= READ_SIZE
                    sink.data_begin(stream_id, flags, length)
                    if not length:
                        sink.data_end()
                    continue
                if end - start < 9 + length:
                    self._need = 9 + length
                    break
                payload = view[start + 9 : start + 9 + length]
                start += 9 + length
                self._start = start
                frame = parser.check(kind, flags, stream_id, payload)
                if frame is not None:
                    sink.on_frame(frame)
            if self._left:
                self._need = 0
                # This read drained the socket in the middle of a large frame: wake when the rest is in.
                if self._left >= LOWAT_MIN and count < self._offered and self._socket is not None:
                    self._set_lowat(min(self._left, LOWAT_MAX))
            elif start == end:
                self._need = 0
        except fr.ProtocolError as err:
            self._sink.fail(err.code, str(err))

    def _lowat_after_direct(self, count: int, left: int) -> None:
        """After a read into the sink's buffer: `left` of the frame's payload still to come."""
        if count < self._offered and left >= LOWAT_MIN:
            # The read drained the socket: the transport waits for readiness next, and the rest is due.
            if self._lowat != min(left, LOWAT_MAX):
                self._set_lowat(min(left, LOWAT_MAX))
        elif self._lowat > 1 and self._lowat > left:
            # Never above what is left of the frame (the frame's end: the next read needs a header).
            self._set_lowat(1)

    def _took_preface(self) -> bool:
        """Whether the preface arrived whole and is past (then it is skipped); closes the connection if
        what arrived is not it (once per connection)."""
        preface, start, end = self._preface, self._start, self._end
        got = bytes(self._buf[start : min(end, start + len(preface))])
        if not preface.startswith(got):
            self._start = self._end  # nothing of it is parsed
            self._sink.close()
            return False
        if len(got) < len(preface):
            self._need = len(preface)
            return False
        self._start = start + len(preface)
        self._preface = b""
        return True
