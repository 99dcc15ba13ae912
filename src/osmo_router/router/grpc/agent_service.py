"""RouterAgentService: agents' Register control streams and their per-session Connect streams."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Coroutine
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from osmo_router.router.auth.identity import Authenticator, Identity
from osmo_router.router.auth.recheck import CredentialWatch
from osmo_router.router.config import RouterConfig
from osmo_router.router.core.pipeline import SessionPipeline
from osmo_router.router.core.registry import (
    MAX_STANDBY_PER_AGENT,
    AgentRegistration,
    AgentRegistry,
    RegistrationHeld,
    StandbyStream,
)
from osmo_router.router.core.sessions import SessionStore, check_id
from osmo_router.router.core.side import CONNECT, AgentJoin
from osmo_router.router.grpc.calls import GrpcSide, ServicerContext, abort, authenticate_call, read_init
from osmo_router.router.ops.metrics import RouterMetrics
from osmo_router.router.scaleout.directory import Directory
from osmo_router.wire.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    RouterError,
    Unauthenticated,
    Unavailable,
)
from osmo_router.wire.protocol import AGENT_SERVICE, pb

log = logging.getLogger(__name__)

#: An agent's heartbeat on Register, encoded: compared, never decoded.
ENCODED_HEARTBEAT = pb.RegisterRequest(heartbeat=pb.Heartbeat()).SerializeToString()


class AgentService:
    """Handlers for RouterAgentService."""

    def __init__(
        self,
        config: RouterConfig,
        sessions: SessionStore,
        registry: AgentRegistry,
        auth: Authenticator,
        metrics: RouterMetrics,
        directory: Directory,
        pipeline: SessionPipeline,
    ) -> None:
        self._config = config
        self._sessions = sessions
        self._registry = registry
        self._auth = auth
        self._metrics = metrics
        self._directory = directory
        self._pipeline = pipeline

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

        async def connect(_requests: Any, context: ServicerContext) -> None:
            await self.serve_connect(context, peer)

        return grpc.stream_stream_rpc_method_handler(connect)

    async def _register(self, _requests: Any, context: ServicerContext) -> None:
        identity: Identity | None = None
        try:
            if not self._sessions.accepting:
                raise Unavailable("router is draining; register with another replica")
            identity = await authenticate_call(self._auth, context)
            reg, watch = await self._accept_registration(context, identity)
            replaced = self._registry.register(reg)
            # Gone with the call at once: a session routed here after the agent's connection broke, and
            # before this handler unwinds, would wait for an agent that cannot answer.
            context.add_done_callback(lambda _call: self._registry.unregister(reg))
        except RouterError as err:
            if isinstance(err, RegistrationHeld):
                self._metrics.agent_replacements_total.labels("refused").inc()
            # With the identity when the token verified: a refused registration (another credential's
            # task, a user token) is audited with who tried, as every other refusal is.
            await self._pipeline.refuse(GrpcSide(context, is_client=False), "register", err, identity)
            return
        if replaced:
            self._metrics.agent_replacements_total.labels("replaced").inc()
        self._metrics.agents_registered.set(len(self._registry))
        log.info("agent %s registered for workflow %s task %r", reg.agent_id, reg.workflow_id, reg.task)
        ended: RouterError | None = None
        try:
            await self._directory.agent_registered(reg)
            await self._serve_registration(reg, context, watch)
        except Unauthenticated as err:
            ended = err
        finally:
            # Parked standby streams end with their registration (the agent opens new ones when it
            # registers again).
            reg.closed = True
            reg.close_standby()
            self._directory.agent_unregistered(reg)
            self._registry.unregister(reg)
            self._metrics.agents_registered.set(len(self._registry))
            log.info("agent %s unregistered", reg.agent_id)
        if ended is not None:
            log.info("agent %s: %s", reg.agent_id, ended.message, extra={"fields": {"event": "credential ended"}})
            await abort(context, ended.code, ended.message)

    async def _accept_registration(
        self, context: ServicerContext, identity: Identity
    ) -> tuple[AgentRegistration, CredentialWatch]:
        try:
            async with asyncio.timeout(self._config.init_timeout):
                first = await context.read()
        except TimeoutError:
            raise DeadlineExceeded("no hello within the init deadline") from None
        # Checked once the hello is in, so the refusal never races with the agent's write of it.
        identity.require_agent()
        if identity.expires is not None and identity.expires <= time.time():
            # No clock-skew grace for a stream meant to live on: it would end again at once.
            raise Unauthenticated("the agent's token expired: renew it and register again")
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
        identity.require_task(hello.task)
        identity.require_instance(hello.agent_id)
        reg = AgentRegistration(
            agent_id=hello.agent_id,
            workflow_id=hello.workflow_id,
            task=hello.task,
            operations=tuple(hello.operations),
            identity=identity,
            resumes=hello.resumes,
        )
        metadata = context.invocation_metadata() or ()
        return reg, CredentialWatch(self._auth, metadata, identity, self._config.credential_recheck)

    async def _serve_registration(
        self, reg: AgentRegistration, context: ServicerContext, watch: CredentialWatch
    ) -> None:
        """Push session requests and heartbeats down the Register stream until it ends.

        Raises Unauthenticated once the agent's credential expired or no longer verifies.
        """
        interval = self._config.heartbeat_interval
        await context.write(
            pb.RegisterResponse(
                registered=pb.Registered(router_id=self._config.router_id, heartbeat_seconds=max(1, int(interval)))
            )
        )
        reader = asyncio.create_task(_drain_heartbeats(context, reg))
        replaced = asyncio.create_task(reg.replaced.wait())
        # One pending get at a time, kept across heartbeats; every task is ended with the stream
        # (a task left pending would be destroyed pending when the call is torn down).
        getter: asyncio.Task[pb.RegisterResponse] | None = None
        try:
            while True:
                if getter is None:
                    getter = asyncio.create_task(reg.outbox.get())
                timeout = min(interval, watch.due_in())
                done, _ = await asyncio.wait({getter, reader, replaced}, timeout=timeout, return_when=FIRST_COMPLETED)
                if reader in done or replaced in done:
                    return
                if watch.due_in() <= 0:
                    await watch.check()  # a message already taken is sent on the next turn
                elif getter in done:
                    message, getter = getter.result(), None
                    await context.write(message)
                else:
                    await context.write(pb.RegisterResponse(heartbeat=pb.Heartbeat()))
        finally:
            for task in (reader, replaced, getter):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

    async def serve_connect(self, context: ServicerContext, peer: Authenticator | None = None) -> None:
        """Serve one agent Connect stream: a standby stream is parked, a session stream goes to the pipeline."""
        side = GrpcSide(context, is_client=False, merge_frames=peer is None)
        await (await self._prepare(side, context, peer))

    async def _prepare(
        self, side: GrpcSide, context: ServicerContext, peer: Authenticator | None
    ) -> Coroutine[Any, Any, None]:
        """Authenticate and parse; the serving (or refusal) of the stream, to await."""
        identity = None
        try:
            identity = await authenticate_call(peer or self._auth, context)
            raw = await read_init(context, self._config.init_timeout)
            try:
                init = pb.ConnectRequest.FromString(raw).init
            except DecodeError as err:
                raise InvalidArgument(f"malformed init message: {err}") from None
            if init.standby:
                stream, reg = self._park(identity, init, from_peer=peer is not None, context=context)
                return self._serve_standby(stream, reg, context)
        except RouterError as err:
            return self._pipeline.refuse(side, CONNECT, err, identity)
        join = AgentJoin(identity, init, raw, self._config.rendezvous_timeout, from_peer=peer is not None)
        return self._pipeline.serve_agent(side, join)

    def _park(
        self,
        identity: Identity,
        init: pb.ConnectInit,
        *,
        from_peer: bool,
        context: ServicerContext,
    ) -> tuple[StandbyStream, AgentRegistration]:
        """Check a standby Connect stream (same credentials and role as any Connect) and park it."""
        check_id("workflow_id", init.workflow_id, required=True)
        check_id("task", init.task, required=False)
        check_id("agent_id", init.agent_id, required=True)
        identity.require_agent()
        identity.require_workflow(init.workflow_id)
        if init.session_key:
            raise InvalidArgument("a standby stream carries no session key")
        if not self._sessions.accepting:
            raise Unavailable("router is draining; no standby streams are parked")
        identity.require_task(init.task)
        reg = None if from_peer else self._registry.exact(init.workflow_id, init.task)
        # A standby stream joins only a registration of the same credential: an agent id alone
        # (which users were once shown) grants nothing.
        same = reg is not None and (reg.identity is None or reg.identity.same_agent(identity))
        if reg is None or not same or reg.agent_id != init.agent_id or reg.closed:
            raise FailedPrecondition(
                "standby streams are parked only on the router that holds the agent's registration: register first"
            )
        # The stream's one pending read: it ends when the agent closes the stream, and otherwise
        # carries the agent's first frame of the session (taken over by the relay, never cancelled).
        stream = StandbyStream(asyncio.ensure_future(context.read()))
        if not reg.park(stream):
            # Not parked: the read ends by itself once the handler has finished the call.
            stream.first_read.add_done_callback(_retrieve)
            raise ResourceExhausted(
                f"agent {init.agent_id} holds its maximum of {MAX_STANDBY_PER_AGENT} standby streams"
            )
        stream.first_read.add_done_callback(lambda _read: stream.end())
        return stream, reg

    async def _serve_standby(self, stream: StandbyStream, reg: AgentRegistration, context: ServicerContext) -> None:
        """Hold a parked standby stream until a session takes it, the agent closes it, or it is ended."""
        try:
            session = await stream.outcome
        except BaseException:
            # The agent went away (the RPC was cancelled); a session that took the stream meanwhile fails.
            reg.unpark(stream)
            taken = stream.outcome.result() if stream.outcome.done() and not stream.outcome.cancelled() else None
            if taken is not None:
                taken.fail(Unavailable("the agent disconnected"))
                self._sessions.remove(taken)
            stream.first_read.add_done_callback(_retrieve)
            raise
        reg.unpark(stream)
        if session is None:
            read = stream.first_read
            if not read.done():
                # Ended by the router (registration over, draining): finish the call, status OK.
                read.add_done_callback(_retrieve)
                return
            if read.cancelled() or read.exception() is not None or read.result() is grpc.aio.EOF:
                return  # the agent closed it
            err = InvalidArgument("a standby stream sends nothing before its SessionOpen")
            self._metrics.error(CONNECT, err.code)
            await abort(context, err.code, err.message)
            return
        self._metrics.standby_sessions_total.labels(session.operation_name).inc()
        side = GrpcSide(context, is_client=False, first_read=stream.first_read)
        await self._pipeline.run_agent(session, side, self._config.rendezvous_timeout)


def _retrieve(read: asyncio.Future[Any]) -> None:
    if not read.cancelled():
        read.exception()


async def _drain_heartbeats(context: ServicerContext, reg: AgentRegistration) -> None:
    """Read the agent's side of Register until it ends: heartbeats (never decoded) and held-session lists."""
    while True:
        message = await context.read()
        if message is grpc.aio.EOF:
            return
        if message != ENCODED_HEARTBEAT:
            reg.take_report(message)
