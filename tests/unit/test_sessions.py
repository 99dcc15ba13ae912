"""Rendezvous rules of the in-memory SessionStore (pure logic, no sockets)."""

from __future__ import annotations

import asyncio

import pytest

from osmo_router.router.auth.identity import ROLE_AGENT, Identity
from osmo_router.router.core.registry import AgentRegistration, AgentRegistry, StandbyStream
from osmo_router.router.core.sessions import SessionStore, new_session_key
from osmo_router.wire.errors import (
    AlreadyExists,
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from osmo_router.wire.protocol import MAX_STANDBY_STREAMS, pb

pytestmark = pytest.mark.asyncio

USER = Identity(subject="alice", workflows=("wf",))
AGENT = Identity(subject="agent-1", role=ROLE_AGENT, workflows=("wf",))


def _store(registry: AgentRegistry | None = None, **limits: int) -> SessionStore:
    options = {"buffer": 4, "max_pending": 10, "max_sessions": 100, "max_per_user": 10, **limits}
    return SessionStore(registry or AgentRegistry(), **options)


def _target(workflow: str = "wf", key: str = "", task: str = "") -> pb.SessionTarget:
    return pb.SessionTarget(workflow_id=workflow, session_key=key, task=task)


def _exec_open() -> pb.SessionOpen:
    return pb.SessionOpen(exec=pb.ExecInit(command=["true"]))


def _connect(key: str, workflow: str = "wf", task: str = "") -> pb.ConnectInit:
    return pb.ConnectInit(session_key=key, workflow_id=workflow, task=task, agent_id="a1")


async def test_keys_are_unique_and_128_bit() -> None:
    keys = {new_session_key() for _ in range(1000)}
    assert len(keys) == 1000
    assert all(len(k) == 22 for k in keys)  # 16 random bytes, url-safe base64


async def test_client_first_signals_the_registered_agent_then_pairs() -> None:
    registry = AgentRegistry()
    reg = AgentRegistration(agent_id="a1", workflow_id="wf", task="", operations=(pb.OPERATION_EXEC,))
    registry.register(reg)
    store = _store(registry)
    session = store.join_client(USER, pb.OPERATION_EXEC, _target(), _exec_open())
    request = reg.outbox.get_nowait().session_request
    assert request.session_key == session.key and request.operation == pb.OPERATION_EXEC
    assert not session.paired.is_set() and store.pending == 1
    assert store.join_agent(AGENT, _connect(session.key)) is session
    assert session.paired.is_set() and store.pending == 0
    opened = pb.ConnectResponse.FromString(session.open_message).open
    assert opened.user == "alice" and opened.session_key == session.key and list(opened.exec.command) == ["true"]


async def test_agent_first_with_orchestrator_key() -> None:
    store = _store()
    key = "orchestrated-key-0001"
    session = store.join_agent(AGENT, _connect(key))
    assert not session.paired.is_set()
    assert store.join_client(USER, pb.OPERATION_EXEC, _target(key=key), _exec_open()) is session
    assert session.paired.is_set()


async def test_no_agent_and_no_key_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="no agent is registered"):
        _store().join_client(USER, pb.OPERATION_EXEC, _target(), _exec_open())


async def test_same_party_twice_is_already_exists() -> None:
    store = _store()
    store.join_agent(AGENT, _connect("k1"))
    with pytest.raises(AlreadyExists):
        store.join_agent(AGENT, _connect("k1"))
    store.join_client(USER, pb.OPERATION_EXEC, _target(key="k1"), _exec_open())
    with pytest.raises(AlreadyExists):
        store.join_client(USER, pb.OPERATION_EXEC, _target(key="k1"), _exec_open())


async def test_keys_are_scoped_to_their_workflow() -> None:
    """The same key in another workflow is another session: nothing pairs across, nothing is revealed."""
    store = _store()
    other_user = Identity(subject="bob", workflows=("*",))
    mine = store.join_agent(AGENT, _connect("k2"))
    theirs = store.join_client(other_user, pb.OPERATION_EXEC, _target(workflow="other", key="k2"), _exec_open())
    assert theirs is not mine and not mine.paired.is_set() and not theirs.paired.is_set()
    assert store.get("wf", "k2") is mine and store.get("other", "k2") is theirs
    # An agent of another workflow presenting a live key gets a session of its own, not an answer.
    other_agent = Identity(subject="agent-2", role=ROLE_AGENT, workflows=("other2",))
    store.join_client(other_user, pb.OPERATION_EXEC, _target(workflow="other", key="k3"), _exec_open())
    assert store.join_agent(other_agent, _connect("k3", workflow="other2")).workflow_id == "other2"


async def test_agent_credentials_are_bound_to_their_task_and_the_requested_agent() -> None:
    registry = AgentRegistry()
    owner = Identity(subject="agent-t1", role=ROLE_AGENT, workflows=("wf",), task="t1")
    reg = AgentRegistration(agent_id="a1", workflow_id="wf", task="t1", operations=(), identity=owner)
    registry.register(reg)
    store = _store(registry)
    session = store.join_client(USER, pb.OPERATION_EXEC, _target(task="t1"), _exec_open())
    intruder = Identity(subject="agent-t2", role=ROLE_AGENT, workflows=("wf",), task="t2")
    with pytest.raises(PermissionDenied):  # its token serves task t2 only
        store.join_agent(intruder, _connect(session.key, task="t1"))
    unbound = Identity(subject="agent-any", role=ROLE_AGENT, workflows=("wf",))
    with pytest.raises(AlreadyExists):  # not the agent asked: the same answer as a taken key
        store.join_agent(unbound, _connect(session.key, task="t1"))
    assert store.join_agent(owner, _connect(session.key, task="t1")) is session
    # Another credential cannot take the registration over; the same credential can (a restart).
    with pytest.raises(PermissionDenied):
        registry.register(AgentRegistration("a9", "wf", "t1", (), identity=unbound))
    assert registry.register(AgentRegistration("a1b", "wf", "t1", (), identity=owner)) is True
    assert reg.replaced.is_set()


async def test_identity_scopes_are_enforced() -> None:
    store = _store()
    with pytest.raises(PermissionDenied):
        store.join_client(USER, pb.OPERATION_EXEC, _target(workflow="not-mine", key="k4"), _exec_open())
    with pytest.raises(PermissionDenied):
        store.join_agent(USER, _connect("k5"))  # a user is not an agent


async def test_ids_are_checked() -> None:
    store = _store()
    with pytest.raises(InvalidArgument, match="longer than 256"):
        store.join_client(USER, pb.OPERATION_EXEC, _target(key="k" * 257), _exec_open())
    with pytest.raises(InvalidArgument, match="workflow_id is required"):
        store.join_client(USER, pb.OPERATION_EXEC, _target(workflow=""), _exec_open())
    with pytest.raises(InvalidArgument, match="control characters"):
        store.join_agent(AGENT, _connect("bad\nkey"))


async def test_pending_limit_is_resource_exhausted_and_spares_others() -> None:
    store = _store(max_pending=2)
    store.join_agent(AGENT, _connect("p1"))
    store.join_agent(AGENT, _connect("p2"))
    with pytest.raises(ResourceExhausted, match="waiting for rendezvous"):
        store.join_agent(AGENT, _connect("p3"))
    store.join_client(USER, pb.OPERATION_EXEC, _target(key="p1"), _exec_open())  # pairing still works
    assert store.pending == 1


async def test_per_user_limit() -> None:
    store = _store(max_per_user=1)
    store.join_agent(AGENT, _connect("u1"))
    store.join_agent(AGENT, _connect("u2"))
    first = store.join_client(USER, pb.OPERATION_EXEC, _target(key="u1"), _exec_open())
    with pytest.raises(ResourceExhausted, match="alice"):
        store.join_client(USER, pb.OPERATION_EXEC, _target(key="u2"), _exec_open())
    store.remove(first)
    store.join_client(USER, pb.OPERATION_EXEC, _target(key="u2"), _exec_open())


async def test_rendezvous_timeout_removes_the_session() -> None:
    store = _store()
    session = store.join_agent(AGENT, _connect("t1"))
    with pytest.raises(DeadlineExceeded):
        await store.wait_paired(session, 0.05)
    assert store.get("wf", "t1") is None and store.pending == 0 and len(store) == 0
    assert await store.wait_empty(1)


async def test_draining_store_refuses_new_sessions() -> None:
    store = _store()
    store.accepting = False
    with pytest.raises(Unavailable, match="draining"):
        store.join_client(USER, pb.OPERATION_EXEC, _target(key="d1"), _exec_open())


async def test_newest_registration_wins() -> None:
    registry = AgentRegistry()
    old = AgentRegistration(agent_id="a1", workflow_id="wf", task="t", operations=())
    new = AgentRegistration(agent_id="a2", workflow_id="wf", task="t", operations=())
    registry.register(old)
    registry.register(new)
    assert old.replaced.is_set() and registry.pick("wf", "t") is new
    registry.unregister(old)  # the replaced stream ending must not remove its successor
    assert registry.pick("wf", "t") is new and registry.pick("wf", "") is new
    assert await asyncio.wait_for(old.replaced.wait(), 1)


def _parked(reg: AgentRegistration) -> tuple[StandbyStream, asyncio.Future[object]]:
    read: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    stream = StandbyStream(read)
    assert reg.park(stream)
    return stream, read


async def test_a_parked_standby_stream_pairs_the_client_at_once() -> None:
    registry = AgentRegistry()
    reg = AgentRegistration(agent_id="a1", workflow_id="wf", task="", operations=())
    registry.register(reg)
    store = _store(registry)
    older, _ = _parked(reg)
    newer, _ = _parked(reg)
    assert registry.standby_count() == 2
    session = store.join_client(USER, pb.OPERATION_EXEC, _target(), _exec_open())
    # Paired on the oldest parked stream, with no SessionRequest and nothing pending.
    assert session.paired.is_set() and session.agent_joined and session.agent_id == "a1"
    assert older.outcome.result() is session and not newer.outcome.done()
    assert reg.outbox.empty() and store.pending == 0
    assert registry.standby_count() == 1
    # A stream whose agent closed it is skipped: the next session falls back to a SessionRequest.
    _, read = _parked(reg)
    read.set_result(None)
    newer.end()
    fallback = store.join_client(USER, pb.OPERATION_EXEC, _target(), _exec_open())
    assert not fallback.paired.is_set()
    assert reg.outbox.get_nowait().session_request.session_key == fallback.key


async def test_parked_streams_are_capped_and_end_with_the_registration() -> None:
    reg = AgentRegistration(agent_id="a1", workflow_id="wf", task="", operations=())
    streams = [_parked(reg)[0] for _ in range(MAX_STANDBY_STREAMS)]
    extra = StandbyStream(asyncio.get_running_loop().create_future())
    assert not reg.park(extra)
    reg.closed = True
    reg.close_standby()
    assert all(s.outcome.done() and s.outcome.result() is None for s in streams)
    assert not reg.standby and not reg.park(extra)
