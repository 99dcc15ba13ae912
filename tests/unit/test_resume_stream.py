"""ResumableStream (resume/stream.py) over in-memory streams that a test cuts: nothing lost, nothing twice."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from osmo_router.resume import core
from osmo_router.resume.stream import ResumableStream, SessionLost
from osmo_router.transport import SessionStream
from osmo_router.wire.protocol import pb


class Cut(ConnectionError):
    """The in-memory stream was cut."""


class PipeEnd:
    """One end of an in-memory stream of frames; `cut` breaks both ends."""

    def __init__(self, inbox: asyncio.Queue[pb.Frame | None], outbox: asyncio.Queue[pb.Frame | None]) -> None:
        self.inbox, self.outbox = inbox, outbox
        self.broken = asyncio.Event()
        self.peer: PipeEnd | None = None
        self.sent: list[pb.Frame] = []
        self.progress = asyncio.Event()

    raw = False

    def cut(self) -> None:
        for end in (self, self.peer):
            if end is not None:
                end.broken.set()
                end.inbox.put_nowait(None)

    async def send(self, frame: pb.Frame) -> None:
        if self.broken.is_set():
            raise Cut("cut")
        self.sent.append(frame)
        self.progress.set()
        await self.outbox.put(frame)

    async def recv(self) -> pb.Frame | None:
        frame = await self.inbox.get()
        if frame is None or self.broken.is_set():
            raise Cut("cut")
        return frame

    async def close(self) -> None:
        return None

    async def send_data(self, payload: bytes) -> None:
        await self.send(pb.Frame(data=payload))

    async def send_error(self, code: grpc.StatusCode, message: str) -> None:
        await self.send(pb.Frame(error=pb.Error(code=code.value[0], message=message)))

    async def send_data_message(self, message: bytes) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        self.cut()


def pipe() -> tuple[PipeEnd, PipeEnd]:
    a_in: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
    b_in: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
    a, b = PipeEnd(a_in, b_in), PipeEnd(b_in, a_in)
    a.peer, b.peer = b, a
    return a, b


class Side(ResumableStream):
    """A side whose resume takes the next in-memory stream the test hands out."""

    def __init__(self, inner: SessionStream, replay_bytes: int) -> None:
        super().__init__(inner, replay_bytes=replay_bytes)
        self.set_peer_window(replay_bytes)
        self.next: asyncio.Queue[tuple[SessionStream, ResumableStream]] = asyncio.Queue()
        self.fail_resume: SessionLost | None = None
        self.waiting = asyncio.Event()

    async def _reconnect(self, cause: str) -> tuple[SessionStream, int]:
        if self.fail_resume is not None:
            raise self.fail_resume
        self.waiting.set()
        inner, peer = await self.next.get()
        self.waiting.clear()
        # Both ends noticed the cut before the test hands out the new stream: `taken` is final.
        return inner, peer.taken


async def reconnect(a: Side, b: Side) -> None:
    """Wait until both sides lost their stream, then give them a new one."""
    async with asyncio.timeout(5):
        await a.waiting.wait()
        await b.waiting.wait()
    end_a, end_b = pipe()
    a.next.put_nowait((end_a, b))
    b.next.put_nowait((end_b, a))


async def until_sent(side: Side, count: int) -> None:
    """Wait until the side's current stream carried `count` frames."""
    async with asyncio.timeout(5):
        while True:
            current = side._inner
            if isinstance(current, PipeEnd):
                if len(current.sent) >= count:
                    return
                current.progress.clear()
                await current.progress.wait()
            else:
                await side._connected.wait()


async def pump(sender: Side, chunks: list[bytes]) -> None:
    for chunk in chunks:
        await sender.send(pb.Frame(data=chunk))
    await sender.send(pb.Frame(half_close=pb.HalfClose()))
    await sender.close()


async def drain(receiver: Side) -> bytes:
    got = bytearray()
    while (frame := await receiver.recv()) is not None:
        if frame.WhichOneof("kind") == "half_close":
            return bytes(got)
        got += frame.data
    return bytes(got)


@pytest.mark.asyncio
@pytest.mark.parametrize("cuts", [0, 1, 3])
async def test_both_directions_arrive_exactly_once_across_cuts(cuts: int) -> None:
    rng = random.Random(cuts)
    chunks_ab = [rng.randbytes(rng.randint(1, 5000)) for _ in range(400)]
    chunks_ba = [rng.randbytes(rng.randint(1, 5000)) for _ in range(400)]
    end_a, end_b = pipe()
    a, b = Side(end_a, 64 * 1024), Side(end_b, 64 * 1024)
    a.start()
    b.start()
    work = asyncio.gather(pump(a, chunks_ab), pump(b, chunks_ba), drain(b), drain(a))
    for _ in range(cuts):
        await until_sent(a, 20)
        current = a._inner
        assert isinstance(current, PipeEnd)
        current.cut()
        await reconnect(a, b)
    _, _, at_b, at_a = await asyncio.wait_for(work, 20)
    assert at_b == b"".join(chunks_ab)
    assert at_a == b"".join(chunks_ba)
    assert a.resumes == cuts and b.resumes == cuts
    # The replay buffers held no more than their bound (plus one frame) at any time they are checked.
    assert a.buffer.bytes <= 64 * 1024 + 6000


@pytest.mark.asyncio
async def test_a_side_that_cannot_resume_reports_why_once() -> None:
    end_a, end_b = pipe()
    a, b = Side(end_a, 1 << 20), Side(end_b, 1 << 20)
    a.fail_resume = SessionLost("the agent holds no such session", grpc.StatusCode.NOT_FOUND)
    a.start()
    b.start()
    end_a.cut()
    frame = await asyncio.wait_for(a.recv(), 5)
    assert frame is not None and frame.WhichOneof("kind") == "error"
    assert frame.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no such session" in frame.error.message
    assert await asyncio.wait_for(a.recv(), 5) is None
    b.abort()


@pytest.mark.asyncio
async def test_a_full_replay_buffer_pauses_the_sender_until_acknowledged() -> None:
    end_a, end_b = pipe()
    a, b = Side(end_a, 16 * 1024), Side(end_b, 16 * 1024)
    a.start()
    b.start()
    sender = asyncio.create_task(pump(a, [b"x" * 4096] * 16))
    async with asyncio.timeout(5):
        while a.buffer.bytes < 12 * 1024:
            end_a.progress.clear()
            await end_a.progress.wait()
    for _ in range(100):
        await asyncio.sleep(0)
    assert not sender.done()  # 64 KiB against a 16 KiB window: nobody consumed, nothing acknowledged
    assert a.buffer.bytes <= 16 * 1024 + 4096 + 256
    got = await asyncio.wait_for(drain(b), 5)
    await asyncio.wait_for(sender, 5)
    assert got == b"x" * 4096 * 16
    a.abort()
    b.abort()


class EndedByTheServer(PipeEnd):
    """A call the server has ended (its trailers not read yet): writes fail at once; and, as with
    grpc.aio's and the native channel's calls, a read waiting when the call is cancelled here
    (`abort`) raises CancelledError, although the reading task itself was not cancelled."""

    aborted = False

    async def send(self, frame: pb.Frame) -> None:
        raise asyncio.InvalidStateError("RPC already finished.")

    async def recv(self) -> pb.Frame | None:
        frame = await self.inbox.get()
        if self.aborted:
            raise asyncio.CancelledError()
        if frame is None or self.broken.is_set():
            raise Cut("cut")
        return frame

    def abort(self) -> None:
        self.aborted = True
        self.cut()


@pytest.mark.asyncio
async def test_the_reader_survives_a_read_cancelled_by_the_abort_after_a_failed_write() -> None:
    # A draining router ends a call; the side's next write fails before its reader saw the end, so
    # the write's break aborts the call under the waiting reader. The reader must take that as the
    # break it is and go on with the resumed stream (it died, and the session stalled after resuming).
    a_in: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
    b_in: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
    end_a, end_b = EndedByTheServer(a_in, b_in), PipeEnd(b_in, a_in)
    end_a.peer, end_b.peer = end_b, end_a
    a, b = Side(end_a, 64 * 1024), Side(end_b, 64 * 1024)
    a.start()
    b.start()
    chunks = [bytes([n]) * 1000 for n in range(50)]
    work = asyncio.gather(pump(a, chunks), pump(b, chunks), drain(b), drain(a))
    await reconnect(a, b)
    _, _, at_b, at_a = await asyncio.wait_for(work, 5)
    assert at_b == at_a == b"".join(chunks)
    assert a.resumes == b.resumes == 1


@pytest.mark.asyncio
async def test_a_peer_that_does_not_resume_is_held_back_by_the_stream_not_taken_without_bound() -> None:
    # An older agent keeps no replay window: only the stream under us can hold it back, so the reader
    # stops taking frames once `replay_bytes` wait for the handler, and the rest stays on the stream.
    limit, size, count = 64 * 1024, 4096, 100
    a, _ = pipe()
    side = Side(a, limit)
    side.resumable = False
    side.acking = False
    side.start()
    for i in range(count):
        a.inbox.put_nowait(pb.Frame(data=bytes([i]) * size))
    left, still = a.inbox.qsize(), 0
    while left and still < 100:  # until the reader stops taking (it yields at least once per frame)
        await asyncio.sleep(0)
        still = still + 1 if a.inbox.qsize() == left else 0
        left = a.inbox.qsize()
    assert side._incoming_units <= limit + size and a.inbox.qsize() >= count - limit // size - 1
    received = [await asyncio.wait_for(side.recv(), 10) for _ in range(count)]
    assert [frame.data for frame in received] == [bytes([i]) * size for i in range(count)]
    assert side._lost is None
    side.abort()


@pytest.mark.asyncio
async def test_what_is_taken_and_not_consumed_is_held_against_the_peers_window_not_ours() -> None:
    # The agent keeps 16 MiB unacknowledged, the client 8: a client whose stdout is not read holds
    # up to the agent's window (one resume's worth with it) without calling it an overrun.
    ours, theirs, size = 64 * 1024, 1024 * 1024, 16 * 1024
    a, _ = pipe()
    side = Side(a, ours)
    side.set_peer_window(theirs)
    side.start()
    count = (theirs + theirs // 2) // size  # past twice our window and 1 MiB, within twice theirs
    for i in range(count):
        a.inbox.put_nowait(pb.Frame(data=bytes([i % 256]) * size))
    for _ in range(100_000):  # until the reader took them all (it yields at least once per frame)
        if not a.inbox.qsize():
            break
        await asyncio.sleep(0)
    assert side._lost is None and side._incoming_units == count * size
    received = [await asyncio.wait_for(side.recv(), 10) for _ in range(count)]
    assert [frame.data for frame in received] == [bytes([i % 256]) * size for i in range(count)]
    side.abort()


@pytest.mark.asyncio
async def test_a_peer_that_announces_a_huge_window_is_still_held_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    # A hostile agent says it keeps 1 GiB unacknowledged, then sends without stopping: the client
    # believes its window only up to MAX_PEER_WINDOW (here 256 KiB) and ends the session past twice
    # that + 1 MiB, instead of holding whatever it is sent.
    monkeypatch.setattr(core, "MAX_PEER_WINDOW", 256 * 1024)
    size = 16 * 1024
    a, _ = pipe()
    side = Side(a, 64 * 1024)
    side.set_peer_window(1 << 30)
    side.start()
    count = (2 * 256 * 1024 + 1024 * 1024) // size + 8  # just past the capped bound
    for i in range(count):
        a.inbox.put_nowait(pb.Frame(data=bytes([i % 256]) * size))
    for _ in range(100_000):  # until the reader took them all or the session was lost
        if side._lost is not None or not a.inbox.qsize():
            break
        await asyncio.sleep(0)
    assert side._lost is not None and side._lost.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert side._incoming_units <= 2 * 256 * 1024 + 1024 * 1024 + size


class RevokedByTheServer(PipeEnd):
    """A call the router ended on purpose (access revoked), heard first by a write: the stream's
    write raises the router's status (wire/streams.py FrameStream._outcome), not "RPC already finished"."""

    async def send(self, frame: pb.Frame) -> None:
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            "access to the workflow revoked",
        )


@pytest.mark.asyncio
async def test_an_end_on_purpose_heard_by_a_write_ends_the_session_instead_of_resuming() -> None:
    a_in: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
    b_in: asyncio.Queue[pb.Frame | None] = asyncio.Queue()
    end_a, end_b = RevokedByTheServer(a_in, b_in), PipeEnd(b_in, a_in)
    end_a.peer, end_b.peer = end_b, end_a
    a, b = Side(end_a, 64 * 1024), Side(end_b, 64 * 1024)
    a.start()
    b.start()
    await a.send(pb.Frame(data=b"x"))
    frame = await asyncio.wait_for(a.recv(), 5)
    assert frame is not None and frame.WhichOneof("kind") == "error", frame
    assert frame.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    assert "revoked" in frame.error.message
    assert not a.waiting.is_set() and a.resumes == 0  # never tried to resume
    b.abort()
