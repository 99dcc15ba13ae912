"""client/resume_start.py: what the init of a resumable session announces, and a break before the ready."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from osmo_router.client import resume as client_resume
from osmo_router.client.config import ClientConfig
from osmo_router.client.resume import ResumingStream
from osmo_router.client.resume_start import PendingResumingStream, open_stream, start_resumable
from osmo_router.client.session import BrokeBeforeReady
from osmo_router.dial.config import DialConfig
from osmo_router.router.core.resumes import MIN_KEYED_SECRET
from osmo_router.transport import GRPC
from osmo_router.wire.errors import Unavailable
from osmo_router.wire.keys import key_of_secret
from osmo_router.wire.protocol import pb


@pytest.mark.asyncio
async def test_the_announced_replay_window_is_the_one_the_stream_keeps() -> None:
    sent: list[Any] = []

    async def start(init: Any) -> Any:
        sent.append(init)
        return SimpleNamespace(raw=False, session_key="")

    config = ClientConfig(dial=DialConfig(address="127.0.0.1:1", tls=False), workflow_id="wf")
    transport: Any = SimpleNamespace(name=GRPC)
    init = pb.ExecInit(target=config.target())
    stream = await start_resumable(transport, config, pb.OPERATION_EXEC, init, start, replay_bytes=3 << 20)
    assert isinstance(stream, PendingResumingStream)
    assert stream.buffer.limit == 3 << 20
    # The agent paces its acks and checks overruns by this figure: it must be the window kept.
    assert sent[0].target.resume.window_bytes == 3 << 20
    assert sent[0].target.resume.secret


class _Hanging:
    """A broken first stream as BrokeBeforeReady carries it (its reader waits until the test aborts)."""

    raw = False
    session_key = ""
    agent_resumes = False
    key_known = False

    async def recv(self) -> None:
        await asyncio.Event().wait()

    def abort(self) -> None:
        pass


@pytest.mark.asyncio
async def test_a_break_before_the_ready_resumes_by_the_key_named_after_the_secret() -> None:
    inits: list[Any] = []
    broken = _Hanging()

    async def open_broken(operation: int, init: Any) -> Any:
        inits.append(init)
        raise BrokeBeforeReady("Socket closed", broken)  # type: ignore[arg-type]

    config = ClientConfig(dial=DialConfig(address="127.0.0.1:1", tls=False), workflow_id="wf")
    transport: Any = SimpleNamespace(name=GRPC, open=open_broken)
    stream = await open_stream(transport, config, pb.OPERATION_EXEC, pb.ExecInit(target=config.target()))
    try:
        token = inits[0].target.resume
        assert token.key_from_secret and len(token.secret) >= MIN_KEYED_SECRET
        assert isinstance(stream, ResumingStream)
        # The key the router was asked to give the session, and a resume before any ready is allowed.
        assert stream.session_key == key_of_secret(token.secret)
        assert stream.agent_resumes
    finally:
        stream.abort()


@pytest.mark.asyncio
async def test_a_refusal_before_the_ready_is_no_break() -> None:
    async def refuse(operation: int, init: Any) -> Any:
        raise Unavailable("no agent is registered for workflow 'wf'")

    config = ClientConfig(dial=DialConfig(address="127.0.0.1:1", tls=False), workflow_id="wf")
    transport: Any = SimpleNamespace(name=GRPC, open=refuse)
    with pytest.raises(Unavailable) as raised:
        await open_stream(transport, config, pb.OPERATION_EXEC, pb.ExecInit(target=config.target()))
    assert not isinstance(raised.value, BrokeBeforeReady)


class _Taking(_Hanging):
    """A first stream that takes what is sent on it (the router holds it until the agent joins)."""

    def __init__(self) -> None:
        self.sent: list[pb.Frame] = []

    async def send(self, frame: pb.Frame) -> None:
        self.sent.append(frame)


@pytest.mark.asyncio
async def test_a_sender_waiting_for_room_keeps_resume_once_a_break_before_the_ready_is_resumed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forwarded connection's sender waits for room in the replay buffer (full: nothing is acknowledged
    before the ready), with CONFIRM_WAIT's deadline (no agent known to resume yet). The connection breaks
    before the ready and PendingResumingStream.ready resumes it by the key named after the secret, the
    router out of reach meanwhile. The deadline passing must not make the sender give resume up: that
    dropped what was held, then the message it was sending (no stream to send it on), so the resumed
    session missed bytes or ended DATA_LOSS."""
    monkeypatch.setattr(client_resume, "CONFIRM_WAIT", 0.05)
    first = _Taking()

    async def out_of_reach(token: pb.ResumeToken) -> Any:
        await asyncio.Event().wait()

    stream = ResumingStream(first, reopen=out_of_reach, secret="s" * 32, grace=60, notify=None, replay_bytes=1000)
    try:
        await stream.send(pb.Frame(data=b"a" * 600))
        waiting = asyncio.create_task(stream.send(pb.Frame(data=b"b" * 600)))
        await asyncio.sleep(0)  # (one turn: it waits for room now, with the deadline)
        assert not waiting.done()
        # The break before the ready, as PendingResumingStream.ready handles it: the key is known, resumed.
        first.key_known = True
        stream._broken(stream._generation, "Socket closed")
        done, _ = await asyncio.wait({waiting}, timeout=20 * client_resume.CONFIRM_WAIT)
        assert not done, "the sender gave up waiting: its message went nowhere"
        assert stream.resumable, stream.not_resumable
        assert stream.buffer.end > 0 and not stream.buffer.settled  # what was held is still held
    finally:
        stream.abort()
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


@pytest.mark.asyncio
async def test_a_sender_waiting_for_room_falls_back_when_no_agent_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of the test above: no break, no agent known to resume, no answer within CONFIRM_WAIT
    (an agent that does not resume, whose router's ready said nothing): the session goes on without
    resume and the waiting message goes out on the stream it has."""
    monkeypatch.setattr(client_resume, "CONFIRM_WAIT", 0.05)
    first = _Taking()

    async def never(token: pb.ResumeToken) -> Any:
        raise AssertionError("no break: nothing to resume")

    stream = ResumingStream(first, reopen=never, secret="s" * 32, grace=60, notify=None, replay_bytes=1000)
    try:
        await stream.send(pb.Frame(data=b"a" * 600))
        async with asyncio.timeout(20 * client_resume.CONFIRM_WAIT):
            await stream.send(pb.Frame(data=b"b" * 600))
        assert not stream.resumable
        assert "did not answer the resume request" in stream.not_resumable
        assert [frame.data[:1] for frame in first.sent] == [b"a", b"b"]
    finally:
        stream.abort()
