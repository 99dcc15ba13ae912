"""HTTP/2 frames (RFC 9113): constants, encoding, and an incremental parser.

The parser is fed the bytes a transport received (`FrameParser.feed`) and yields `Frame`s whose
payload is a memoryview into its own buffer, valid until the next `feed`: large DATA payloads are
never copied here. Framing errors raise `ProtocolError` with the HTTP/2 error code the connection
must send in its GOAWAY (PROTOCOL_ERROR, FRAME_SIZE_ERROR).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY_FRAME, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY = 0x20

# SETTINGS parameters.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

#: The protocol's defaults, before any SETTINGS.
DEFAULT_WINDOW = 65535
DEFAULT_MAX_FRAME = 16384
MAX_WINDOW = 2**31 - 1
MAX_FRAME_LIMIT = 2**24 - 1

#: A frame header: length (24 bits) and type in one word, flags, stream id (R bit included).
HEADER = struct.Struct(">IBI")
#: A DATA frame header, then a gRPC message prefix: pack((message_length + 5) << 8 | DATA, 0, stream_id,
#: 0, message_length) (data_message_prefix; packed in place on a per-message path).
DATA_MESSAGE = struct.Struct(">IBIBI")
_SETTING = struct.Struct(">HI")


class ErrorCode(IntEnum):
    """HTTP/2 error codes (RST_STREAM, GOAWAY)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class ProtocolError(Exception):
    """A connection error: the connection sends GOAWAY with `code` and closes."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(slots=True)
class Frame:
    """One parsed frame; `payload` has its padding and priority fields already removed."""

    kind: int
    flags: int
    stream_id: int
    payload: memoryview
    #: A DATA frame's whole payload length, padding included: what it counts against the windows.
    flow: int = 0


def encode(kind: int, flags: int, stream_id: int, payload: bytes | bytearray | memoryview = b"") -> bytes:
    """One frame as bytes (header and payload)."""
    return HEADER.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def header(kind: int, flags: int, stream_id: int, length: int) -> bytes:
    """A frame's 9-byte header alone, for a payload written separately (no copy of a large DATA payload)."""
    return HEADER.pack(length << 8 | kind, flags, stream_id)


def data_message_prefix(stream_id: int, message_length: int) -> bytes:
    """The header of a DATA frame carrying exactly one uncompressed gRPC message, with the message's
    5-byte prefix: the 14 bytes to write before the message itself."""
    return DATA_MESSAGE.pack((message_length + 5) << 8 | DATA, 0, stream_id, 0, message_length)


def encode_settings(settings: dict[int, int]) -> bytes:
    """A SETTINGS frame with these parameters."""
    return encode(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings.items()))


def decode_settings(payload: memoryview) -> list[tuple[int, int]]:
    """The (parameter, value) pairs of a SETTINGS payload, checked (RFC 9113 6.5.2)."""
    if len(payload) % 6:
        raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS length not a multiple of 6")
    pairs = [_SETTING.unpack_from(payload, i) for i in range(0, len(payload), 6)]
    for key, value in pairs:
        if key == SETTINGS_ENABLE_PUSH and value > 1:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad ENABLE_PUSH")
        if key == SETTINGS_INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
            raise ProtocolError(ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE too large")
        if key == SETTINGS_MAX_FRAME_SIZE and not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
    return pairs


def window_update(stream_id: int, increment: int) -> bytes:
    """A WINDOW_UPDATE frame."""
    return encode(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


def rst_stream(stream_id: int, code: int) -> bytes:
    """A RST_STREAM frame."""
    return encode(RST_STREAM, 0, stream_id, code.to_bytes(4, "big"))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    """A GOAWAY frame."""
    return encode(GOAWAY, 0, 0, last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big") + debug)


# Which frame types must (True) or must not (False) be on a stream; the others may be either.
_ON_STREAM = {
    DATA: True,
    HEADERS: True,
    PRIORITY_FRAME: True,
    RST_STREAM: True,
    CONTINUATION: True,
    SETTINGS: False,
    PING: False,
    GOAWAY: False,
}
_FIXED_LENGTH = {PRIORITY_FRAME: 5, RST_STREAM: 4, PING: 8, WINDOW_UPDATE: 4}


class FrameParser:
    """Incremental HTTP/2 frame parser with CONTINUATION assembly.

    `max_frame_size` is the SETTINGS_MAX_FRAME_SIZE we advertised; `max_header_block` bounds a
    HEADERS block with its CONTINUATIONs (which arrive as one HEADERS frame with END_HEADERS).
    """

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME, max_header_block: int = 1 << 20) -> None:
        self.max_frame_size = max_frame_size
        self.max_header_block = max_header_block
        self._buf = bytearray()
        self._pos = 0
        self._block: tuple[int, int, bytearray] | None = None  # stream id, HEADERS flags, fragments so far
        #: Whether a HEADERS block awaits its CONTINUATIONs (no other frame may come): `_block` is not None.
        #: An attribute, not a property: h2/reader.py looks at it for every DATA frame.
        self.in_header_block = False

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Frame]:
        """Append received bytes; yield every complete frame (payload views valid until the next feed)."""
        buf = self._buf
        if self._pos:
            del buf[: self._pos]
            self._pos = 0
        if buf or not isinstance(data, bytes):
            buf += data
            yield from self._frames(buf, True)
        else:
            # Nothing left over (the usual case): parse the received bytes where they are, no copy;
            # only an incomplete frame at the end is kept.
            yield from self._frames(data, False)

    def _frames(self, src: bytes | bytearray, buffered: bool) -> Iterator[Frame]:
        size = len(src)
        view = memoryview(src)
        pos = self._pos
        try:
            while size - pos >= 9:
                word, flags, stream_id = HEADER.unpack_from(src, pos)
                length, kind = word >> 8, word & 0xFF
                if length > self.max_frame_size:
                    raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes")
                end = pos + 9 + length
                if end > size:
                    break
                payload = view[pos + 9 : end]
                pos = end
                if buffered:
                    self._pos = pos
                frame = self.check(kind, flags, stream_id & 0x7FFFFFFF, payload)
                if frame is not None:
                    yield frame
        finally:
            view.release()
            if not buffered and pos < size:
                self._buf += src[pos:]

    def check(self, kind: int, flags: int, stream_id: int, payload: memoryview) -> Frame | None:
        """One whole frame, its header already read (by `feed`, or by h2/reader.py): checked, and
        assembled with its CONTINUATIONs; None while a header block is incomplete."""
        if kind == DATA and self._block is None and stream_id:  # the common case, checked as below
            flow = len(payload)
            return Frame(DATA, flags, stream_id, _strip(kind, flags, payload) if flags & PADDED else payload, flow)
        if self._block is not None and kind != CONTINUATION:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "a frame inside a header block")
        on_stream = _ON_STREAM.get(kind)
        if on_stream is True and stream_id == 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"frame type {kind} on stream 0")
        if on_stream is False and stream_id != 0:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"frame type {kind} on a stream")
        fixed = _FIXED_LENGTH.get(kind)
        if fixed is not None and len(payload) != fixed:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, f"frame type {kind} of {len(payload)} bytes")
        if kind == SETTINGS and flags & ACK and payload:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ack with a payload")
        if kind == GOAWAY and len(payload) < 8:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "short GOAWAY")
        flow = len(payload)
        if kind in (DATA, HEADERS):
            payload = _strip(kind, flags, payload)
        if kind == HEADERS and not flags & END_HEADERS:
            self._block = (stream_id, flags, bytearray(payload))
            self.in_header_block = True
            return None
        if kind == CONTINUATION:
            return self._continuation(flags, stream_id, payload)
        return Frame(kind, flags, stream_id, payload, flow)

    def _continuation(self, flags: int, stream_id: int, payload: memoryview) -> Frame | None:
        if self._block is None or self._block[0] != stream_id:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "unexpected CONTINUATION")
        block = self._block[2]
        block += payload
        if len(block) > self.max_header_block:
            raise ProtocolError(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if not flags & END_HEADERS:
            return None
        headers_flags = self._block[1] | END_HEADERS
        self._block = None
        self.in_header_block = False
        return Frame(HEADERS, headers_flags, stream_id, memoryview(bytes(block)))


def _strip(kind: int, flags: int, payload: memoryview) -> memoryview:
    """The payload without its padding (PADDED) and, for HEADERS, its priority fields (PRIORITY)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        if not end:
            raise ProtocolError(ErrorCode.FRAME_SIZE_ERROR, "PADDED frame without a pad length")
        start, end = 1, end - payload[0]
    if kind == HEADERS and flags & PRIORITY:
        start += 5
    if end < start:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "padding longer than the payload")
    return payload[start:end]
