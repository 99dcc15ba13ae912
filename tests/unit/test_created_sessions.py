"""Created sessions (router/core/created.py): validation, limits per service and in total, expiry, children."""

from __future__ import annotations

import asyncio
import time

import pytest

from osmo.router.v1 import control_pb2 as cpb
from osmo_router.router.core.created import CreatedLimits, CreatedSessions
from osmo_router.wire.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from osmo_router.wire.protocol import pb


def message(key: str = "", workflow: str = "wf", **fields: object) -> cpb.CreatedSession:
    fields.setdefault("operation", pb.OPERATION_EXEC)
    return cpb.CreatedSession(session_key=key, workflow_id=workflow, **fields)  # type: ignore[arg-type]


def test_create_lookup_by_alias_and_refuse_another_workflow() -> None:
    store = CreatedSessions()
    created = store.create("svc", message("k1", workflow_aliases=["my-wf", "0f1e"]))
    assert store.lookup("k1", "wf") is created
    assert store.lookup("k1", "my-wf") is created
    with pytest.raises(PermissionDenied):
        store.lookup("k1", "other")
    assert store.lookup("unknown", "wf") is None


def test_a_key_is_made_when_none_is_given_and_keys_are_unique() -> None:
    store = CreatedSessions()
    made = store.create("svc", message())
    assert len(made.key) >= 20
    with pytest.raises(AlreadyExists):
        store.create("svc", message(made.key))


@pytest.mark.parametrize(
    "bad",
    [
        cpb.CreatedSession(workflow_id="", operation=pb.OPERATION_EXEC),
        cpb.CreatedSession(workflow_id="wf", operation=pb.OPERATION_UNSPECIFIED),
        cpb.CreatedSession(workflow_id="wf\n", operation=pb.OPERATION_EXEC),
        cpb.CreatedSession(workflow_id="wf", operation=pb.OPERATION_EXEC, port_forward=cpb.CreatedPortForward(port=80)),
        cpb.CreatedSession(
            workflow_id="wf", operation=pb.OPERATION_PORT_FORWARD, port_forward=cpb.CreatedPortForward(port=70000)
        ),
        cpb.CreatedSession(
            workflow_id="wf", operation=pb.OPERATION_RSYNC, rsync=cpb.CreatedRsync(module="a]b", path="/x")
        ),
        cpb.CreatedSession(
            workflow_id="wf", operation=pb.OPERATION_RSYNC, rsync=cpb.CreatedRsync(module="osmo", path="rel")
        ),
        cpb.CreatedSession(workflow_id="wf", operation=pb.OPERATION_EXEC, ttl_seconds=10**7),
    ],
)
def test_malformed_sessions_are_refused(bad: cpb.CreatedSession) -> None:
    store = CreatedSessions()
    with pytest.raises(InvalidArgument):
        store.create("svc", bad)
    assert len(store) == 0


def test_limits_per_service_and_in_total_count_and_bytes() -> None:
    store = CreatedSessions(CreatedLimits(max_sessions=3, max_per_service=2))
    store.create("a", message("a1"))
    store.create("a", message("a2"))
    with pytest.raises(ResourceExhausted, match="a holds its maximum of 2"):
        store.create("a", message())
    store.create("b", message())
    with pytest.raises(ResourceExhausted, match="maximum of 3 created sessions"):
        store.create("c", message())
    store.terminate("a1")  # freed room is room again
    store.create("c", message())
    big = CreatedSessions(CreatedLimits(max_bytes_per_service=300, max_bytes=1000))
    with pytest.raises(ResourceExhausted, match="a's created sessions hold their maximum of 300 bytes"):
        big.create("a", message(exec=cpb.CreatedExec(command=["x" * 200, "y" * 200])))
    for owner in ("a", "b", "c"):
        big.create(owner, message(exec=cpb.CreatedExec(command=["x" * 250])))
    with pytest.raises(ResourceExhausted, match="created sessions hold their maximum of 1000 bytes"):
        big.create("d", message(exec=cpb.CreatedExec(command=["x" * 250])))


def test_expiry_and_control_channels_hold_it() -> None:
    store = CreatedSessions(CreatedLimits(default_ttl=0.05))
    created = store.create("svc", message("k"))
    created.hold(+1)
    time.sleep(0.1)
    assert store.expire() == 0 and store.get("k") is created  # held: not expired
    created.hold(-1)
    time.sleep(0.1)
    assert store.get("k") is None
    assert created.ended.is_set()


def test_children_stand_for_the_session_and_go_with_it() -> None:
    async def body() -> None:
        store = CreatedSessions(CreatedLimits(max_children=2))
        created = store.create("svc", message("k", operation=pb.OPERATION_PORT_FORWARD))
        store.add_child(created, "PORTFORWARD-1")
        assert created.changed.is_set()
        assert store.lookup("PORTFORWARD-1", "wf") is created
        with pytest.raises(AlreadyExists):
            store.add_child(created, "PORTFORWARD-1")
        store.add_child(created, "PORTFORWARD-2")
        with pytest.raises(ResourceExhausted):
            store.add_child(created, "PORTFORWARD-3")
        store.terminate("k")
        assert store.get("PORTFORWARD-1") is None
        with pytest.raises(NotFound):
            store.terminate("k")

    asyncio.run(body())


def test_new_session_keys_never_start_like_an_option() -> None:
    from osmo_router.router.core.ids import new_session_key

    keys = [new_session_key() for _ in range(2000)]
    assert all(key[0] not in "-_" and len(key) == 22 for key in keys)
    assert len(set(keys)) == len(keys)
