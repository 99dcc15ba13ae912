"""Scale-out: place each stream on the replica that holds its other side, relaying it there if needed.

A stream is served here when its other side is here (or nowhere yet: then this replica publishes
the session and waits). Otherwise this replica opens the same stream on the owner's
RouterPeerService and relays between the two with the ordinary relay (router/relay.py): every
message after the init is encoded the same way on every stream, so the relay is a byte pipe with
the same flow control and timeouts as a local session. The owner serves the relayed stream as its
own (same rendezvous, limits, metrics, audit), for the identity the relaying replica authenticated.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import Counter, Gauge

from osmo_router.router.auth.identity import Identity
from osmo_router.router.config import RouterConfig
from osmo_router.router.core.audit import end_fields, peer_of
from osmo_router.router.core.registry import AgentRegistry
from osmo_router.router.core.relay import Endpoint, relay_side
from osmo_router.router.core.sessions import Session, SessionStore, check_id, new_session_key
from osmo_router.router.grpc.calls import ContextEndpoint, abort
from osmo_router.router.ops.metrics import RouterMetrics
from osmo_router.router.scaleout.directory import Directory, DirectoryUnavailable, Owner
from osmo_router.router.scaleout.peers import PEER_SERVICE, CallEndpoint, PeerAuthenticator, PeerChannels, peer_metadata
from osmo_router.wire.errors import DeadlineExceeded, InvalidArgument, RouterError, Unavailable
from osmo_router.wire.protocol import CLOSE_GRACE, INIT_TAG, pb

if TYPE_CHECKING:
    from osmo_router.router.grpc.agent_service import AgentService
    from osmo_router.router.grpc.client_service import ClientService

log = logging.getLogger("osmo_router.audit")

_METHOD_OF: dict[int, str] = {
    pb.OPERATION_EXEC: "Exec",
    pb.OPERATION_PORT_FORWARD: "PortForward",
    pb.OPERATION_RSYNC: "Rsync",
}


@dataclass(frozen=True)
class Placement:
    """Where a stream is served: relayed to `owner`, or here (with `key` when the router makes the session key)."""

    owner: Owner | None = None
    key: str | None = None


HERE = Placement()


class _Hooks:
    """Relay hooks of a relayed stream: bytes are counted by the owner, stalls here."""

    def __init__(self, metrics: RouterMetrics) -> None:
        self._metrics = metrics

    def count_bytes(self, session: Session, direction: str, size: int) -> None:
        if direction == "client_to_agent":
            session.bytes_to_agent += size
        else:
            session.bytes_to_client += size

    def flow_control_timeout(self, session: Session) -> None:
        self._metrics.flow_control_timeouts_total.inc()

    def settle(self, session: Session) -> None:
        """Nothing to fold: the owner counts these bytes into router_grpc_bytes_total."""


class ScaleOut:
    """Placement and relaying of streams across replicas."""

    def __init__(
        self,
        config: RouterConfig,
        sessions: SessionStore,
        registry: AgentRegistry,
        directory: Directory,
        metrics: RouterMetrics,
    ) -> None:
        self._config = config
        self._sessions = sessions
        self._registry = registry
        self._directory = directory
        self._metrics = metrics
        self._hooks = _Hooks(metrics)
        self._channels = PeerChannels(config)
        self._relayed: set[Session] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        # The owner waits up to its rendezvous timeout before it answers.
        self._answer_timeout = config.rendezvous_timeout + config.init_timeout + 5.0
        self.relayed_active = Gauge(
            "router_grpc_peer_relays_active",
            "Streams this replica relays to the replica holding their other side.",
            ["operation"],
            registry=metrics.registry,
        )
        self.relay_errors_total = Counter(
            "router_grpc_peer_relay_errors_total",
            "Relayed streams that ended with an error, by status code.",
            ["operation", "code"],
            registry=metrics.registry,
        )

    async def place_client(self, identity: Identity, target: pb.SessionTarget, *, from_peer: bool) -> Placement:
        """Where a client stream is served. Raises DirectoryUnavailable only when no agent is here."""
        check_id("workflow_id", target.workflow_id, required=True)
        check_id("task", target.task, required=False)
        check_id("session_key", target.session_key, required=False)
        identity.require_user()
        identity.require_workflow(target.workflow_id)
        key = target.session_key
        if not self._sessions.accepting or (key and self._sessions.get(key) is not None):
            return HERE
        local_agent = self._registry.pick(target.workflow_id, target.task) is not None
        if not from_peer:
            try:
                owner = await self._find_client_owner(target, local_agent)
            except DirectoryUnavailable:
                if not local_agent:
                    raise
                owner = None
            if owner is not None:
                return Placement(owner=owner)
        if not local_agent and not key:
            return HERE  # refused by the session store: no agent anywhere
        key = key or new_session_key()
        other = await self._directory.claim_session(key, target.workflow_id)
        return Placement(owner=other) if other is not None and not from_peer else Placement(key=key)

    async def place_agent(self, identity: Identity, init: pb.ConnectInit, *, from_peer: bool) -> Placement:
        """Where an agent's Connect stream is served: with the session, wherever it waits."""
        check_id("session_key", init.session_key, required=True)
        check_id("workflow_id", init.workflow_id, required=True)
        identity.require_agent()
        identity.require_workflow(init.workflow_id)
        if not self._sessions.accepting or not init.session_key or self._sessions.get(init.session_key) is not None:
            return HERE
        other = await self._directory.claim_session(init.session_key, init.workflow_id)
        return Placement(owner=other) if other is not None and not from_peer else HERE

    async def relay_client(
        self,
        owner: Owner,
        operation: int,
        identity: Identity,
        raw_init: bytes,
        target: pb.SessionTarget,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Relay a client stream to the replica that holds its agent or session."""
        session = Session(
            key="", workflow_id=target.workflow_id, task=target.task, buffer=self._config.flow_control_buffer
        )
        session.operation, session.user = operation, identity.subject
        near = _context_side(context)
        await self.relay(owner, _METHOD_OF[operation], session, identity, raw_init, near, near_is_client=True)

    async def relay_agent(
        self,
        owner: Owner,
        identity: Identity,
        raw_init: bytes,
        init: pb.ConnectInit,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Relay an agent's Connect stream to the replica where its session waits."""
        session = Session(key="", workflow_id=init.workflow_id, task=init.task, buffer=self._config.flow_control_buffer)
        session.user = identity.subject
        near = _context_side(context)
        await self.relay(owner, "Connect", session, identity, raw_init, near, near_is_client=False)

    def handler(self, clients: ClientService, agents: AgentService) -> grpc.GenericRpcHandler:
        """RouterPeerService: streams other replicas relay here, served as this replica's own."""
        peer = PeerAuthenticator(self._config.peer_secret)
        methods = {**clients.methods(peer), "Connect": agents.connect_method(peer)}
        return grpc.method_handlers_generic_handler(PEER_SERVICE, methods)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no relayed stream is left, at most `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Close the channels to the other replicas."""
        await self._channels.close()

    async def _find_client_owner(self, target: pb.SessionTarget, local_agent: bool) -> Owner | None:
        if target.session_key:
            owner = await self._directory.find_session(target.session_key)
            if owner is not None:
                return owner
        if local_agent:
            return None
        return await self._directory.find_agent(target.workflow_id, target.task)

    async def relay(
        self,
        owner: Owner,
        method: str,
        session: Session,
        identity: Identity,
        raw_init: bytes,
        near: NearSide,
        *,
        near_is_client: bool,
    ) -> None:
        """Relay the near side's stream (`method` of RouterPeerService) to the owner replica."""
        label = session.operation_name if near_is_client else "connect"
        via = f"{self._config.router_id} {near.peer}"
        self._relayed.add(session)
        self._idle.clear()
        started = time.monotonic()
        failure: RouterError | None = None
        far: CallEndpoint | None = None
        try:
            channel = await self._channels.connect(owner)
            call = channel.stream_stream(f"/{PEER_SERVICE}/{method}")(
                metadata=peer_metadata(self._config.peer_secret, identity, via)
            )
            far = CallEndpoint(call, owner)
            await self._open(far, owner, raw_init, near)
            self.relayed_active.labels(label).inc()
            try:
                _audit("relay start", session, label, owner, near.peer)
                await self._pipe(session, near.endpoint, far, near_is_client)
            finally:
                self.relayed_active.labels(label).dec()
                _audit("relay end", session, label, owner, near.peer, time.monotonic() - started)
        except RouterError as err:
            failure = err
        finally:
            if far is not None:
                far.cancel()
            self._relayed.discard(session)
            if not self._relayed:
                self._idle.set()
        if failure is not None:
            session.fail(failure)
            self.relay_errors_total.labels(label, failure.code.name).inc()
            await near.fail(failure)

    async def _open(self, far: CallEndpoint, owner: Owner, raw_init: bytes, near: NearSide) -> None:
        """Send the init to the owner and pass its first answer (ready or open) on."""
        try:
            async with asyncio.timeout(self._answer_timeout):
                await far.write(raw_init)
                first = await far.read()
        except TimeoutError:
            raise DeadlineExceeded(f"router replica {owner.replica} did not answer in time") from None
        if first is None:
            raise Unavailable(f"router replica {owner.replica} ended the stream before the session started")
        if first[0] != INIT_TAG:
            raise InvalidArgument(f"router replica {owner.replica} answered with something other than its ready")
        await near.send_first(first)

    async def _pipe(self, session: Session, near: Endpoint, far: CallEndpoint, near_is_client: bool) -> None:
        """Relay both sides; the near side plays its own role, the owner the other one."""
        far_side = asyncio.create_task(self._far_side(session, far, is_client=not near_is_client))
        try:
            await relay_side(
                session,
                near,
                is_client=near_is_client,
                flow_control_timeout=self._config.flow_control_timeout,
                hooks=self._hooks,
            )
            # The agent's last frames may still be on their way to the owner.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.flow_control_timeout + CLOSE_GRACE):
                    await asyncio.shield(far_side)
            if far_side.done():
                far_side.result()
        finally:
            if not far_side.done():
                far.cancel()
                far_side.cancel()
            with contextlib.suppress(BaseException):
                await far_side

    async def _far_side(self, session: Session, far: CallEndpoint, *, is_client: bool) -> None:
        try:
            await relay_side(
                session,
                far,
                is_client=is_client,
                flow_control_timeout=self._config.flow_control_timeout,
                hooks=self._hooks,
            )
        except RouterError as err:
            session.fail(err)
            raise


@dataclass(frozen=True)
class NearSide:
    """The stream this replica relays: a gRPC call, or an old-protocol WebSocket (router/ws_server.py)."""

    endpoint: Endpoint
    peer: str
    #: Pass the owner's first answer on (the client's ready, the agent's session open).
    send_first: Callable[[bytes], Awaitable[None]]
    #: End the near stream with an error.
    fail: Callable[[RouterError], Awaitable[None]]


def _context_side(context: grpc.aio.ServicerContext[Any, Any]) -> NearSide:
    async def fail(err: RouterError) -> None:
        await abort(context, err.code, err.message)

    return NearSide(ContextEndpoint(context), peer_of(context), context.write, fail)


def _audit(
    event: str, session: Session, operation: str, owner: Owner, peer: str, duration: float | None = None
) -> None:
    fields: dict[str, object] = {
        "event": event,
        "user": session.user,
        "workflow": session.workflow_id,
        "task": session.task,
        "operation": operation,
        "replica": owner.replica,
        "peer": peer,
    }
    if duration is not None:
        fields.update(end_fields(session, duration))
    log.info(event, extra={"fields": fields})
