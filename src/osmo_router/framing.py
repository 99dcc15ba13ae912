"""Data frames at the byte level: encode one, recognise one, merge several without protobuf.

A message that carries a pure data frame is laid out as

    0x12 varint(len(frame))  0x0a varint(len(payload))  payload
    (field 2: Frame, LEN)    (Frame field 1: data, LEN)

on every stream and in both directions (see protocol.py). Knowing that, the router can merge
data frames that are already queued into one message of the same layout, so a burst of small
writes pays the per-message cost of gRPC once. Only a message whose lengths account for every
byte is a pure data frame; anything else (control frames, a frame with extra fields, malformed
bytes) is left alone and never merged across.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

#: Key byte of the message's `frame` field (field 2, LEN).
FRAME_KEY: Final = 0x12
#: Key byte of Frame's `data` field (field 1, LEN).
DATA_KEY: Final = 0x0A
#: Largest payload a merged message carries: big enough to amortise the per-message cost,
#: small enough to stay far below any max message size and keep latency flat.
COALESCE_LIMIT: Final = 128 * 1024


def encode_varint(value: int) -> bytes:
    """The protobuf base-128 varint of a non-negative integer."""
    if value < 0:
        raise ValueError("varint of a negative number")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(message: bytes, pos: int) -> tuple[int, int]:
    """(value, next position); (-1, pos) when the varint is truncated or longer than 5 bytes."""
    value = 0
    shift = 0
    end = min(len(message), pos + 5)
    while pos < end:
        byte = message[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
    return -1, pos


def data_header(payload_size: int) -> bytes:
    """The bytes that precede a payload of this size in a data-frame message."""
    inner = encode_varint(payload_size)
    return bytes((FRAME_KEY,)) + encode_varint(1 + len(inner) + payload_size) + bytes((DATA_KEY,)) + inner


def data_message(payload: bytes) -> bytes:
    """One encoded message carrying `payload` as a data frame (valid on every stream)."""
    return data_header(len(payload)) + payload


def payload_offset(message: bytes) -> int:
    """Where the payload of a pure data-frame message starts; -1 if the message is anything else."""
    if len(message) < 4 or message[0] != FRAME_KEY:
        return -1
    frame_len, pos = _read_varint(message, 1)
    if frame_len <= 0 or pos + frame_len != len(message) or message[pos] != DATA_KEY:
        return -1
    data_len, start = _read_varint(message, pos + 1)
    if data_len < 0 or start + data_len != len(message):
        return -1
    return start


def merge(messages: Sequence[bytes], offsets: Sequence[int]) -> bytes:
    """One data-frame message whose payload is every message's payload, in order.

    `offsets` are the messages' payload offsets, as `payload_offset` found them.
    """
    size = sum(len(m) - o for m, o in zip(messages, offsets, strict=True))
    parts: list[bytes | memoryview] = [data_header(size)]
    parts.extend(memoryview(m)[o:] for m, o in zip(messages, offsets, strict=True))
    return b"".join(parts)
