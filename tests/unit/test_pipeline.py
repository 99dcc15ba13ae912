"""The session pipeline with fake Sides: placement, pairing, relay, refusals, metrics and audit (no sockets)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc
import pytest

from osmo_router.router.auth.identity import ROLE_AGENT, Identity
from osmo_router.router.config import RouterConfig
from osmo_router.router.core.budget import ByteBudget
from osmo_router.router.core.pipeline import SessionPipeline
from osmo_router.router.core.placement import HERE, FarStream, Owner, Placement
from osmo_router.router.core.registry import AgentRegistration, AgentRegistry
from osmo_router.router.core.sessions import SessionStore
from osmo_router.router.core.side import AgentJoin, ClientJoin
from osmo_router.router.ops.metrics import RouterMetrics
from osmo_router.wire.codec import ENCODED_HALF_CLOSE, ENCODED_SESSION_END, encode_frame
from osmo_router.wire.errors import Cancelled, RouterError, Unavailable
from osmo_router.wire.ops import EXEC
from osmo_router.wire.protocol import pb

pytestmark = pytest.mark.asyncio

USER = Identity(subject="alice", workflows=("wf",))
AGENT = Identity(subject="agent-1", role=ROLE_AGENT, workflows=("wf",))
WAIT = 5.0


@dataclass(eq=False)
class FakeSide:
    """A Side whose peer is the test: `inbox` feeds reads (None ends), `sent` collects writes."""

    transport: str = "fake"
    peer: str = "test"
    merge_frames: bool = True
    inbox: asyncio.Queue[bytes | RouterError | None] = field(default_factory=asyncio.Queue)
    sent: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    first: list[bytes] = field(default_factory=list)
    refused: list[RouterError] = field(default_factory=list)
    accepted: bool = False
    finished: bool = False
    #: Set to a future to watch for the peer leaving while pending (a WebSocket side's behaviour).
    gone: asyncio.Future[None] | None = None

    async def read(self) -> bytes | None:
        item = await self.inbox.get()
        if isinstance(item, RouterError):
            raise item
        return item

    async def write(self, message: bytes) -> None:
        await self.sent.put(message)

    def watch_gone(self, budgets: tuple[ByteBudget, ...] = ()) -> asyncio.Future[None] | None:
        return self.gone

    async def accept(self) -> None:
        self.accepted = True

    async def send_first(self, message: bytes) -> None:
        self.first.append(message)

    async def refuse(self, error: RouterError) -> None:
        self.refused.append(error)

    async def finish(self) -> None:
        self.finished = True

    async def next_sent(self) -> bytes:
        async with asyncio.timeout(WAIT):
            return await self.sent.get()


def _data(payload: bytes) -> bytes:
    return encode_frame(pb.Frame(data=payload))


def _exit(code: int) -> bytes:
    return encode_frame(pb.Frame(exit_status=pb.ExitStatus(code=code)))


class World:
    """A store with one registered agent, its metrics and a pipeline (with an optional placer)."""

    def __init__(self, placer: object = None, rendezvous: float = WAIT) -> None:
        self.config = RouterConfig(tls_enabled=False, auth="none", flow_control_timeout=WAIT)
        self.registry = AgentRegistry()
        self.reg = AgentRegistration(agent_id="a1", workflow_id="wf", task="", operations=(pb.OPERATION_EXEC,))
        self.registry.register(self.reg)
        self.store = SessionStore(self.registry, buffer=8, max_pending=10, max_sessions=10, max_per_user=10)
        self.metrics = RouterMetrics(live_sessions=self.store.sessions)
        self.pipeline = SessionPipeline(self.config, self.store, self.metrics, placer)  # type: ignore[arg-type]
        self.rendezvous = rendezvous

    def client_join(self) -> ClientJoin:
        target = pb.SessionTarget(workflow_id="wf")
        init = pb.ExecInit(target=target, command=["cat"])
        return ClientJoin(USER, EXEC, target, pb.SessionOpen(exec=init), EXEC.encode_init(init), self.rendezvous)

    def agent_join(self, key: str) -> AgentJoin:
        init = pb.ConnectInit(session_key=key, workflow_id="wf", agent_id="a1")
        return AgentJoin(AGENT, init, pb.ConnectRequest(init=init).SerializeToString(), self.rendezvous)

    async def requested_key(self) -> str:
        async with asyncio.timeout(WAIT):
            response = await self.reg.outbox.get()
        return response.session_request.session_key

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


async def _pair(world: World) -> tuple[FakeSide, FakeSide, asyncio.Task[None], asyncio.Task[None]]:
    client, agent = FakeSide(transport="grpc"), FakeSide(transport="ws", merge_frames=False)
    client_task = asyncio.create_task(world.pipeline.serve_client(client, world.client_join()))
    key = await world.requested_key()
    agent_task = asyncio.create_task(world.pipeline.serve_agent(agent, world.agent_join(key)))
    return client, agent, client_task, agent_task


async def test_pairs_relays_both_ways_and_ends_cleanly_with_metrics_and_audit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="osmo_router.audit")
    world = World()
    client, agent, client_task, agent_task = await _pair(world)
    await client.inbox.put(_data(b"ping"))
    assert await agent.next_sent() == _data(b"ping")
    # The first message each side got: the client's ready (with the key), the agent's SessionOpen.
    ready = pb.ExecResponse.FromString(client.first[0]).ready
    assert ready.session_key and ready.agent_id == ""  # the agent's id never reaches users
    assert pb.ConnectResponse.FromString(agent.first[0]).open.exec.command == ["cat"]
    for message in (_data(b"pong"), _exit(3), ENCODED_HALF_CLOSE, None):
        await agent.inbox.put(message)
    assert await client.next_sent() == _data(b"pong")
    assert await client.next_sent() == _exit(3)
    assert await client.next_sent() == ENCODED_HALF_CLOSE
    assert await client.next_sent() == ENCODED_SESSION_END
    await client.inbox.put(None)
    async with asyncio.timeout(WAIT):
        await asyncio.gather(client_task, agent_task)
    assert client.finished and agent.finished and not client.refused and not agent.refused
    assert len(world.store) == 0
    assert world.sample("router_grpc_sessions_total", operation="exec") == 1
    assert world.sample("router_grpc_sessions_by_transport_total", operation="exec", transport="grpc") == 1
    assert world.sample("router_grpc_agent_sessions_by_transport_total", operation="exec", transport="ws") == 1
    assert world.sample("router_grpc_sessions_active", operation="exec") == 0
    ends = [r for r in caplog.records if r.getMessage() == "session end"]
    assert len(ends) == 1 and ends[0].fields["exit_status"] == "code 3"  # type: ignore[attr-defined]
    assert ends[0].fields["transport"] == "grpc"  # type: ignore[attr-defined]


async def test_frames_are_merged_only_towards_sides_that_allow_it() -> None:
    world = World()
    client, agent, client_task, agent_task = await _pair(world)
    await client.inbox.put(_data(b"x"))  # pairing done once the first frame crossed
    assert await agent.next_sent() == _data(b"x")
    # Queue several frames before either writer runs: the WS-like agent gets them one by one.
    for i in range(5):
        await client.inbox.put(_data(bytes([65 + i])))
    got = [await agent.next_sent() for _ in range(5)]
    assert got == [_data(bytes([65 + i])) for i in range(5)]
    for task in (client_task, agent_task):
        task.cancel()
    await asyncio.gather(client_task, agent_task, return_exceptions=True)


async def test_refusal_is_counted_audited_and_sent_on_the_side() -> None:
    world = World()
    side = FakeSide(transport="ws")
    target = pb.SessionTarget(workflow_id="other")
    join = ClientJoin(USER, EXEC, target, pb.SessionOpen(exec=pb.ExecInit()), b"", WAIT)
    await world.pipeline.serve_client(side, join)
    assert [e.code for e in side.refused] == [grpc.StatusCode.PERMISSION_DENIED]
    labels = {"operation": "exec", "code": "PERMISSION_DENIED", "transport": "ws"}
    assert world.sample("router_grpc_errors_by_transport_total", **labels) == 1
    assert len(world.store) == 0


async def test_a_broken_agent_fails_the_client_with_unavailable() -> None:
    world = World()
    client, agent, client_task, agent_task = await _pair(world)
    await client.inbox.put(_data(b"x"))
    await agent.next_sent()
    await agent.inbox.put(None)  # the agent's stream ended without a half-close
    async with asyncio.timeout(WAIT):
        await asyncio.gather(client_task, agent_task)
    assert [e.code for e in client.refused] == [grpc.StatusCode.UNAVAILABLE]
    assert world.sample("router_grpc_errors_total", operation="exec", code="UNAVAILABLE") == 1
    assert len(world.store) == 0


async def test_a_client_that_goes_away_is_counted_as_no_error_on_any_transport() -> None:
    world = World()
    client, agent, client_task, agent_task = await _pair(world)
    await client.inbox.put(_data(b"x"))
    await agent.next_sent()
    await client.inbox.put(Cancelled("the client closed its WebSocket"))
    async with asyncio.timeout(WAIT):
        await asyncio.gather(client_task, agent_task)
    assert world.sample("router_grpc_errors_total", operation="exec", code="CANCELLED") == 0
    assert len(world.store) == 0 and world.sample("router_grpc_sessions_active", operation="exec") == 0


async def test_rendezvous_timeout_refuses_the_waiting_side() -> None:
    world = World(rendezvous=0.05)
    client = FakeSide()
    async with asyncio.timeout(WAIT):
        await world.pipeline.serve_client(client, world.client_join())
    assert [e.code for e in client.refused] == [grpc.StatusCode.DEADLINE_EXCEEDED]
    assert len(world.store) == 0


class FakeFar:
    """The owner replica's stream: answers the init with a ready, then echoes frames until the end."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self._answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.cancelled = False

    async def read(self) -> bytes | None:
        return await self._answers.get()

    async def write(self, message: bytes) -> None:
        self.written.append(message)
        if len(self.written) == 1:
            await self._answers.put(pb.ExecResponse(ready=pb.SessionReady(session_key="k")).SerializeToString())
        elif message == ENCODED_SESSION_END or message == ENCODED_HALF_CLOSE:
            await self._answers.put(ENCODED_HALF_CLOSE)
            await self._answers.put(None)
        else:
            await self._answers.put(message)

    def cancel(self) -> None:
        self.cancelled = True


class FakePlacer:
    """Places every client stream on replica r2, whose far stream is a FakeFar."""

    answer_timeout = WAIT

    def __init__(self) -> None:
        self.far = FakeFar()
        self.counts: dict[str, int] = {}

    async def place_client(self, identity: Identity, target: pb.SessionTarget, *, from_peer: bool) -> Placement:
        return HERE if from_peer else Placement(owner=Owner("r2", "127.0.0.1:1"))

    async def place_agent(self, identity: Identity, init: pb.ConnectInit, *, from_peer: bool) -> Placement:
        return HERE

    async def open_stream(self, owner: Owner, method: str, identity: Identity, via: str) -> FarStream:
        assert method == "Exec" and identity is USER
        return self.far

    def relay_started(self, label: str) -> None:
        self.counts["started"] = self.counts.get("started", 0) + 1

    def relay_ended(self, label: str) -> None:
        self.counts["ended"] = self.counts.get("ended", 0) + 1

    def relay_failed(self, label: str, code: str) -> None:
        self.counts[code] = self.counts.get(code, 0) + 1


async def test_a_stream_placed_elsewhere_is_relayed_to_the_owner_unmerged() -> None:
    placer = FakePlacer()
    world = World(placer=placer)
    client = FakeSide()
    task = asyncio.create_task(world.pipeline.serve_client(client, world.client_join()))
    for payload in (b"a", b"b"):
        await client.inbox.put(_data(payload))
    assert await client.next_sent() == _data(b"a")
    assert await client.next_sent() == _data(b"b")
    await client.inbox.put(ENCODED_HALF_CLOSE)  # the client is done sending, then ends its stream
    await client.inbox.put(None)
    async with asyncio.timeout(WAIT):
        await task
    assert pb.ExecResponse.FromString(client.first[0]).ready.session_key == "k"
    assert placer.far.written[0] == world.client_join().raw_init
    assert placer.far.written[1:3] == [_data(b"a"), _data(b"b")]  # one message each: never merged on a hop
    assert placer.counts == {"started": 1, "ended": 1} and placer.far.cancelled
    assert len(world.store) == 0 and await world.pipeline.wait_relays_idle(0.1)


async def test_the_owner_failing_fails_the_relayed_side() -> None:
    placer = FakePlacer()

    async def broken(owner: Owner, method: str, identity: Identity, via: str) -> FarStream:
        raise Unavailable("router replica r2 is unreachable")

    placer.open_stream = broken  # type: ignore[method-assign]
    world = World(placer=placer)
    client = FakeSide()
    async with asyncio.timeout(WAIT):
        await world.pipeline.serve_client(client, world.client_join())
    assert [e.code for e in client.refused] == [grpc.StatusCode.UNAVAILABLE]
    assert placer.counts == {"UNAVAILABLE": 1}


async def test_a_pending_side_whose_peer_leaves_ends_its_session_at_once() -> None:
    world = World(rendezvous=30)
    client = FakeSide(transport="ws")
    client.gone = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(world.pipeline.serve_client(client, world.client_join()))
    await world.requested_key()
    assert world.store.pending == 1
    client.gone.set_result(None)  # the WebSocket closed while its session waited
    async with asyncio.timeout(WAIT):
        await task
    assert world.store.pending == 0 and len(world.store) == 0
    assert [e.code for e in client.refused] == [grpc.StatusCode.CANCELLED]


async def test_one_identity_cannot_fill_the_pending_rendezvous_for_everybody() -> None:
    registry = AgentRegistry()
    store = SessionStore(registry, buffer=8, max_pending=10, max_sessions=100, max_per_user=100,
                         max_pending_per_identity=3)  # fmt: skip
    flooder = Identity(subject="flooder", role=ROLE_AGENT, workflows=("wf",))
    for i in range(3):
        store.join_agent(flooder, pb.ConnectInit(session_key=f"made-up-{i}", workflow_id="wf"))
    with pytest.raises(RouterError) as refused:
        store.join_agent(flooder, pb.ConnectInit(session_key="made-up-3", workflow_id="wf"))
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Somebody else still gets a pending session; the flooder's slots come back as they end.
    store.join_agent(AGENT, pb.ConnectInit(session_key="honest", workflow_id="wf"))
    store.remove(store.get("wf", "made-up-0"))  # type: ignore[arg-type]
    store.join_agent(flooder, pb.ConnectInit(session_key="made-up-4", workflow_id="wf"))
    assert store.pending == 4  # three of the flooder's, one honest


async def test_a_client_stream_ending_without_its_half_close_is_a_client_gone() -> None:
    """A killed client must not read as a clean end of the agent's input: the agent's side fails."""
    world = World()
    client, agent, client_task, agent_task = await _pair(world)
    await client.inbox.put(_data(b"x"))
    assert await agent.next_sent() == _data(b"x")
    await client.inbox.put(None)  # the stream ended, no half-close frame before it
    async with asyncio.timeout(WAIT):
        await asyncio.gather(client_task, agent_task)
    assert [e.code for e in agent.refused] == [grpc.StatusCode.CANCELLED]
    assert ENCODED_HALF_CLOSE not in [agent.sent.get_nowait() for _ in range(agent.sent.qsize())]
    assert world.sample("router_grpc_errors_total", operation="exec", code="CANCELLED") == 0
