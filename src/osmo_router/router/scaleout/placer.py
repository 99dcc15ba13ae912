"""Scale-out: place each stream on the replica that holds its other side, relaying it there if needed.

A stream is served here when its other side is here (or nowhere yet: then this replica publishes
the session and waits). Otherwise the pipeline (router/core/pipeline.py) opens the same stream on
the owner's RouterPeerService through `open_stream` and relays between the two with the ordinary
relay: every message after the init is encoded the same way on every stream, so the relay is a
byte pipe with the same flow control and timeouts as a local session. The owner serves the
relayed stream as its own (same pipeline, limits, metrics, audit), for the identity the relaying
replica authenticated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
from prometheus_client import Counter, Gauge

from osmo_router.router.auth.identity import Identity
from osmo_router.router.config import RouterConfig
from osmo_router.router.core.placement import HERE, FarStream, Owner, Placement
from osmo_router.router.core.registry import AgentRegistry
from osmo_router.router.core.resumes import is_resuming, proposed_key
from osmo_router.router.core.session import DefaultedTask
from osmo_router.router.core.sessions import SessionStore, check_id, new_session_key, scoped_key
from osmo_router.router.ops.metrics import RouterMetrics
from osmo_router.router.scaleout.agent_index import DefaultAgent
from osmo_router.router.scaleout.directory import Directory, DirectoryUnavailable
from osmo_router.router.scaleout.peers import PEER_SERVICE, CallEndpoint, PeerAuthenticator, PeerChannels, peer_metadata
from osmo_router.wire.errors import from_status
from osmo_router.wire.protocol import pb

#: Longest a ListSessions relayed to another replica may take.
LIST_TIMEOUT = 10.0

if TYPE_CHECKING:
    from osmo_router.router.grpc.agent_service import AgentService
    from osmo_router.router.grpc.client_service import ClientService


class ScaleOut:
    """Placement of streams across replicas (the pipeline's Placer), and the peer service."""

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
        self._channels = PeerChannels(config)
        #: The owner waits up to its rendezvous timeout before it answers.
        self.answer_timeout = config.rendezvous_timeout + config.init_timeout + 5.0
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
        if not self._sessions.accepting:
            return HERE
        local_agent = self._registry.pick(target.workflow_id, target.task) is not None
        if key and is_resuming(target):
            return await self._place_resume(identity, target, local_agent, from_peer=from_peer)
        if key and self._sessions.get(target.workflow_id, key) is not None:
            return HERE
        default = await self._default_agent(target, local_agent)
        if not from_peer:
            try:
                owner = await self._find_client_owner(target, local_agent, default)
            except DirectoryUnavailable:
                if not local_agent:
                    raise
                owner = None
            if owner is not None:
                return Placement(owner=owner)
        if not local_agent and not key:
            return HERE  # refused by the session store: no agent anywhere
        key = key or proposed_key(target) or new_session_key()
        other = await self._directory.claim_session(scoped_key(target.workflow_id, key), target.workflow_id)
        if other is not None and not from_peer:
            return Placement(owner=other)
        if default is None or default.owner is not None:  # (a relayed stream's race): the registry picks
            return Placement(key=key)
        return Placement(key=key, defaulted=DefaultedTask(default.task, default.tasks, default.count))

    async def _default_agent(self, target: pb.SessionTarget, local_agent: bool) -> DefaultAgent | None:
        """For a client naming no task: the agent all replicas choose (as one router's `pick`), and the tasks
        it is told of, from the directory; None with a task, or when the directory cannot answer and an
        agent is here (this replica's registry chooses then, as without scale-out)."""
        if target.task or (local_agent and not self._directory.up):
            return None  # local pairing does not wait on a Redis known to be down
        try:
            return await self._directory.default_agent(target.workflow_id)
        except DirectoryUnavailable:
            if not local_agent:
                raise
            return None

    async def _place_resume(
        self, identity: Identity, target: pb.SessionTarget, local_agent: bool, *, from_peer: bool
    ) -> Placement:
        """A resume (or attach) is served where the agent is registered, whoever held the session before.

        The session's directory entry is not followed: it names the replica that paired it, which
        may be the very replica that was lost (its entry lives until the TTL) or one that drains.
        The agent holds the session, so the resume goes where its agent registered; that replica
        takes the entry over (the owner's old session, wherever it still is, has lost its client).
        """
        key = target.session_key
        if local_agent:
            await self._directory.claim_session(scoped_key(target.workflow_id, key), target.workflow_id, take_over=True)
            return Placement(key=key)
        if from_peer:
            return HERE  # the agent left this replica since: refused (no agent), the client retries
        # An old session still held here has lost its client: end it (its owner's only).
        self._sessions.supersede(target.workflow_id, key, identity)
        owner = await self._directory.find_agent(target.workflow_id, target.task)
        return Placement(owner=owner) if owner is not None else HERE

    async def place_agent(self, identity: Identity, init: pb.ConnectInit, *, from_peer: bool) -> Placement:
        """Where an agent's Connect stream is served: with the session, wherever it waits."""
        check_id("session_key", init.session_key, required=True)
        check_id("workflow_id", init.workflow_id, required=True)
        identity.require_agent()
        identity.require_workflow(init.workflow_id)
        if (
            not self._sessions.accepting
            or not init.session_key
            or self._sessions.get(init.workflow_id, init.session_key) is not None
        ):
            return HERE
        scoped = scoped_key(init.workflow_id, init.session_key)
        other = await self._directory.claim_session(scoped, init.workflow_id)
        return Placement(owner=other) if other is not None and not from_peer else HERE

    def handler(self, clients: ClientService, agents: AgentService) -> grpc.GenericRpcHandler:
        """RouterPeerService: streams other replicas relay here, served as this replica's own."""
        peer = PeerAuthenticator(self._config.peer_secret)
        methods = {**clients.methods(peer), "Connect": agents.connect_method(peer)}
        return grpc.method_handlers_generic_handler(PEER_SERVICE, methods)

    async def close(self) -> None:
        """Close the channels to the other replicas."""
        await self._channels.close()

    async def _find_client_owner(
        self, target: pb.SessionTarget, local_agent: bool, default: DefaultAgent | None
    ) -> Owner | None:
        if target.session_key:
            owner = await self._directory.find_session(scoped_key(target.workflow_id, target.session_key))
            if owner is not None:
                return owner
        if default is not None:
            return default.owner  # None: the chosen agent is here
        if local_agent:
            return None
        return await self._directory.find_agent(target.workflow_id, target.task)

    async def open_stream(self, owner: Owner, method: str, identity: Identity, via: str) -> FarStream:
        """Open `method` of the owner's RouterPeerService for `identity`, relayed by `via`."""
        channel = await self._channels.connect(owner)
        call = channel.stream_stream(f"/{PEER_SERVICE}/{method}")(
            metadata=peer_metadata(self._config.peer_secret, identity, via)
        )
        return CallEndpoint(call, owner)

    async def list_sessions(
        self, identity: Identity, request: pb.ListSessionsRequest
    ) -> pb.ListSessionsResponse | None:
        """ListSessions answered by the replica holding the workflow's agent; None when no other one holds it."""
        try:
            owner = await self._directory.find_agent(request.target.workflow_id, request.target.task)
        except DirectoryUnavailable:
            return None
        if owner is None:
            return None
        channel = await self._channels.connect(owner)
        call = channel.unary_unary(
            f"/{PEER_SERVICE}/ListSessions",
            request_serializer=pb.ListSessionsRequest.SerializeToString,
            response_deserializer=pb.ListSessionsResponse.FromString,
        )
        metadata = peer_metadata(self._config.peer_secret, identity, f"{self._config.router_id} list-sessions")
        try:
            response: pb.ListSessionsResponse = await call(request, metadata=metadata, timeout=LIST_TIMEOUT)
        except grpc.aio.AioRpcError as err:
            raise from_status(err.code(), err.details() or "") from None
        return response

    def relay_started(self, label: str) -> None:
        """A relayed stream of `label` started."""
        self.relayed_active.labels(label).inc()

    def relay_ended(self, label: str) -> None:
        """A relayed stream ended."""
        self.relayed_active.labels(label).dec()

    def relay_failed(self, label: str, code: str) -> None:
        """A relayed stream ended with status `code`."""
        self.relay_errors_total.labels(label, code).inc()
