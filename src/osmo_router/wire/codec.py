"""Every byte-level fact about frame messages: tags, pre-encoded control frames, data frames without protobuf.

Every stream message is an init (field 1, first byte INIT_TAG) or carries a Frame (field 2, first
byte FRAME_TAG), the same bytes on every stream, so the router forwards frames as they arrived and
checks only bytes: the first one, and for the audit's exit status the third one of small messages.


Building `XRequest(frame=Frame(data=chunk))` and serialising it costs hundreds of microseconds per
128 KiB chunk in the upb runtime (it copies the payload several times); parsing costs about 100.
A message that carries one data frame has a fixed layout (field 2 holding field 1), so it is
written with one join and read with two varints. Everything else still goes through protobuf.

Calls that use this codec take `raw_serializer` and `fast_deserializer(ResponseType)`; the
FrameStream over them is built with `raw=True` so `send_data` writes pre-encoded bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final, cast

from google.protobuf.message import DecodeError

from osmo_router.wire.protocol import BULK_CHUNK_SIZE, half_close_frame, pb

#: Protobuf key byte of field 2 with wire type LEN: the first byte of every encoded frame message.
FRAME_TAG: Final = 0x12
#: Protobuf key byte of field 1 with wire type LEN: the first byte of every encoded init message.
INIT_TAG: Final = 0x0A

#: Key byte of Frame.data (field 1, wire type LEN).
DATA_TAG: Final = 0x0A
#: Key byte of Frame.exit_status (field 6, wire type LEN).
EXIT_STATUS_TAG: Final = 0x32
#: An encoded frame message carrying an ExitStatus is never longer than this: one-byte lengths, so
#: its third byte is the Frame's first key.
MAX_EXIT_STATUS_MESSAGE: Final = 32

#: A half-close frame message, encoded once (the same bytes on every stream).
ENCODED_HALF_CLOSE: Final = pb.ConnectResponse(frame=half_close_frame()).SerializeToString()
#: The router's SessionEnd message to the client, encoded once (the same bytes for every operation).
ENCODED_SESSION_END: Final = pb.ExecResponse(end=pb.SessionEnd()).SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    """(value, next position); raises IndexError past the end, ValueError if over-long."""
    value = shift = 0
    while True:
        byte = raw[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


#: The largest payload whose message has one-byte lengths (its frame's, 2 + size, and its own).
_SHORT_PAYLOAD: Final = 0x7F - 2
#: The longest message of such a payload (its two tags and two one-byte lengths first).
SHORT_MESSAGE: Final = _SHORT_PAYLOAD + 4


def encode_data_message(payload: bytes) -> bytes:
    """The encoding of any stream message carrying `Frame(data=payload)` (the same on every stream)."""
    return data_header(len(payload)) + payload


def payload_offset(raw: bytes) -> int:
    """Where the payload starts if `raw` is exactly a message carrying one data frame, else -1.

    Only a message whose two lengths account for every byte qualifies: a frame with any other
    field, a control frame or malformed bytes never does.
    """
    total = len(raw)
    # A keystroke's or a request's message: both lengths one byte (no varint walk; same answer).
    if 4 <= total <= SHORT_MESSAGE and raw[1] == total - 2 and raw[3] == total - 4:
        return 4 if raw[0] == FRAME_TAG and raw[2] == DATA_TAG else -1
    # A bulk read's message (one per MiB of a transfer): its header is known (same answer, no walk).
    if total == _BULK_MESSAGE and raw[:_BULK_OFFSET] == _BULK_HEADER:
        return _BULK_OFFSET
    try:
        if not raw or raw[0] != FRAME_TAG:
            return -1
        length, pos = _read_varint(raw, 1)
        if pos + length != len(raw) or raw[pos] != DATA_TAG:
            return -1
        size, start = _read_varint(raw, pos + 1)
    except (IndexError, ValueError):
        return -1
    return start if start + size == len(raw) else -1


def decode_data_message(raw: bytes) -> memoryview | None:
    """The payload if `raw` is exactly a message carrying one data frame, else None (use protobuf).

    A view into `raw`, not a copy: on a bulk transfer the receiving side otherwise copies every
    megabyte once more before it writes it to a pipe or socket, which take any buffer.
    """
    start = payload_offset(raw)
    return memoryview(raw)[start:] if start >= 0 else None


def data_header(payload_size: int) -> bytes:
    """The bytes that precede a payload of this size in a data-frame message."""
    if payload_size <= _SHORT_PAYLOAD:
        return bytes((FRAME_TAG, payload_size + 2, DATA_TAG, payload_size))
    if payload_size == BULK_PAYLOAD:
        return _BULK_HEADER  # (a bulk read's, made once: three calls less per MiB sent)
    return _long_header(payload_size)


def _long_header(payload_size: int) -> bytes:
    inner = _varint(payload_size)
    return b"".join((bytes((FRAME_TAG,)), _varint(1 + len(inner) + payload_size), bytes((DATA_TAG,)), inner))


def payload_fitting(frame_size: int) -> int:
    """The largest payload whose data-frame message, behind gRPC's 5-byte prefix, fits `frame_size`.

    A bulk pump that reads `frame_size` bytes makes a message 13 bytes over it (1 MiB: 5 prefix, 8
    header), which HTTP/2 then splits into a full frame and a 13-byte one: a second write, segment and
    read in every process on the path, and the relay's whole-frame fast paths never apply.
    """
    payload = frame_size - 5
    while payload > 0 and 5 + (4 if payload <= _SHORT_PAYLOAD else len(_long_header(payload))) + payload > frame_size:
        payload -= 1
    return payload


#: The largest read of a bulk stream (forward pumps, exec's output and input, rsync): its data-frame
#: message is exactly one 1 MiB HTTP/2 frame (our SETTINGS_MAX_FRAME_SIZE), where a read of
#: BULK_CHUNK_SIZE made a full frame and a 13-byte one.
BULK_PAYLOAD: Final = payload_fitting(BULK_CHUNK_SIZE)
#: Its message's header (data_header's answer for it), its length and the whole message's length.
_BULK_HEADER: Final = _long_header(BULK_PAYLOAD)
_BULK_OFFSET: Final = len(_BULK_HEADER)
_BULK_MESSAGE: Final = _BULK_OFFSET + BULK_PAYLOAD


def merge_data_messages(messages: Sequence[bytes], offsets: Sequence[int]) -> bytes:
    """One data-frame message whose payload is every message's payload, in order (one copy).

    `offsets` are the messages' payload offsets, as `payload_offset` found them.
    """
    size = sum(len(m) - o for m, o in zip(messages, offsets, strict=True))
    parts: list[bytes | memoryview] = [data_header(size)]
    parts.extend(memoryview(m)[o:] for m, o in zip(messages, offsets, strict=True))
    return b"".join(parts)


class DataFrame:
    """Stands for a `Frame` holding data: what FrameStream readers use of it (WhichOneof, .data)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data

    def WhichOneof(self, group: str) -> str:  # (named like the protobuf method)
        """Always "data"."""
        return "data"


def as_frame(payload: bytes | memoryview) -> pb.Frame:
    """A data frame holding `payload`, for code that takes frames (a DataFrame: no protobuf message)."""
    frame: Any = DataFrame(payload)
    return cast(pb.Frame, frame)


class DataMessage:
    """Stands for a stream message whose `frame` holds data."""

    __slots__ = ("frame",)

    def __init__(self, frame: DataFrame) -> None:
        self.frame = frame

    def WhichOneof(self, group: str) -> str:  # (named like the protobuf method)
        """Always "frame"."""
        return "frame"


def raw_serializer(message: Any) -> bytes:
    """Request serializer that passes pre-encoded bytes through and serialises messages."""
    if isinstance(message, bytes):
        return message
    encoded: bytes = message.SerializeToString()
    return encoded


def fast_method(channel: Any, path: str, response_type: Any) -> Any:
    """A stream-stream method of `channel` ("/service/Method") whose data frames skip protobuf both ways."""
    return channel.stream_stream(
        path, request_serializer=raw_serializer, response_deserializer=fast_deserializer(response_type)
    )


def fast_deserializer(message_type: Any) -> Callable[[bytes], Any]:
    """Response deserializer: data frames as DataMessage, anything else parsed as `message_type`."""

    def deserialize(raw: bytes) -> Any:
        payload = decode_data_message(raw)
        if payload is not None:
            return DataMessage(DataFrame(payload))
        return message_type.FromString(raw)

    return deserialize


def is_exit_status_frame(message: bytes) -> bool:
    """True for an encoded frame message carrying an ExitStatus (a byte check, no decoding)."""
    return 2 < len(message) <= MAX_EXIT_STATUS_MESSAGE and message[0] == FRAME_TAG and message[2] == EXIT_STATUS_TAG


def exit_status_text(message: bytes) -> str:
    """How an exit-status frame message says the process ended ("code 0", "signal 9"); "" if it does not decode."""
    try:
        status = pb.ConnectRequest.FromString(message).frame.exit_status
    except DecodeError:
        return ""
    which = status.WhichOneof("status")
    if which == "signal":
        return f"signal {status.signal}"
    if which == "code":
        return f"code {status.code}"
    return ""


def encode_frame(frame: pb.Frame) -> bytes:
    """A frame as every stream carries it (an encoded message whose field 2 is the frame)."""
    return bytes(pb.ConnectRequest(frame=frame).SerializeToString())


def decode_frame(message: bytes) -> pb.Frame:
    """The frame inside an encoded frame message (raises DecodeError on garbage)."""
    return pb.ConnectRequest.FromString(message).frame
