"""A resumed forwarded connection is counted once against the forward's and the user's limits (issue 17).

The router that still holds a session when its owner resumes it removes the old one
(`SessionStore._supersede`) before counting the new one; pure logic, no sockets.
"""

from __future__ import annotations

import pytest

from osmo_router.router.auth.identity import ROLE_AGENT, Identity
from osmo_router.router.core.budget import Budgets
from osmo_router.router.core.registry import AgentRegistration, AgentRegistry
from osmo_router.router.core.sessions import SessionStore
from osmo_router.wire.errors import PermissionDenied, ResourceExhausted
from osmo_router.wire.protocol import pb

pytestmark = pytest.mark.asyncio

USER = Identity(subject="alice", workflows=("wf",))
OTHER = Identity(subject="mallory", workflows=("wf",))
AGENT = Identity(subject="agent-1", role=ROLE_AGENT, workflows=("wf",))


def _store(max_per_forward: int = 2, max_per_user: int = 1) -> SessionStore:
    registry = AgentRegistry()
    registry.register(
        AgentRegistration(agent_id="a1", workflow_id="wf", task="", operations=(pb.OPERATION_PORT_FORWARD,))
    )
    return SessionStore(
        registry, buffer=4, max_pending=10, max_sessions=100, max_per_user=max_per_user, max_per_forward=max_per_forward
    )


def _open(key: str = "", resuming: bool = False) -> tuple[pb.SessionTarget, pb.SessionOpen]:
    resume = pb.ResumeToken(secret="s" * 32, resuming=resuming)
    target = pb.SessionTarget(workflow_id="wf", session_key=key, resume=resume)
    init = pb.PortForwardInit(target=target, protocol=pb.PROTOCOL_TCP, remote_port=8080, forward_id="f" * 16)
    return target, pb.SessionOpen(port_forward=init)


def _join(store: SessionStore, identity: Identity = USER, key: str = "", resuming: bool = False) -> str:
    target, open_msg = _open(key, resuming)
    session = store.join_client(identity, pb.OPERATION_PORT_FORWARD, target, open_msg)
    store.join_agent(AGENT, pb.ConnectInit(session_key=session.key, workflow_id="wf", agent_id="a1"))
    return session.key


async def test_resumes_of_a_held_connection_count_once() -> None:
    store = _store(max_per_forward=2)
    first = _join(store)
    _join(store)  # the forward's second (and last allowed) connection
    for _ in range(5):  # each resume replaces the session the router still holds
        assert _join(store, key=first, resuming=True) == first
    with pytest.raises(ResourceExhausted, match="max-connections-per-forward"):
        _join(store)
    # Everything is given back once the connections end: the user's one session slot is free again.
    for session in list(store._sessions.values()):
        store.remove(session)
    _join(store)


async def test_a_resume_of_someone_elses_session_is_refused_and_changes_no_count() -> None:
    store = _store(max_per_forward=2)
    first = _join(store)
    with pytest.raises(PermissionDenied):
        _join(store, OTHER, key=first, resuming=True)
    _join(store)  # alice's forward still has its second slot
    with pytest.raises(ResourceExhausted):
        _join(store)


async def test_a_resume_counts_its_opening_message_once_in_the_users_budget() -> None:
    """The session a resume replaces gives its kept opening message back: a user whose sessions hold
    most of her budget in opening messages can still resume one (it was RESOURCE_EXHAUSTED)."""
    registry = AgentRegistry()
    registry.register(AgentRegistration(agent_id="a1", workflow_id="wf", task="", operations=(pb.OPERATION_EXEC,)))
    budgets = Budgets(per_user=10_000, total=100_000)
    store = SessionStore(registry, buffer=4, max_pending=10, max_sessions=100, max_per_user=10, budgets=budgets)

    def join(key: str = "", resuming: bool = False) -> str:
        target = pb.SessionTarget(workflow_id="wf", session_key=key, resume=pb.ResumeToken(resuming=resuming))
        init = pb.ExecInit(target=target, command=["true"], env={"BIG": "x" * 6_000})
        session = store.join_client(USER, pb.OPERATION_EXEC, target, pb.SessionOpen(exec=init))
        store.join_agent(AGENT, pb.ConnectInit(session_key=session.key, workflow_id="wf", agent_id="a1"))
        return session.key

    first = join()
    for _ in range(3):  # each replaces the session the router still holds: one opening message kept
        assert join(key=first, resuming=True) == first
    with pytest.raises(ResourceExhausted, match="opening messages"):
        join()  # a second session's would not fit beside it
    for session in list(store._sessions.values()):
        store.remove(session)
    assert budgets.total.held == 0
