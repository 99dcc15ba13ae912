"""RouterAgentService: agents' Register control streams and their per-session Connect streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from osmo_router.errors import DeadlineExceeded, InvalidArgument, RouterError, Unavailable
from osmo_router.protocol import AGENT_SERVICE, pb
from osmo_router.router import audit
from osmo_router.router.auth import Authenticator
from osmo_router.router.config import RouterConfig
from osmo_router.router.directory import Directory, MemoryDirectory
from osmo_router.router.endpoints import ContextEndpoint, abort, authenticate_call, read_init
from osmo_router.router.metrics import RouterMetrics
from osmo_router.router.registry import AgentRegistration, AgentRegistry
from osmo_router.router.relay import relay_side
from osmo_router.router.sessions import SessionStore, check_id

if TYPE_CHECKING:
    from osmo_router.router.scaleout import ScaleOut

log = logging.getLogger(__name__)


class AgentService:
    """Handlers for RouterAgentService."""

    def __init__(
        self,
        config: RouterConfig,
        sessions: SessionStore,
        registry: AgentRegistry,
        auth: Authenticator,
        metrics: RouterMetrics,
        directory: Directory | None = None,
    ) -> None:
        self._config = config
        self._sessions = sessions
        self._registry = registry
        self._auth = auth
        self._metrics = metrics
        self._directory = directory or MemoryDirectory()
        self.accepting = True
        #: Set when replicas share a directory: Connect streams whose session is elsewhere are relayed there.
        self.scaleout: ScaleOut | None = None

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a grpc.aio server."""
        return grpc.method_handlers_generic_handler(
            AGENT_SERVICE,
            {
                # Requests stay encoded: the hello is parsed here (garbage is INVALID_ARGUMENT, not a
                # servicer crash) and heartbeats are never decoded at all.
                "Register": grpc.stream_stream_rpc_method_handler(
                    self._register, response_serializer=pb.RegisterResponse.SerializeToString
                ),
                "Connect": self.connect_method(),
            },
        )

    def connect_method(self, peer: Authenticator | None = None) -> grpc.RpcMethodHandler:
        """The Connect handler; with `peer`, for agent streams another replica relays (served here)."""

        async def connect(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await self.serve_connect(context, peer)

        return grpc.stream_stream_rpc_method_handler(connect)

    async def _register(self, _requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            reg = await self._accept_registration(context)
        except RouterError as err:
            self._metrics.error("register", err.code)
            audit.refused("register", err, audit.peer_of(context))
            await abort(context, err.code, err.message)
            return
        self._registry.register(reg)
        self._metrics.agents_registered.set(len(self._registry))
        log.info("agent %s registered for workflow %s task %r", reg.agent_id, reg.workflow_id, reg.task)
        try:
            await self._directory.agent_registered(reg)
            await self._serve_registration(reg, context)
        finally:
            self._directory.agent_unregistered(reg)
            self._registry.unregister(reg)
            self._metrics.agents_registered.set(len(self._registry))
            log.info("agent %s unregistered", reg.agent_id)

    async def _accept_registration(self, context: grpc.aio.ServicerContext[Any, Any]) -> AgentRegistration:
        if not self.accepting:
            raise Unavailable("router is draining; register with another replica")
        identity = await authenticate_call(self._auth, context)
        try:
            async with asyncio.timeout(self._config.init_timeout):
                first = await context.read()
        except TimeoutError:
            raise DeadlineExceeded("no hello within the init deadline") from None
        # Checked once the hello is in, so the refusal never races with the agent's write of it.
        identity.require_agent()
        try:
            request = None if first is grpc.aio.EOF else pb.RegisterRequest.FromString(first)
        except DecodeError as err:
            raise InvalidArgument(f"malformed hello: {err}") from None
        if request is None or request.WhichOneof("kind") != "hello":
            raise InvalidArgument("the first message of Register must be a hello")
        hello = request.hello
        check_id("workflow_id", hello.workflow_id, required=True)
        check_id("task", hello.task, required=False)
        check_id("agent_id", hello.agent_id, required=True)
        identity.require_workflow(hello.workflow_id)
        return AgentRegistration(
            agent_id=hello.agent_id, workflow_id=hello.workflow_id, task=hello.task, operations=tuple(hello.operations)
        )

    async def _serve_registration(self, reg: AgentRegistration, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        interval = self._config.heartbeat_interval
        await context.write(
            pb.RegisterResponse(
                registered=pb.Registered(router_id=self._config.router_id, heartbeat_seconds=max(1, int(interval)))
            )
        )
        reader = asyncio.create_task(_drain_heartbeats(context, reg))
        replaced = asyncio.create_task(reg.replaced.wait())
        try:
            while True:
                getter = asyncio.create_task(reg.outbox.get())
                done, _ = await asyncio.wait(
                    {getter, reader, replaced}, timeout=interval, return_when=asyncio.FIRST_COMPLETED
                )
                if getter in done:
                    await context.write(getter.result())
                    continue
                getter.cancel()
                if reader in done or replaced in done:
                    return
                await context.write(pb.RegisterResponse(heartbeat=pb.Heartbeat()))
                if reader.done():
                    return
        finally:
            for task in (reader, replaced):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    async def serve_connect(
        self, context: grpc.aio.ServicerContext[Any, Any], peer: Authenticator | None = None
    ) -> None:
        """Serve one agent Connect stream: join (or relay to the replica holding the session), relay."""
        try:
            identity = await authenticate_call(peer or self._auth, context)
            raw = await read_init(context, self._config.init_timeout)
            try:
                request = pb.ConnectRequest.FromString(raw)
            except DecodeError as err:
                raise InvalidArgument(f"malformed init message: {err}") from None
            if self.scaleout is not None:
                place = await self.scaleout.place_agent(identity, request.init, from_peer=peer is not None)
                if place.owner is not None:
                    await self.scaleout.relay_agent(place.owner, identity, raw, request.init, context)
                    return
            session = self._sessions.join_agent(identity, request.init)
        except RouterError as err:
            self._metrics.error("connect", err.code)
            audit.refused("connect", err, audit.peer_of(context))
            await abort(context, err.code, err.message)
            return
        del identity, raw, request  # this frame lives as long as the session: keep only the session
        clean = False
        try:
            if not session.paired.is_set():
                await self._sessions.wait_paired(session, self._config.rendezvous_timeout)
            self._metrics.agent_sessions_by_transport.labels(session.operation_name, "grpc").inc()
            await context.write(session.open_message)
            await relay_side(
                session,
                ContextEndpoint(context),
                is_client=False,
                flow_control_timeout=self._config.flow_control_timeout,
                hooks=self._metrics,
            )
            clean = True
        except RouterError as err:
            await abort(context, err.code, err.message)
        except BaseException as err:
            log.info("agent stream of session %s ended: %r", session.key[:8], err)
            raise
        finally:
            if not clean:
                session.fail(Unavailable("the agent disconnected"))
                self._sessions.remove(session)


async def _drain_heartbeats(context: grpc.aio.ServicerContext[Any, Any], reg: AgentRegistration) -> None:
    """Read the agent's side of Register until it ends (heartbeats only)."""
    while True:
        message = await context.read()
        if message is grpc.aio.EOF:
            return
