"""FrameStream (wire/streams.py): a write to a call the router already ended reports the router's status."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from osmo_router.wire.codec import BULK_PAYLOAD, encode_data_message, fast_deserializer, payload_offset
from osmo_router.wire.protocol import pb
from osmo_router.wire.streams import FrameStream


class FinishedCall:
    """A call the server ended with `code` before this side's next write (as grpc.aio's and the native
    channel's calls behave: the write raises InvalidStateError, the status is there to be asked)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    async def write(self, message: object) -> None:
        raise asyncio.InvalidStateError("RPC already finished.")

    def done(self) -> bool:
        return True

    async def code(self) -> grpc.StatusCode:
        return self._code

    async def details(self) -> str:
        return self._details

    async def initial_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata:
        return grpc.aio.Metadata(("x-reason", "drain"))


@pytest.mark.asyncio
@pytest.mark.parametrize("raw", [False, True])
async def test_a_write_after_the_router_ended_the_call_raises_its_status(raw: bool) -> None:
    stream = FrameStream(FinishedCall(grpc.StatusCode.UNAVAILABLE, "router draining"), lambda f: f, raw=raw)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if raw:  # queued (wire/batching.py): its write's failure is raised by the next send
            await stream.send_data_message(b"\x12\x03\x0a\x01x")
            await asyncio.wait_for(stream.send_data_message(b"\x12\x03\x0a\x01y"), 5)
        await stream.send(pb.Frame(data=b"x"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "router draining"
    assert ("x-reason", "drain") in list(caught.value.trailing_metadata())


@pytest.mark.asyncio
@pytest.mark.parametrize("code", [grpc.StatusCode.OK, grpc.StatusCode.CANCELLED])
async def test_a_write_after_a_clean_end_or_our_own_cancel_still_says_the_call_is_over(code: grpc.StatusCode) -> None:
    stream = FrameStream(FinishedCall(code, ""), lambda f: f)
    with pytest.raises(asyncio.InvalidStateError, match="already finished"):
        await stream.send(pb.Frame(data=b"x"))


class ListenedCall:
    """A native call's listening side: `set_listener(listener, raw)` as h2's Call takes it."""

    def __init__(self) -> None:
        self.listener: object = None
        self.raw = False
        self.deserialize = fast_deserializer(pb.ConnectResponse)

    def set_listener(self, listener: object, raw: bool = False) -> None:
        self.listener, self.raw = listener, raw

    async def write(self, message: object) -> None:
        """(never written to here)"""


def test_a_raw_stream_hands_data_frames_to_the_data_listener_as_payloads_and_the_rest_decoded() -> None:
    call = ListenedCall()
    stream = FrameStream(call, lambda f: f, raw=True)
    frames: list[pb.Frame] = []
    payloads: list[bytes] = []

    def data(payload: memoryview) -> bool:
        payloads.append(bytes(payload))
        return True

    assert stream.set_listener(lambda f: frames.append(f) is None, data)
    assert call.raw and callable(call.listener)
    listen = call.listener
    assert listen(encode_data_message(b"hello")) is True
    assert listen(encode_data_message(b"x" * 70_000)) is True  # multi-byte lengths
    assert payloads == [b"hello", b"x" * 70_000] and frames == []
    # Anything else is decoded and goes to the frame listener (a half-close is noted on the way).
    assert listen(pb.ConnectResponse(frame=pb.Frame(half_close=pb.HalfClose())).SerializeToString()) is True
    assert len(frames) == 1 and frames[0].WhichOneof("kind") == "half_close" and stream.peer_half_closed
    # Undecodable bytes are left for `recv`, which reports them.
    assert listen(b"\xff\xff") is False
    # Without a data listener (or on a stream that is not raw) the call decodes every message itself.
    stream.set_listener(lambda f: True)
    assert not call.raw


@pytest.mark.parametrize("size", [126, 16_384, BULK_PAYLOAD - 1, BULK_PAYLOAD, BULK_PAYLOAD + 1])
def test_bulk_header_and_offset_match_protobuf(size: int) -> None:
    """A bulk read's message (its header made once, its offset found without a walk) is protobuf's encoding,
    and a message that only looks like one (another field's tag first) is not taken for one."""
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    message = encode_data_message(payload)
    assert message == pb.ConnectResponse(frame=pb.Frame(data=payload)).SerializeToString()
    assert payload_offset(message) == len(message) - size
    assert payload_offset(memoryview(message)) == len(message) - size
    assert payload_offset(b"\x1a" + message[1:]) == -1
