"""ResumableStream's paths without task hops (issue 18): frames pushed by the stream under it
(set_listener), delivered by the handler's sink (set_sink), and sent at once (try_send_data_message).

The in-memory streams of test_resume_stream.py, here pushing what arrives to a listener when one is
set; the sinks decline at random, so the pushed, queued and sunk paths mix: nothing may be lost,
repeated or reordered, across cuts too.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from osmo_router.client.resume import ResumingStream
from osmo_router.resume.stream import ResumableStream
from osmo_router.transport import SessionStream
from osmo_router.wire.codec import encode_data_message
from osmo_router.wire.protocol import pb
from tests.unit.test_resume_stream import PipeEnd, Side, until_sent


class PushEnd(PipeEnd):
    """A PipeEnd whose frames go to its listener as they are sent (when it takes them), else to `recv`."""

    def __init__(self, inbox: asyncio.Queue[pb.Frame | None], outbox: asyncio.Queue[pb.Frame | None]) -> None:
        super().__init__(inbox, outbox)
        self.listener: Callable[[pb.Frame], bool] | None = None
        self.data: Callable[[memoryview], bool] | None = None
        self.pushed = 0

    def set_listener(
        self, listener: Callable[[pb.Frame], bool] | None, data: Callable[[memoryview], bool] | None = None
    ) -> bool:
        self.listener = listener
        self.data = data
        return True

    async def send(self, frame: pb.Frame) -> None:
        peer = self.peer
        assert isinstance(peer, PushEnd)
        if not self.broken.is_set() and peer.listener is not None and self.outbox.empty() and peer.take(frame):
            peer.pushed += 1
            self.sent.append(frame)
            self.progress.set()
            return
        await super().send(frame)

    def take(self, frame: pb.Frame) -> bool:
        """What FrameStream's listeners do: a data frame to the data listener (as its payload) if one is set."""
        if self.data is not None and frame.WhichOneof("kind") == "data":
            return self.data(memoryview(frame.data))
        assert self.listener is not None
        return self.listener(frame)


class RawPushEnd(PushEnd):
    """A PushEnd standing for a raw FrameStream: data frames are pushed as their payloads."""

    raw = True


def push_pipe(raw: bool = False) -> tuple[PushEnd, PushEnd]:
    a_in: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
    b_in: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
    kind = RawPushEnd if raw else PushEnd
    a, b = kind(a_in, b_in), kind(b_in, a_in)
    a.peer, b.peer = b, a
    return a, b


async def push_reconnect(a: Side, b: Side, raw: bool = False) -> None:
    async with asyncio.timeout(5):
        await a.waiting.wait()
        await b.waiting.wait()
    end_a, end_b = push_pipe(raw)
    a.next.put_nowait((end_a, b))
    b.next.put_nowait((end_b, a))


class Collector:
    """A handler's sink that takes data frames (declining some at random) and a drain for the rest."""

    def __init__(self, side: ResumableStream, rng: random.Random) -> None:
        self.side = side
        self.rng = rng
        self.got = bytearray()
        self.sunk = 0
        self.sunk_payloads = 0

    def sink(self, frame: pb.Frame) -> bool:
        if frame.WhichOneof("kind") != "data" or self.rng.random() < 0.3:
            return False
        self.got += frame.data
        self.sunk += 1
        return True

    def sink_data(self, payload: memoryview) -> bool:
        if self.rng.random() < 0.3:
            return False
        self.got += payload
        self.sunk += 1
        self.sunk_payloads += 1
        return True

    async def drain(self) -> bytes:
        self.side.set_sink(self.sink, self.sink_data)
        while (frame := await self.side.recv()) is not None:
            if frame.WhichOneof("kind") == "half_close":
                break
            self.got += frame.data
        self.side.set_sink(None)
        return bytes(self.got)


async def pump(sender: Side, chunks: list[bytes]) -> None:
    for chunk in chunks:
        await sender.send(pb.Frame(data=chunk))
    await sender.send(pb.Frame(half_close=pb.HalfClose()))
    await sender.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("raw", [False, True], ids=["frames", "payloads"])
@pytest.mark.parametrize("cuts", [0, 1, 3])
async def test_pushed_and_sunk_frames_arrive_exactly_once_in_order(cuts: int, raw: bool) -> None:
    rng = random.Random(cuts)
    chunks_ab = [rng.randbytes(rng.randint(1, 3000)) for _ in range(400)]
    chunks_ba = [rng.randbytes(rng.randint(1, 3000)) for _ in range(400)]
    end_a, end_b = push_pipe(raw)
    a, b = Side(end_a, 64 * 1024), Side(end_b, 64 * 1024)
    a.start()
    b.start()
    at_a, at_b = Collector(a, rng), Collector(b, rng)
    work = asyncio.gather(pump(a, chunks_ab), pump(b, chunks_ba), at_b.drain(), at_a.drain())
    for _ in range(cuts):
        await until_sent(a, 20)
        current = a._inner
        assert isinstance(current, PipeEnd)
        current.cut()
        await push_reconnect(a, b, raw)
    _, _, got_b, got_a = await asyncio.wait_for(work, 20)
    assert got_b == b"".join(chunks_ab)
    assert got_a == b"".join(chunks_ba)
    assert a.resumes == cuts and b.resumes == cuts
    # Both paths were taken: frames pushed by the stream, and of those some sunk, some queued.
    assert end_b.pushed > 0 and at_b.sunk > 0 and at_b.sunk < len(chunks_ab)
    # Raw: data frames were pushed and sunk as payloads (no frame object); else never so.
    assert (at_b.sunk_payloads > 0) == raw and (at_a.sunk_payloads > 0) == raw


@pytest.mark.parametrize("raw", [False, True], ids=["frames", "payloads"])
@pytest.mark.asyncio
async def test_sunk_frames_are_acknowledged_so_the_sender_goes_on(raw: bool) -> None:
    # (payloads: the data sink's path, which acknowledges inline, calling Acknowledger.consumed only
    # when a timer is not already due to: issue 18)
    end_a, end_b = push_pipe(raw)
    a, b = Side(end_a, 16 * 1024), Side(end_b, 16 * 1024)
    a.start()
    b.start()
    taken = bytearray()
    payloads = 0

    def sink(frame: pb.Frame) -> bool:
        if frame.WhichOneof("kind") != "data":
            return False
        taken.extend(frame.data)
        return True

    def data(payload: memoryview) -> bool:
        nonlocal payloads
        payloads += 1
        taken.extend(payload)
        return True

    b.set_sink(sink, data)
    receiver = asyncio.create_task(b.recv())  # the handler waits: the sink may deliver
    for _ in range(100):  # (bounded: a few turns of the loop until the task waits in recv)
        if b._handler_waiting:
            break
        await asyncio.sleep(0)
    assert b._handler_waiting
    # 256 KiB through a 16 KiB replay window: only acknowledgements of what the sink took let it pass.
    await asyncio.wait_for(pump(a, [b"y" * 4096] * 64), 10)
    assert bytes(taken) == b"y" * 4096 * 64
    assert (payloads > 0) == raw
    frame = await asyncio.wait_for(receiver, 5)  # the half-close is never sunk: recv gets it
    assert frame is not None and frame.WhichOneof("kind") == "half_close"
    a.abort()
    b.abort()


class DirectEnd(PipeEnd):
    """A raw PipeEnd whose data messages can be sent at once while `open` (a stand-in for FrameStream)."""

    raw = True

    def __init__(self, inbox: asyncio.Queue[pb.Frame | None], outbox: asyncio.Queue[pb.Frame | None]) -> None:
        super().__init__(inbox, outbox)
        self.open = True
        self.direct: list[bytes] = []

    def try_send_data_message(self, message: bytes) -> bool:
        if not self.open:
            return False
        self.direct.append(message)
        return True

    async def send_data_message(self, message: bytes) -> None:
        self.direct.append(message)


@pytest.mark.asyncio
async def test_try_send_numbers_and_holds_what_it_sends_and_declines_when_it_would_wait() -> None:
    a_in: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
    b_in: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
    end = DirectEnd(a_in, b_in)
    side = ResumableStream(end, replay_bytes=1024)
    first, second = encode_data_message(b"a" * 600), encode_data_message(b"b" * 600)
    assert side.try_send_data_message(first)
    assert end.direct == [first]
    assert side.buffer.end == 600 and len(side.buffer) == 1  # numbered and held for a resume
    # The replay buffer has no room for a second: declined, nothing sent or held.
    assert not side.try_send_data_message(second)
    assert end.direct == [first] and len(side.buffer) == 1
    side.buffer.ack(600)
    end.open = False  # the stream under it would wait: declined, nothing held
    assert not side.try_send_data_message(second)
    assert len(side.buffer) == 0 and side.buffer.end == 600
    end.open = True
    async with side._write_lock:  # an acknowledgement being written: never passed
        assert not side.try_send_data_message(second)
    assert side.try_send_data_message(second)
    assert end.direct == [first, second] and side.buffer.end == 1200
    # A sender that knows the payload's size (a socket pump) says it: numbered by it, resent from it.
    side.buffer.ack(1200)
    third = encode_data_message(b"0123456")
    assert side.try_send_data_message(third, 7)
    assert side.buffer.end == 1207
    assert [item for _, item in side.buffer.since(1203)] == [encode_data_message(b"3456")]
    side.abort()


async def _no_reopen() -> tuple[SessionStream, int]:
    raise AssertionError("no resume here")


async def _until_waiting(side: ResumableStream) -> None:
    for _ in range(100):  # (bounded: a few turns of the loop until the task waits in recv)
        if side._handler_waiting:
            return
        await asyncio.sleep(0)
    raise AssertionError("the handler never waited")


@pytest.mark.asyncio
@pytest.mark.parametrize("answer", ["none", "resume"])
async def test_the_client_sinks_payloads_only_once_the_agent_answered(answer: str) -> None:
    """Before the agent's first answer every frame goes through the client's `_take` (which falls back
    from resume on a frame that is not a Resume); after it, data payloads go to the data sink."""
    agent_end, client_end = push_pipe(raw=True)
    client = ResumingStream(client_end, reopen=_no_reopen, secret="s", grace=5.0, notify=None)
    client.start()
    got: list[bytes] = []
    client.set_sink(lambda frame: False, lambda payload: got.append(bytes(payload)) is None)
    receiver = asyncio.create_task(client.recv())
    await _until_waiting(client)
    if answer == "resume":
        await agent_end.send(pb.Frame(resume=pb.Resume(grace_seconds=5, window_bytes=65536)))
        assert client.confirmed and client.resumable
    await agent_end.send(pb.Frame(data=b"first"))
    if answer == "none":
        # Not sunk: `_take` saw it, fell back from resume (no Resume came first) and queued it for recv.
        assert got == [] and not client.resumable and client.answered.is_set()
        frame = await asyncio.wait_for(receiver, 5)
        assert frame is not None and frame.data == b"first"
        receiver = asyncio.create_task(client.recv())
        await _until_waiting(client)
    else:
        assert got == [b"first"]
    await agent_end.send(pb.Frame(data=b"second"))
    assert got[-1] == b"second"
    receiver.cancel()
    client.abort()
