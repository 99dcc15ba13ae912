"""Units of detach/attach/sessions: the escape key, the attach numbering, held-session reports and ListSessions."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from osmo_router.agent.held_sessions import MAX_HELD, HeldSessions
from osmo_router.client.attach import ESCAPE, EscapeFilter, format_sessions
from osmo_router.client.resume import ResumingStream
from osmo_router.router.auth.identity import Identity, NoAuth
from osmo_router.router.core.registry import MAX_HELD_REPORTED, AgentRegistration, AgentRegistry
from osmo_router.router.grpc.list_sessions import ListSessions
from osmo_router.wire.errors import PermissionDenied, Unavailable
from osmo_router.wire.protocol import pb

ALICE = Identity(subject="alice", workflows=("wf",))


def test_escape_then_d_detaches_and_drops_what_follows() -> None:
    keys = EscapeFilter()
    assert keys.feed(b"ls\r") == (b"ls\r", False)
    assert keys.feed(b"ab\x1ddxyz") == (b"ab", True)


def test_escape_twice_is_one_literal_escape_and_other_keys_pass() -> None:
    keys = EscapeFilter()
    assert keys.feed(b"\x1d\x1d") == (bytes([ESCAPE]), False)
    assert keys.feed(b"\x1dx") == (b"\x1dx", False)


def test_escape_at_the_end_of_a_read_waits_for_the_next() -> None:
    keys = EscapeFilter()
    assert keys.feed(b"a\x1d") == (b"a", False)
    assert keys.feed(b"d") == (b"", True)


def test_sessions_table() -> None:
    entry = pb.HeldSession(session_key="k" * 22, task="t1", summary="bash", attached=False, detached_unix=1000)
    lines = format_sessions([entry], now=1090)
    assert lines[0].split() == ["SESSION", "TASK", "COMMAND", "STATE", "SINCE"]
    assert lines[1].split() == ["k" * 22, "t1", "bash", "detached", "90s", "ago"]


def test_sessions_table_shows_control_characters_as_escapes() -> None:
    """A command's newline broke the table's row; its escape sequences reached the terminal."""
    summary = "sh -c 'sleep 100\necho pwned' '\x1b[31mRED\x1b[0m'"
    entry = pb.HeldSession(session_key="k" * 22, summary=summary, attached=True, started_unix=1000)
    lines = format_sessions([entry], now=1001)
    assert len(lines) == 2
    assert "sleep 100\\necho pwned" in lines[1] and "\\x1b[31mRED\\x1b[0m" in lines[1]
    assert not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in lines[1])


def _report(*entries: pb.HeldSession) -> bytes:
    return pb.RegisterRequest(held=pb.HeldSessions(sessions=entries)).SerializeToString()


def test_registration_keeps_the_latest_report_bounded_and_filters_by_user() -> None:
    reg = AgentRegistration("a1", "wf", "t1", ())
    reg.take_report(_report(pb.HeldSession(session_key="old", user="alice")))
    many = [pb.HeldSession(session_key=f"k{i}", user="alice" if i % 2 else "bob") for i in range(300)]
    reg.take_report(_report(*many))
    assert len(reg.held) == MAX_HELD_REPORTED
    mine = reg.held_by("alice")
    assert {e.user for e in mine} == {"alice"} and {e.task for e in mine} == {"t1"}
    assert "old" not in {e.session_key for e in reg.held}
    reg.take_report(b"\xff\xff garbage")  # ignored, the last list stays
    assert len(reg.held) == MAX_HELD_REPORTED


@pytest.mark.asyncio
async def test_list_sessions_answers_the_callers_own_sessions_only() -> None:
    registry = AgentRegistry()
    reg = AgentRegistration("a1", "wf", "", ())
    registry.register(reg)
    reg.take_report(
        _report(
            pb.HeldSession(session_key="late", user="alice", started_unix=20),
            pb.HeldSession(session_key="bobs", user="bob", started_unix=5),
            pb.HeldSession(session_key="early", user="alice", started_unix=10),
        )
    )
    handler = ListSessions(NoAuth(), registry)
    request = pb.ListSessionsRequest(target=pb.SessionTarget(workflow_id="wf"))
    answer = await handler.answer(ALICE, request)
    assert [e.session_key for e in answer.sessions] == ["early", "late"]
    with pytest.raises(PermissionDenied):
        await handler.answer(ALICE, pb.ListSessionsRequest(target=pb.SessionTarget(workflow_id="other")))


@pytest.mark.asyncio
async def test_list_sessions_asks_the_holding_replica_when_no_agent_is_here() -> None:
    asked: list[str] = []

    async def relay(identity: Identity, request: pb.ListSessionsRequest) -> pb.ListSessionsResponse | None:
        asked.append(identity.subject)
        return pb.ListSessionsResponse(sessions=[pb.HeldSession(session_key="there", user="alice")])

    handler = ListSessions(NoAuth(), AgentRegistry(), relay)
    answer = await handler.answer(ALICE, pb.ListSessionsRequest(target=pb.SessionTarget(workflow_id="wf")))
    assert asked == ["alice"] and [e.session_key for e in answer.sessions] == ["there"]


@pytest.mark.asyncio
async def test_list_sessions_without_any_agent_of_the_workflow_is_unavailable_not_empty() -> None:
    async def nobody(identity: Identity, request: pb.ListSessionsRequest) -> pb.ListSessionsResponse | None:
        return None  # the directory names no replica for it either

    for handler in (ListSessions(NoAuth(), AgentRegistry()), ListSessions(NoAuth(), AgentRegistry(), nobody)):
        request = pb.ListSessionsRequest(target=pb.SessionTarget(workflow_id="wf", task="t1"))
        with pytest.raises(Unavailable, match="no agent is registered for workflow 'wf' task 't1'"):
            await handler.answer(ALICE, request)


class _Inner:
    """A stream under a ResumingStream that records what is sent."""

    raw = False
    session_key = "key"

    def __init__(self) -> None:
        self.sent: list[pb.Frame] = []
        self._never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def send(self, frame: pb.Frame) -> None:
        self.sent.append(frame)

    async def send_data(self, payload: bytes) -> None:
        await self.send(pb.Frame(data=payload))

    async def send_data_message(self, message: bytes) -> None:
        raise AssertionError("not raw")

    async def send_error(self, code: grpc.StatusCode, message: str) -> None:
        await self.send(pb.Frame(error=pb.Error(code=code.value[0], message=message)))

    async def recv(self) -> pb.Frame | None:
        await self._never
        return None

    async def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


async def _no_reopen(token: pb.ResumeToken) -> _Inner:
    raise AssertionError("no resume expected")


@pytest.mark.asyncio
async def test_an_attach_adopts_the_agents_numbering_and_detach_acks_then_detaches() -> None:
    inner = _Inner()
    resume = pb.Resume(received=500, sending_from=1200, grace_seconds=60)
    stream = ResumingStream.attached(inner, resume, reopen=_no_reopen, secret="s", grace=300, notify=None)
    assert stream.taken == 1200  # a resume after a break asks from here
    await stream.send_data(b"abc")
    assert stream.buffer.end == 503  # numbered after what the agent received
    stream._take(pb.Frame(data=b"x" * 10))
    stream._take(pb.Frame(ack=pb.Ack(received=503)))
    assert (await stream.recv()) == pb.Frame(data=b"x" * 10)
    assert await stream.detach(settle=1)
    assert [f.WhichOneof("kind") for f in inner.sent] == ["data", "ack", "detach"]
    assert inner.sent[1].ack.received == 1210
    assert stream.detached and await stream.recv() is None


@pytest.mark.asyncio
async def test_a_detach_frame_from_the_agent_means_taken_over() -> None:
    stream = ResumingStream.attached(_Inner(), pb.Resume(), reopen=_no_reopen, secret="s", grace=300, notify=None)
    stream._take(pb.Frame(detach=pb.Detach()))
    frame = await stream.recv()
    assert frame is not None and frame.error.code == grpc.StatusCode.ABORTED.value[0]
    assert "attached from another client" in frame.error.message


@pytest.mark.asyncio
async def test_the_agent_reports_at_most_max_held_sessions() -> None:
    held = HeldSessions(grace=10)
    changes: list[int] = []
    held.on_change = lambda: changes.append(len(held))
    open_msg = pb.SessionOpen(session_key="k1", user="alice", exec=pb.ExecInit(command=["bash"]))
    open_msg.exec.target.resume.secret = "s"
    stream = await held.start(_Inner(), open_msg)
    report = held.report()
    assert [(e.session_key, e.user, e.summary, e.attached) for e in report.sessions] == [("k1", "alice", "bash", True)]
    assert report.sessions[0].operation == pb.OPERATION_EXEC
    assert changes == [1] and MAX_HELD == MAX_HELD_REPORTED
    held.forget(stream)
    assert changes == [1, 0] and not held.report().sessions


def test_a_held_sessions_summary_reads_as_the_command_ran() -> None:
    from osmo_router.agent.held import summary_of

    script = pb.SessionOpen(exec=pb.ExecInit(command=["sh", "-c", "for i in 1 2; do echo $i; done"]))
    assert summary_of(script) == "sh -c 'for i in 1 2; do echo $i; done'"
    assert summary_of(pb.SessionOpen(exec=pb.ExecInit())) == "(shell)"
    forward = pb.SessionOpen(port_forward=pb.PortForwardInit(remote_port=5353, protocol=pb.PROTOCOL_UDP))
    assert summary_of(forward) == "port 5353/udp"
    # A TCP init with remote_port 0 is a port-forward's watch, not a forward of port 0.
    watch = pb.SessionOpen(port_forward=pb.PortForwardInit(remote_port=0, protocol=pb.PROTOCOL_TCP))
    assert summary_of(watch) == "port-forward (its watch)"
