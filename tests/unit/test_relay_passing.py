"""The router relay's hand-over as messages arrive (relay._Passing, FlowQueue.offer; issue 18): only
data frames, only while the reader waits and the writer's sink sends at once; else left to the reader."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from osmo_router.router.core.budget import ByteBudget
from osmo_router.router.core.flow_control import FlowQueue
from osmo_router.router.core.relay import ENCODED_DETACH, _Passing
from osmo_router.wire.codec import ENCODED_HALF_CLOSE
from osmo_router.wire.protocol import pb


class Session:
    """What the relay counts on a session per message (its bytes: its activity too, Session.last_activity)."""

    def __init__(self) -> None:
        self.bytes_to_agent = self.bytes_to_client = 0


class Hooks:
    """The relay reports nothing per message."""


def frame_message(frame: pb.Frame) -> bytes:
    return pb.ExecRequest(frame=frame).SerializeToString()


@pytest.mark.asyncio
async def test_a_data_frame_passes_only_while_the_reader_waits_and_the_sink_takes_it() -> None:
    budget = ByteBudget(1 << 20)
    queue = FlowQueue(16)
    queue.use_budgets((budget,))
    written: list[bytes] = []
    sink_open = True

    def sink(message: bytes) -> bool:
        if sink_open:
            written.append(message)
        return sink_open

    queue.set_sink(sink)
    session, hooks = Session(), Hooks()
    passing = _Passing(session, queue, hooks, "client_to_agent")  # type: ignore[arg-type]
    data = frame_message(pb.Frame(data=b"x"))
    writer_waits = queue.readable()  # the writer waits for data: the sink may be used
    assert not passing(data)  # the reader is busy with a message: nothing may pass it
    passing.idle = True
    assert passing(data)
    assert written == [data] and session.bytes_to_agent == len(data)
    # Control frames are the reader's to look at, whatever the sink would do.
    exit_status = frame_message(pb.Frame(exit_status=pb.ExitStatus(code=3)))
    for control in (ENCODED_HALF_CLOSE, ENCODED_DETACH, exit_status, b"", b"\x00junk"):
        assert not passing(control)
    sink_open = False  # the writer cannot send at once: left to the reader, nothing counted
    assert not passing(data)
    assert written == [data] and session.bytes_to_agent == len(data)
    sink_open = True
    queue._items.append(b"queued")  # something waits in the queue: nothing jumps it
    assert not passing(data)
    assert written == [data]
    assert not writer_waits.done()  # (every pass went to the sink: the writer was never woken)


class FramedSink:
    """A writer's sink that can send a message still behind its gRPC prefix (relay._DirectWrite: its `framed`,
    called by FlowQueue.pass_through, which counts what it sent in `watchdog.moved`)."""

    def __init__(self) -> None:
        self.open = True
        self.written: list[bytes] = []
        self.watchdog = SimpleNamespace(moved=0)

    def __call__(self, message: bytes) -> bool:
        raise AssertionError("a passed-through message goes to `framed`")

    def framed(self, framed: memoryview) -> bool:
        if self.open:
            self.written.append(framed.tobytes())
        return self.open


def grpc_framed(message: bytes) -> memoryview:
    return memoryview(b"\x00" + len(message).to_bytes(4, "big") + message)


@pytest.mark.asyncio
async def test_a_message_passes_through_as_received_on_the_same_terms() -> None:
    budget = ByteBudget(1 << 20)
    queue = FlowQueue(16)
    queue.use_budgets((budget,))
    sink = FramedSink()
    queue.set_sink(sink)
    session, hooks = Session(), Hooks()
    passing = _Passing(session, queue, hooks, "client_to_agent")  # type: ignore[arg-type]
    data = frame_message(pb.Frame(data=b"x" * 100))
    writer_waits = queue.readable()
    assert not passing.through(grpc_framed(data))  # the reader is busy: nothing may pass it
    passing.idle = True
    assert passing.through(grpc_framed(data))
    assert sink.written == [grpc_framed(data).tobytes()]
    assert session.bytes_to_agent == len(data)  # the message's bytes, not its prefix
    exit_status = frame_message(pb.Frame(exit_status=pb.ExitStatus(code=3)))
    for control in (ENCODED_HALF_CLOSE, ENCODED_DETACH, exit_status, b"\x00junk"):
        assert not passing.through(grpc_framed(control))
    sink.open = False
    assert not passing.through(grpc_framed(data))
    sink.open = True
    budget.used = budget.limit  # another queue of the budget holds all of it: as `put` would wait
    assert not passing.through(grpc_framed(data))
    budget.used = 0
    queue._items.append(b"queued")
    assert not passing.through(grpc_framed(data))
    assert len(sink.written) == 1 and session.bytes_to_agent == len(data)
    assert sink.watchdog.moved == len(data)  # what was sent counts as written, the prefix not
    assert not writer_waits.done()
