"""Resuming a session that broke before the agent's first Resume frame (docs/resume.md): the rules.

The router tells the client whether the agent that joined recognises resumes, and pairs an
unconfirmed resume only with such an agent; the agent answers one it does not hold with NOT_FOUND,
saying whether it ever received the session, and never starts a session it said it never received.
The end-to-end behaviour is in tests/e2e/test_resume_start_e2e.py.
"""

from __future__ import annotations

import grpc
import pytest

from osmo_router.agent.held_sessions import NEVER_RECEIVED, NOT_HELD, REMEMBERED_KEYS, HeldSessions
from osmo_router.router.auth.identity import ROLE_AGENT, Identity
from osmo_router.router.core.pipeline import _ready
from osmo_router.router.core.registry import AgentRegistration, AgentRegistry
from osmo_router.router.core.sessions import SessionStore
from osmo_router.wire.errors import FailedPrecondition
from osmo_router.wire.protocol import pb
from tests.unit.test_resume_stream import pipe

pytestmark = pytest.mark.asyncio

USER = Identity(subject="alice", workflows=("wf",))
AGENT = Identity(subject="agent-1", role=ROLE_AGENT, workflows=("wf",))


def _store(resumes: bool) -> tuple[SessionStore, AgentRegistration]:
    registry = AgentRegistry()
    reg = AgentRegistration(agent_id="a1", workflow_id="wf", task="", operations=(pb.OPERATION_EXEC,), resumes=resumes)
    registry.register(reg)
    return SessionStore(registry, buffer=4, max_pending=10, max_sessions=100, max_per_user=10), reg


def _resume_target(key: str, *, unconfirmed: bool) -> pb.SessionTarget:
    token = pb.ResumeToken(secret="s", resuming=True, unconfirmed=unconfirmed)
    return pb.SessionTarget(workflow_id="wf", session_key=key, resume=token)


def _exec_open() -> pb.SessionOpen:
    return pb.SessionOpen(exec=pb.ExecInit(command=["true"]))


@pytest.mark.parametrize("resumes", [True, False])
async def test_the_ready_says_whether_the_joined_agent_recognises_resumes(resumes: bool) -> None:
    store, _reg = _store(resumes)
    session = store.join_client(USER, pb.OPERATION_EXEC, pb.SessionTarget(workflow_id="wf"), _exec_open())
    store.join_agent(AGENT, pb.ConnectInit(session_key=session.key, workflow_id="wf", agent_id="a1"))
    assert pb.ExecResponse.FromString(_ready(session)).ready.agent_resumes is resumes


async def test_another_agent_process_does_not_inherit_the_registrations_word() -> None:
    store, _reg = _store(True)
    session = store.join_client(USER, pb.OPERATION_EXEC, pb.SessionTarget(workflow_id="wf"), _exec_open())
    store.join_agent(AGENT, pb.ConnectInit(session_key=session.key, workflow_id="wf", agent_id="a2"))
    assert not session.agent_resumes


async def test_an_unconfirmed_resume_is_paired_only_with_an_agent_that_recognises_resumes() -> None:
    old, _ = _store(False)
    with pytest.raises(FailedPrecondition, match="does not recognise resumes"):
        old.join_client(USER, pb.OPERATION_EXEC, _resume_target("k" * 22, unconfirmed=True), _exec_open())
    # A confirmed resume is paired as before (agents from before AgentHello.resumes resume too).
    old.join_client(USER, pb.OPERATION_EXEC, _resume_target("k" * 22, unconfirmed=False), _exec_open())
    new, reg = _store(True)
    new.join_client(USER, pb.OPERATION_EXEC, _resume_target("k" * 22, unconfirmed=True), _exec_open())
    assert reg.outbox.get_nowait().session_request.session_key == "k" * 22


def _resume_open(key: str, *, unconfirmed: bool = True) -> pb.SessionOpen:
    token = pb.ResumeToken(secret="s", resuming=True, unconfirmed=unconfirmed)
    return pb.SessionOpen(session_key=key, user="alice", exec=pb.ExecInit(target=pb.SessionTarget(resume=token)))


async def _refusal(held: HeldSessions, open_msg: pb.SessionOpen) -> pb.Error:
    agent_end, client_end = pipe()
    await held.attach(agent_end, open_msg)
    first = await client_end.inbox.get()
    assert first is not None and first.WhichOneof("kind") == "error"
    return first.error


async def test_the_agent_never_starts_a_session_whose_unconfirmed_resume_it_refused() -> None:
    held = HeldSessions()
    refusal = await _refusal(held, _resume_open("never-came"))
    assert refusal.code == grpc.StatusCode.NOT_FOUND.value[0] and refusal.message == NEVER_RECEIVED
    assert not held.begin("never-came")  # its SessionOpen, arriving late, is refused
    assert held.begin("another")


async def test_the_agent_says_it_received_a_session_it_does_not_hold() -> None:
    held = HeldSessions()
    assert held.begin("ran-without-resume")
    refusal = await _refusal(held, _resume_open("ran-without-resume"))
    assert refusal.code == grpc.StatusCode.NOT_FOUND.value[0] and refusal.message == NOT_HELD
    assert held.begin("ran-without-resume")  # not refused: it was never said not to run


async def test_a_confirmed_resume_of_an_unknown_session_is_answered_as_before() -> None:
    held = HeldSessions()
    refusal = await _refusal(held, _resume_open("gone", unconfirmed=False))
    assert "holds no such session" in refusal.message
    assert held.begin("gone")


async def test_the_remembered_keys_are_bounded() -> None:
    held = HeldSessions()
    for n in range(REMEMBERED_KEYS + 10):
        await _refusal(held, _resume_open(f"k{n}"))
        held.begin(f"s{n}")
    assert len(held._forgone) == REMEMBERED_KEYS and len(held._seen) == REMEMBERED_KEYS
    assert held.begin("k0")  # the oldest was forgotten
    assert not held.begin(f"k{REMEMBERED_KEYS + 9}")
