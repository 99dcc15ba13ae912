"""RouterClientService: the CLI's Exec, PortForward and Rsync streams."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError

from osmo_router.router.auth.identity import Authenticator, Identity
from osmo_router.router.config import RouterConfig
from osmo_router.router.core import audit
from osmo_router.router.core.relay import relay_side
from osmo_router.router.core.sessions import Session, SessionStore
from osmo_router.router.grpc.calls import ContextEndpoint, abort, authenticate_call, read_init
from osmo_router.router.ops.metrics import RouterMetrics
from osmo_router.wire.errors import Cancelled, InvalidArgument, RouterError
from osmo_router.wire.protocol import CLIENT_SERVICE, OPERATION_NAMES, pb

if TYPE_CHECKING:
    from osmo_router.router.scaleout.placer import ScaleOut

InitParser = Callable[[bytes], tuple[pb.SessionTarget, pb.SessionOpen]]


def _parse(message_type: Any, field: str) -> InitParser:
    def parse(raw: bytes) -> tuple[pb.SessionTarget, pb.SessionOpen]:
        try:
            request = message_type.FromString(raw)
        except DecodeError as err:
            raise InvalidArgument(f"malformed init message: {err}") from None
        if request.WhichOneof("kind") != "init":
            raise InvalidArgument("the first message of a stream must be its init")
        init = request.init
        return init.target, pb.SessionOpen(**{field: init})

    return parse


_OPERATIONS: dict[str, tuple[int, InitParser]] = {
    "Exec": (pb.OPERATION_EXEC, _parse(pb.ExecRequest, "exec")),
    "PortForward": (pb.OPERATION_PORT_FORWARD, _parse(pb.PortForwardRequest, "port_forward")),
    "Rsync": (pb.OPERATION_RSYNC, _parse(pb.RsyncRequest, "rsync")),
}


class ClientService:
    """Handlers for RouterClientService; messages stay encoded so the relay forwards them as they are."""

    def __init__(
        self, config: RouterConfig, sessions: SessionStore, auth: Authenticator, metrics: RouterMetrics
    ) -> None:
        self._config = config
        self._sessions = sessions
        self._auth = auth
        self._metrics = metrics
        #: Set when replicas share a directory: streams whose agent is elsewhere are relayed there.
        self.scaleout: ScaleOut | None = None

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a grpc.aio server."""
        return grpc.method_handlers_generic_handler(CLIENT_SERVICE, self.methods())

    def methods(self, peer: Authenticator | None = None) -> dict[str, grpc.RpcMethodHandler]:
        """Stream handlers by method name; with `peer`, for streams another replica relays (served here)."""
        methods = {}
        for name, (operation, parse) in _OPERATIONS.items():
            methods[name] = grpc.stream_stream_rpc_method_handler(self._behaviour(operation, parse, peer))
        return methods

    def _behaviour(self, operation: int, parse: InitParser, peer: Authenticator | None) -> Any:
        async def behaviour(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            await self.serve_stream(operation, parse, context, peer)

        return behaviour

    async def serve_stream(
        self,
        operation: int,
        parse: InitParser,
        context: grpc.aio.ServicerContext[Any, Any],
        peer: Authenticator | None = None,
    ) -> None:
        """Serve one client stream: authenticate, rendezvous (or relay to another replica), relay."""
        op_name = OPERATION_NAMES[operation]
        identity: Identity | None = None
        try:
            identity = await authenticate_call(peer or self._auth, context)
            raw = await read_init(context, self._config.init_timeout)
            target, open_msg = parse(raw)
            key = None
            if self.scaleout is not None:
                place = await self.scaleout.place_client(identity, target, from_peer=peer is not None)
                if place.owner is not None:
                    await self.scaleout.relay_client(place.owner, operation, identity, raw, target, context)
                    return
                key = place.key
            session = self._sessions.join_client(identity, operation, target, open_msg, key=key)
        except RouterError as err:
            self._metrics.error(op_name, err.code)
            audit.refused(op_name, err, audit.peer_of(context), identity)
            await abort(context, err.code, err.message)
            return
        # This frame lives as long as the session: keep only what the session needs (with thousands
        # of idle sessions, the parsed init and the identity's claims add up).
        del identity, target, open_msg
        await self._run_session(session, context)

    async def _run_session(self, session: Session, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        op_name = session.operation_name
        peer = audit.peer_of(context)
        started = time.monotonic()
        clean = False
        active = False
        failure: RouterError | None = None
        try:
            if not session.paired.is_set():
                await self._sessions.wait_paired(session, self._config.rendezvous_timeout)
            if session.paired_at is not None:
                self._metrics.rendezvous_duration.labels(op_name).observe(session.paired_at - session.created)
            await context.write(
                pb.ExecResponse(
                    ready=pb.SessionReady(session_key=session.key, agent_id=session.agent_id)
                ).SerializeToString()
            )
            self._metrics.sessions_active.labels(op_name).inc()
            self._metrics.sessions_total.labels(op_name).inc()
            self._metrics.sessions_by_transport.labels(op_name, "grpc").inc()
            active = True
            audit.session_event("session start", session, peer)
            await relay_side(
                session,
                ContextEndpoint(context),
                is_client=True,
                flow_control_timeout=self._config.flow_control_timeout,
                hooks=self._metrics,
            )
            clean = True
        except RouterError as err:
            self._metrics.error(op_name, err.code)
            failure = err
        finally:
            if not clean:
                session.fail(failure or Cancelled("the client went away"))
            self._sessions.remove(session)
            if active:
                self._metrics.sessions_active.labels(op_name).dec()
                audit.session_event("session end", session, peer, time.monotonic() - started)
        if failure is not None:
            await abort(context, failure.code, failure.message)
