"""The edges' BatchingWriter (wire/batching.py): order, merge limits, barriers, resume's unit counts."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from osmo_router.resume.window import units_of
from osmo_router.wire.batching import BatchingWriter
from osmo_router.wire.codec import encode_data_message as data_message
from osmo_router.wire.protocol import pb
from osmo_router.wire.streams import FrameStream

HALF_CLOSE = pb.ExecRequest(frame=pb.Frame(half_close=pb.HalfClose())).SerializeToString()
ACK = pb.ExecRequest(frame=pb.Frame(ack=pb.Ack(received=7))).SerializeToString()
WAIT = 5.0


class GatedCall:
    """A call whose writes each wait for a permit (`release`), recording what was written."""

    def __init__(self, open_gate: bool = False) -> None:
        self.written: list[bytes] = []
        self.permits = asyncio.Semaphore(0)
        self.open_gate = open_gate
        self.in_flight = 0
        self.most_in_flight = 0
        self.fail: BaseException | None = None
        self.ended = False
        self.started = asyncio.Event()

    async def write(self, message: bytes) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.started.set()
        try:
            if not self.open_gate:
                async with asyncio.timeout(WAIT):
                    await self.permits.acquire()
            if self.fail is not None:
                raise self.fail
            self.written.append(message)
        finally:
            self.in_flight -= 1

    async def done_writing(self) -> None:
        self.ended = True

    def done(self) -> bool:
        """Never ended by a server here (a write's error stays its own: wire/streams.py `_outcome`)."""
        return False

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self.permits.release()

    def frames(self) -> list[pb.Frame]:
        return [pb.ExecRequest.FromString(m).frame for m in self.written]


async def settled(writer: BatchingWriter) -> None:
    """Wait (bounded) until everything queued was written."""
    await asyncio.wait_for(writer.flush(), WAIT)
    assert writer.idle


async def first_write(call: GatedCall) -> None:
    """Wait (bounded) until the first write is in flight."""
    await asyncio.wait_for(call.started.wait(), WAIT)


@pytest.mark.asyncio
async def test_an_idle_data_frame_goes_at_once_and_alone() -> None:
    call = GatedCall(open_gate=True)
    writer = BatchingWriter(call.write)
    await writer.write_data(data_message(b"x"))
    await settled(writer)
    assert call.written == [data_message(b"x")]


@pytest.mark.asyncio
async def test_frames_queued_behind_a_write_merge_in_order_but_never_across_a_control_frame() -> None:
    call = GatedCall()
    writer = BatchingWriter(call.write)
    await writer.write_data(data_message(b"a"))  # in flight: the rest queues behind it
    await first_write(call)
    for part in (b"b", b"c"):
        await writer.write_data(data_message(part))
    control = asyncio.create_task(writer.write(HALF_CLOSE))
    await asyncio.sleep(0)  # one step: the barrier is queued behind b and c
    for part in (b"d", b"e", b"f"):
        await writer.write_data(data_message(part))
    call.release(4)
    await asyncio.wait_for(control, WAIT)
    await settled(writer)
    kinds = [(f.WhichOneof("kind"), f.data) for f in call.frames()]
    assert kinds == [("data", b"a"), ("data", b"bc"), ("half_close", b""), ("data", b"def")]
    assert call.most_in_flight == 1
    assert (writer.written, writer.data_frames) == (4, 6)


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=70_000), min_size=1, max_size=40),
    controls=st.sets(st.integers(min_value=0, max_value=39), max_size=5),
    limit=st.sampled_from([1, 4096, 128 * 1024]),
)
@settings(max_examples=40, deadline=None)
def test_merged_frames_keep_bytes_order_limits_and_resume_units(
    sizes: list[int], controls: set[int], limit: int
) -> None:
    asyncio.run(_merge_case(sizes, controls, limit))


async def _merge_case(sizes: list[int], controls: set[int], limit: int) -> None:
    call = GatedCall()
    writer = BatchingWriter(call.write, limit=limit, backlog=1 << 30)
    sent: list[pb.Frame] = []
    barriers = []
    for i, size in enumerate(sizes):
        payload = bytes([i % 251]) * size
        sent.append(pb.Frame(data=payload))
        await writer.write_data(data_message(payload))
        if i in controls:
            sent.append(pb.Frame(half_close=pb.HalfClose()))
            barriers.append(asyncio.create_task(writer.write(HALF_CLOSE)))
            await asyncio.sleep(0)  # queued in this position
    call.release(len(sent))
    await asyncio.wait_for(asyncio.gather(*barriers), WAIT)
    await settled(writer)
    got = call.frames()
    # The same bytes in the same order, control frames where they were, and the same resume units.
    controls_sent = [f.WhichOneof("kind") for f in sent if f.WhichOneof("kind") != "data"]
    assert [f.WhichOneof("kind") for f in got if f.WhichOneof("kind") != "data"] == controls_sent
    assert sum(units_of(f) for f in got) == sum(units_of(f) for f in sent)
    assert b"".join(f.data for f in got) == b"".join(f.data for f in sent)
    assert _split_at_controls(got) == _split_at_controls(sent)
    for frame in got:
        if frame.WhichOneof("kind") == "data" and len(frame.data) > limit:
            # Only a frame that was already past the limit goes out larger than it, and alone.
            assert len(frame.data) in sizes


def _split_chunks(frames: list[pb.Frame]) -> list[list[bytes]]:
    runs: list[list[bytes]] = [[]]
    for f in frames:
        if f.WhichOneof("kind") == "data":
            runs[-1].append(f.data)
        else:
            runs.append([])
    return runs


def _split_at_controls(frames: list[pb.Frame]) -> list[bytes]:
    return [b"".join(r) for r in _split_chunks(frames)]


@pytest.mark.asyncio
async def test_no_merged_frame_passes_the_limit() -> None:
    call = GatedCall()
    writer = BatchingWriter(call.write, limit=16 * 1024, backlog=1 << 30)
    for _ in range(40):
        await writer.write_data(data_message(b"z" * 4096))
    call.release(40)
    await settled(writer)
    payloads = [len(f.data) for f in call.frames()]
    assert sum(payloads) == 40 * 4096
    # All 40 were queued before the writer ran: four to a message, none past the limit.
    assert payloads == [16 * 1024] * 10


@pytest.mark.asyncio
async def test_a_full_backlog_makes_the_sender_wait() -> None:
    call = GatedCall()
    writer = BatchingWriter(call.write, limit=8192, backlog=8192 + 64)
    await writer.write_data(data_message(b"1" * 4096))
    await first_write(call)
    await writer.write_data(data_message(b"2" * 4096))
    await writer.write_data(data_message(b"3" * 4096))
    blocked = asyncio.create_task(writer.write_data(data_message(b"4" * 4096)))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not blocked.done()  # over the backlog: waits until the writer takes the queue
    call.release()
    await asyncio.wait_for(blocked, WAIT)
    call.release(3)
    await settled(writer)
    assert b"".join(f.data for f in call.frames()) == b"1" * 4096 + b"2" * 4096 + b"3" * 4096 + b"4" * 4096


@pytest.mark.asyncio
async def test_a_failed_write_is_raised_to_the_next_caller_and_to_waiting_barriers() -> None:
    call = GatedCall()
    writer = BatchingWriter(call.write)
    await writer.write_data(data_message(b"a"))
    await first_write(call)
    barrier = asyncio.create_task(writer.write(HALF_CLOSE))
    await asyncio.sleep(0)
    call.fail = ConnectionResetError("gone")
    call.release()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(barrier, WAIT)
    with pytest.raises(ConnectionResetError):
        await writer.write_data(data_message(b"b"))
    assert call.written == []


@pytest.mark.asyncio
async def test_frame_stream_flushes_queued_data_before_ending_its_writes() -> None:
    call = GatedCall(open_gate=True)
    stream = FrameStream(call, lambda frame: pb.ExecRequest(frame=frame).SerializeToString(), raw=True)
    for part in (b"a", b"b", b"c"):
        await stream.send_data(part)
    await stream.send(pb.Frame(ack=pb.Ack(received=7)))
    await stream.close()
    assert call.ended
    assert b"".join(f.data for f in call.frames()) == b"abc"
    assert call.frames()[-1].WhichOneof("kind") == "ack"
    await stream.send_data(b"late")  # dropped once closed, as before
    assert b"late" not in b"".join(call.written)


@pytest.mark.asyncio
async def test_an_aborted_frame_stream_drops_its_queue_and_refuses_writes() -> None:
    call = GatedCall()
    call.cancel = lambda: None  # type: ignore[attr-defined]
    stream = FrameStream(call, lambda frame: pb.ExecRequest(frame=frame).SerializeToString(), raw=True)
    await stream.send_data(b"a")
    await first_write(call)
    await stream.send_data(b"b")
    stream.abort()
    with pytest.raises(asyncio.InvalidStateError):
        await stream.send_data(b"c")
    drain = stream.writer._task
    assert drain is not None
    call.release(2)
    await asyncio.wait_for(drain, WAIT)  # the write in flight ends; nothing queued follows it
    assert stream.writer.idle
    assert call.frames()[0].data == b"a" and len(call.written) == 1


@pytest.mark.asyncio
async def test_an_idle_writer_sends_through_try_write_and_keeps_order_when_it_refuses() -> None:
    call = GatedCall()
    direct: list[bytes] = []
    accept = True

    def try_write(message: bytes) -> bool:
        if accept:
            direct.append(message)
        return accept

    writer = BatchingWriter(call.write, try_write=try_write)
    one, two, three, four, five = (data_message(bytes([65 + i]) * 3) for i in range(5))
    await writer.write_data(one)  # idle: out at once, no drain task
    assert direct == [one] and writer.idle and writer.written == 1
    await asyncio.sleep(0)  # a turn of the loop: the sender waited, so it is not a burst
    accept = False
    await writer.write_data(two)  # refused (window closed, say): queued, the drain task writes it
    accept = True
    await writer.write_data(three)  # the writer is busy: queued behind, never jumps ahead
    assert direct == [one] and not writer.idle
    call.release()
    async with asyncio.timeout(WAIT):
        await writer.flush()
    assert [f.data for f in call.frames()] == [b"BBBCCC"]  # merged behind the write in flight
    await asyncio.sleep(0)
    await writer.write_data(four)
    await writer.write_data(five)  # a burst (no wait in between): queued for the drain task to merge
    assert direct == [one, four] and writer.data_frames == 5
    call.release()
    async with asyncio.timeout(WAIT):
        await writer.flush()
    assert [f.data for f in call.frames()] == [b"BBBCCC", b"EEE"]


@pytest.mark.asyncio
async def test_a_burst_of_messages_too_large_to_merge_goes_direct_one_after_another() -> None:
    # The turn's hold queues a burst's second frame so that it can merge; a bulk message (payload
    # over the limit) merges with nothing, so it goes direct too instead of costing a drain task.
    call = GatedCall()
    direct: list[bytes] = []

    def try_write(message: bytes) -> bool:
        direct.append(message)
        return True

    writer = BatchingWriter(call.write, try_write=try_write, limit=1024)
    big = [data_message(bytes([65 + i]) * 2048) for i in range(3)]
    at_limit = data_message(b"x" * 1024)
    for message in big:
        await writer.write_data(message)  # one burst: no turn of the loop in between
    assert direct == big and writer.idle and writer.written == 3
    await writer.write_data(at_limit)  # could still merge with what follows: held for this turn
    assert direct == big and not writer.idle
    call.release()
    async with asyncio.timeout(WAIT):
        await writer.flush()
    assert [f.data for f in call.frames()] == [b"x" * 1024]


@pytest.mark.asyncio
async def test_try_write_single_takes_no_turn_hold_but_respects_others_and_the_end_of_writing() -> None:
    # A socket pump sends at most one message per turn: its at-once path schedules no release of a
    # turn hold (issue 18), yet a hold taken by a `write_data` of this turn still queues it behind
    # (a burst merges), a barrier being written is never passed, and after the end of writing began
    # (FrameStream.close: refuse_direct) nothing goes at once.
    call = GatedCall()
    direct: list[bytes] = []

    def try_write(message: bytes) -> bool:
        direct.append(message)
        return True

    writer = BatchingWriter(call.write, try_write=try_write)
    one, two, three, four = (data_message(bytes([65 + i]) * 3) for i in range(4))
    assert writer.try_write_single(one) and writer.try_write_single(two)  # no hold taken between them
    assert direct == [one, two] and writer.idle
    await writer.write_data(three)  # at once, taking this turn's hold
    assert direct == [one, two, three]
    assert not writer.try_write_single(four)  # held by the write_data of this turn: declined, to queue
    await asyncio.sleep(0)
    barrier = asyncio.ensure_future(writer.write(HALF_CLOSE))  # a control frame in flight (gated)
    async with asyncio.timeout(WAIT):
        await call.started.wait()
    assert not writer.try_write_single(four)  # never passes a barrier being written
    call.release()
    async with asyncio.timeout(WAIT):
        await barrier
    assert writer.try_write_single(four)
    writer.refuse_direct()
    assert not writer.try_write_single(one) and not writer.try_write_data(one)
    assert direct == [one, two, three, four]
