"""Bulk data frames without protobuf copies: encoded by hand, written as bytes.

Building `RsyncRequest(frame=Frame(data=chunk))` and serialising it copies a 1 MiB payload three
times; the wire layout is fixed (protocol.py: field 2 is the Frame, its field 1 the data), so the
encoded message is a few header bytes and the payload: one copy. The call is opened with a request
serializer that passes bytes through and serialises messages as usual.
"""

from __future__ import annotations

from typing import Any

import grpc

from osmo_router.protocol import CLIENT_SERVICE, FRAME_TAG, pb
from osmo_router.streams import FrameStream

#: Key byte of Frame.data (field 1, wire type LEN).
DATA_TAG = 0x0A


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_data_frame(payload: bytes) -> bytes:
    """The encoded request message carrying a data frame with `payload` (the same bytes on every stream)."""
    inner = _varint(len(payload))
    return b"".join((bytes((FRAME_TAG,)), _varint(1 + len(inner) + len(payload)), bytes((DATA_TAG,)), inner, payload))


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


def rsync_method(channel: grpc.aio.Channel) -> Any:
    """RouterClientService.Rsync on `channel`, accepting encoded bytes as well as RsyncRequest messages."""
    return channel.stream_stream(
        f"/{CLIENT_SERVICE}/Rsync", request_serializer=_serialize, response_deserializer=pb.RsyncResponse.FromString
    )


class BulkStream(FrameStream):
    """A FrameStream that can also send data frames encoded by `encode_data_frame`."""

    @classmethod
    def of(cls, stream: FrameStream) -> BulkStream:
        """The same call, as a BulkStream."""
        return cls(stream.call, lambda frame: pb.RsyncRequest(frame=frame))

    async def send_encoded(self, message: bytes) -> None:
        """Send one encoded message (dropped once this side was closed)."""
        async with self._write_lock:
            if not self.closed_for_writing:
                await self.call.write(message)
