"""RouterClientService: the CLI's Exec, PortForward and Rsync streams, as entry points of the pipeline.

Messages stay encoded: the init is parsed here, everything after it is relayed as it arrived.
The same handlers serve RouterPeerService's client methods (streams another replica relays here),
with the peer authenticator and `from_peer` set.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from osmo_router.router.auth.identity import Authenticator, Identity
from osmo_router.router.config import RouterConfig
from osmo_router.router.core.created import CreatedSessions
from osmo_router.router.core.pipeline import SessionPipeline
from osmo_router.router.core.side import ClientJoin
from osmo_router.router.grpc.calls import GrpcSide, ServicerContext, authenticate_call, read_init
from osmo_router.router.grpc.control_channel import serve_grpc_control_channel
from osmo_router.router.grpc.list_sessions import ListSessions
from osmo_router.wire.errors import InvalidArgument, RouterError
from osmo_router.wire.ops import OPERATIONS, Operation
from osmo_router.wire.protocol import CLIENT_SERVICE, pb


def parse_client_init(operation: Operation, raw: bytes) -> tuple[pb.SessionTarget, pb.SessionOpen]:
    """The target and SessionOpen of a client's encoded init; InvalidArgument when it is not one."""
    try:
        init = operation.parse_init(raw)
    except DecodeError as err:
        raise InvalidArgument(f"malformed init message: {err}") from None
    if init is None:
        raise InvalidArgument("the first message of a stream must be its init")
    return init.target, pb.SessionOpen(**{operation.open_field: init})


class ClientService:
    """Handlers for RouterClientService (and the client methods of RouterPeerService)."""

    def __init__(
        self,
        config: RouterConfig,
        auth: Authenticator,
        pipeline: SessionPipeline,
        list_sessions: ListSessions | None = None,
        created: CreatedSessions | None = None,
    ) -> None:
        """`created`: the sessions orchestrators created (their control channels are served here)."""
        self._config = config
        self._auth = auth
        self._pipeline = pipeline
        self._list_sessions = list_sessions
        self._created = created if created is not None else CreatedSessions()

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler to add to a grpc.aio server."""
        return grpc.method_handlers_generic_handler(CLIENT_SERVICE, self.methods())

    def methods(self, peer: Authenticator | None = None) -> dict[str, grpc.RpcMethodHandler]:
        """Stream handlers by method name; with `peer`, for streams another replica relays (served here)."""
        methods = {op.method: grpc.stream_stream_rpc_method_handler(self._behaviour(op, peer)) for op in OPERATIONS}
        if self._list_sessions is not None:
            methods["ListSessions"] = self._list_sessions.method(peer)
        return methods

    def _behaviour(self, operation: Operation, peer: Authenticator | None) -> Any:
        async def behaviour(_requests: Any, context: ServicerContext) -> None:
            side = GrpcSide(context, is_client=True, merge_frames=peer is None)
            # The join lives only in the pipeline's frame, which lets go of it once joined.
            await (await self._prepare(side, operation, context, peer))

        return behaviour

    async def _prepare(
        self, side: GrpcSide, operation: Operation, context: ServicerContext, peer: Authenticator | None
    ) -> Coroutine[Any, Any, None]:
        """Authenticate and parse; the pipeline's serving (or refusal) of the stream, to await."""
        identity = None
        try:
            identity = await authenticate_call(peer or self._auth, context)
            raw = await read_init(context, self._config.init_timeout)
            target, open_msg = parse_client_init(operation, raw)
            control = self._control_channel(identity, target, context, peer)
        except RouterError as err:
            return self._pipeline.refuse(side, operation.label, err, identity)
        if control is not None:
            return control
        join = ClientJoin(
            identity, operation, target, open_msg, raw, self._config.rendezvous_timeout, from_peer=peer is not None
        )
        return self._pipeline.serve_client(side, join)

    def _control_channel(
        self, identity: Identity, target: pb.SessionTarget, context: ServicerContext, peer: Authenticator | None
    ) -> Coroutine[Any, Any, None] | None:
        """The serving of a created session's control channel, when the stream is one (None otherwise)."""
        created = self._created.lookup(target.session_key, target.workflow_id) if target.session_key else None
        if peer is not None or created is None or not created.is_control_key(target.session_key):
            return None
        identity.require_user()
        identity.require_workflow(created.workflow_id)
        created.use()
        return serve_grpc_control_channel(context, created, self._created)
