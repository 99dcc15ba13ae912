"""Byte-level data frames and the router's coalescing of queued frames, checked against protobuf itself."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osmo_router.router.core.coalesce import COALESCE_LIMIT, coalesce
from osmo_router.router.core.flow_control import FlowQueue
from osmo_router.wire.codec import (
    ENCODED_HALF_CLOSE,
    data_header,
    decode_data_message,
    merge_data_messages,
    payload_offset,
)
from osmo_router.wire.codec import encode_data_message as data_message
from osmo_router.wire.protocol import pb

CONTROL_FRAMES = [
    pb.Frame(half_close=pb.HalfClose()),
    pb.Frame(stderr=b"err"),
    pb.Frame(exit_status=pb.ExitStatus(code=3)),
    pb.Frame(signal=pb.Signal(number=2)),
    pb.Frame(datagram=pb.Datagram(payload=b"udp", peer="127.0.0.1:1")),
    pb.Frame(error=pb.Error(code=14, message="gone")),
]


def parse(message: bytes) -> pb.Frame:
    """The frame protobuf decodes from a message (the same on every stream)."""
    return pb.ExecResponse.FromString(message).frame


@given(st.binary(max_size=70_000))
@settings(max_examples=60, deadline=None)
def test_data_message_is_what_protobuf_encodes(payload: bytes) -> None:
    expected = pb.ExecRequest(frame=pb.Frame(data=payload)).SerializeToString()
    assert data_message(payload) == expected
    offset = payload_offset(expected)
    assert offset >= 0
    assert expected[offset:] == payload
    assert data_header(len(payload)) == expected[:offset]


def test_every_size_around_the_one_byte_lengths_is_what_protobuf_encodes() -> None:
    # Payloads up to 125 bytes take the short path (one-byte lengths), longer ones the varint walk.
    for size in range(300):
        expected = pb.ExecRequest(frame=pb.Frame(data=b"x" * size)).SerializeToString()
        assert data_header(size) == expected[: len(expected) - size], size
        assert payload_offset(expected) == len(expected) - size, size
        if size:
            assert payload_offset(expected[:-1]) == -1, size  # one byte short of its lengths


@pytest.mark.parametrize("frame", CONTROL_FRAMES)
def test_control_frames_are_not_data(frame: pb.Frame) -> None:
    assert payload_offset(pb.ConnectResponse(frame=frame).SerializeToString()) == -1


def test_non_frame_messages_are_not_data() -> None:
    assert payload_offset(pb.ExecRequest(init=pb.ExecInit(command=["cat"])).SerializeToString()) == -1
    assert payload_offset(pb.ExecResponse(end=pb.SessionEnd()).SerializeToString()) == -1
    assert payload_offset(b"") == -1


def test_a_data_frame_with_an_extra_field_is_not_pure_data() -> None:
    # data followed by a second Frame field: protobuf accepts it, merging must not.
    inner = b"\x0a\x02hi" + b"\x12\x01e"
    message = b"\x12" + bytes((len(inner),)) + inner
    assert payload_offset(message) == -1
    assert decode_data_message(message) is None


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_arbitrary_bytes_are_data_only_if_protobuf_agrees(raw: bytes) -> None:
    offset = payload_offset(raw)
    if offset >= 0:
        frame = parse(raw)
        assert frame.WhichOneof("kind") == "data"
        assert frame.data == raw[offset:]


@given(st.lists(st.binary(max_size=5000), min_size=1, max_size=10))
@settings(max_examples=60, deadline=None)
def test_merge_concatenates_payloads(payloads: list[bytes]) -> None:
    messages = [data_message(p) for p in payloads]
    merged = merge_data_messages(messages, [payload_offset(m) for m in messages])
    assert parse(merged).data == b"".join(payloads)
    assert merged == data_message(b"".join(payloads))


def _queue(messages: list[bytes]) -> FlowQueue:
    queue = FlowQueue(len(messages) + 1)
    for m in messages:
        queue._items.append(m)
    return queue


def _drain(queue: FlowQueue) -> list[bytes]:
    out = []
    while queue.peek() is not None:
        out.append(coalesce(queue.pop(), queue))
    return out


# A stream is a list of items: bytes for a data payload, an int for one of CONTROL_FRAMES.
STREAM = st.lists(st.one_of(st.binary(max_size=40_000), st.integers(0, len(CONTROL_FRAMES) - 1)), max_size=30)


def _encode(item: bytes | int) -> bytes:
    if isinstance(item, bytes):
        return data_message(item)
    return pb.ConnectResponse(frame=CONTROL_FRAMES[item]).SerializeToString()


@given(STREAM)
@settings(max_examples=100, deadline=None)
def test_coalescing_keeps_bytes_and_order_and_never_crosses_control_frames(items: list[bytes | int]) -> None:
    sent = [_encode(i) for i in items]
    received = _drain(_queue(sent))
    # What the receiver sees: the same control frames in the same places, data runs merged.
    expected: list[tuple[str, bytes]] = []
    for item in items:
        if isinstance(item, bytes) and expected and expected[-1][0] == "data":
            expected[-1] = ("data", expected[-1][1] + item)
        elif isinstance(item, bytes):
            expected.append(("data", item))
        else:
            expected.append(("control", _encode(item)))
    got: list[tuple[str, bytes]] = []
    for message in received:
        frame = parse(message)
        if frame.WhichOneof("kind") == "data":
            assert len(frame.data) <= COALESCE_LIMIT
            if got and got[-1][0] == "data":
                got[-1] = ("data", got[-1][1] + frame.data)
            else:
                got.append(("data", frame.data))
        else:
            got.append(("control", message))
    assert got == expected


def test_merged_messages_respect_the_limit() -> None:
    sent = [data_message(b"x" * 4096) for _ in range(100)]
    received = _drain(_queue(sent))
    sizes = [len(parse(m).data) for m in received]
    assert sum(sizes) == 100 * 4096
    assert all(size <= COALESCE_LIMIT for size in sizes)
    assert len(received) == 4  # 32 + 32 + 32 + 4 frames


def test_a_large_frame_is_sent_alone() -> None:
    big = data_message(b"y" * COALESCE_LIMIT)
    queue = _queue([data_message(b"a")])
    assert coalesce(big, queue) is big
    assert len(queue) == 1


def test_nothing_queued_sends_the_message_as_it_is() -> None:
    message = data_message(b"alone")
    assert coalesce(message, _queue([])) is message


def test_half_close_stays_behind_the_data() -> None:
    queue = _queue([data_message(b"b"), ENCODED_HALF_CLOSE, data_message(b"c")])
    first = coalesce(data_message(b"a"), queue)
    assert parse(first).data == b"ab"
    assert queue.pop() == ENCODED_HALF_CLOSE


@pytest.mark.asyncio
async def test_coalescing_wakes_a_blocked_producer() -> None:
    queue = FlowQueue(2)
    await queue.put(data_message(b"1"))
    await queue.put(data_message(b"2"))
    producer = asyncio.create_task(queue.put(data_message(b"3")))
    await asyncio.sleep(0)
    assert not producer.done()
    first = await queue.get()
    assert first is not None
    merged = coalesce(first, queue)
    async with asyncio.timeout(5):
        await producer
    assert parse(merged).data == b"12"
    assert queue.peek() == data_message(b"3")
