"""The receiving half of a connection: a read buffer for asyncio.BufferedProtocol, and the frame walk.

A bulk gRPC message (1 MiB) arrives as one large DATA frame over several transport reads. Parsed
whole, it was copied three times on its way to the reader (into the parser's buffer, into the
stream's partial message, out of it as bytes). Here the transport reads into a buffer we hand it
(`get_buffer`): our read buffer for frame headers, control frames and small messages, or, while a
DATA frame's payload continues a message whose length is known, the message itself
(`DataSink.data_buffer`, see io/buffers.py), so the kernel's copy is the only one. Unpadded DATA
payloads go to the sink piecewise, as they arrive; every other frame (PADDED DATA included) is
parsed whole by `FrameParser` as before.
"""

from __future__ import annotations

from typing import Protocol

from osmo_router.h2 import frames as fr

#: What the read buffer offers the transport at least (its size at first; it grows for a larger frame).
READ_SIZE = 256 * 1024


class DataSink(Protocol):
    """Where `FrameReader` delivers frames (the connection)."""

    def on_frame(self, frame: fr.Frame) -> None:
        """A whole frame (anything but unpadded DATA)."""

    def data_begin(self, stream_id: int, flags: int, length: int) -> None:
        """An unpadded DATA frame's header; its `length` payload bytes follow."""

    def data_piece(self, payload: memoryview) -> None:
        """The next payload bytes of the current DATA frame (a view valid during the call)."""

    def data_end(self) -> None:
        """The current DATA frame's payload is complete."""

    def data_buffer(self) -> memoryview | None:
        """Where the current DATA frame's next bytes may be read to directly (None: the read buffer)."""

    def data_filled(self, count: int) -> None:
        """`count` bytes of the current DATA frame were read into the last `data_buffer`."""


class FrameReader:
    """Hands the transport its read buffers and walks the frames in what arrived."""

    def __init__(self, parser: fr.FrameParser, sink: DataSink) -> None:
        self._parser = parser
        self._sink = sink
        self._buf = bytearray(READ_SIZE)
        self._start = 0  # first byte not yet parsed
        self._end = 0  # end of what arrived
        self._need = 0  # bytes from _start a whole frame needs (0: unknown, a header at least)
        self._left = 0  # payload bytes of the current DATA frame not yet delivered
        self._direct = False  # the last buffer handed out was the sink's

    def get_buffer(self) -> memoryview:
        """The buffer for the transport's next read."""
        if self._left and self._start == self._end:
            target = self._sink.data_buffer()
            if target is not None and len(target):
                self._direct = True
                return target[: self._left] if len(target) > self._left else target
        self._direct = False
        self._make_room()
        return memoryview(self._buf)[self._end :]

    def _make_room(self) -> None:
        # Never resized in place: the transport may still hold a view of the last buffer.
        start, end, size = self._start, self._end, len(self._buf)
        if start == end:
            self._start = self._end = 0
            if size > READ_SIZE >= self._need:
                self._buf = bytearray(READ_SIZE)  # grown for one large frame: back to the usual size
            if self._need <= len(self._buf):
                return
        if size - end >= max(self._need - (end - start), READ_SIZE // 4):
            return
        kept = end - start
        if max(self._need, kept + READ_SIZE // 4) <= size:
            self._buf[:kept] = self._buf[start:end]  # same length: allowed while views exist
        else:
            grown = bytearray(max(self._need, kept + READ_SIZE // 4, READ_SIZE))
            grown[:kept] = self._buf[start:end]
            self._buf = grown
        self._start, self._end = 0, kept

    def buffer_updated(self, count: int) -> None:
        """`count` bytes were read into the last buffer: deliver them (raises ProtocolError)."""
        if self._direct:
            self._direct = False
            self._left -= count
            self._sink.data_filled(count)
            if not self._left:
                self._sink.data_end()
            return
        self._end += count
        self._walk()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Deliver bytes that arrived elsewhere (a Protocol's data_received, the preface's leftover)."""
        view = memoryview(data)
        while view:
            target = self.get_buffer()
            take = min(len(target), len(view))
            target[:take] = view[:take]
            view = view[take:]
            self.buffer_updated(take)

    def _walk(self) -> None:
        buf, sink, parser = self._buf, self._sink, self._parser
        view = memoryview(buf)
        start, end = self._start, self._end
        try:
            while True:
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
                    start += 9
                    self._start = start
                    self._left = length
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
            if start == end or self._left:
                self._need = 0
        finally:
            view.release()
