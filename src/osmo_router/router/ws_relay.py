"""WebSocket sides with several replicas: placed through the session directory like gRPC streams.

A WS client or backend that connects to a replica other than the one holding its session (or its
agent) is relayed there over RouterPeerService, exactly as a gRPC stream would be (scaleout.py):
the near side is the WS endpoint with its translation, the far side the owner's peer stream, whose
first answer (the client's ready, the backend's session open) is translated or dropped here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from osmo_router.router.auth.identity import Identity
from osmo_router.router.core.sessions import Session
from osmo_router.router.scaleout.directory import Owner
from osmo_router.router.ws.init import ClientInit
from osmo_router.router.ws.sides import WsBackendEndpoint, WsClientEndpoint, close_with_error
from osmo_router.wire.errors import InvalidArgument, RouterError
from osmo_router.wire.protocol import operation_of, pb
from osmo_router.wire.wsproto import size_message

if TYPE_CHECKING:
    from osmo_router.router.scaleout.placer import ScaleOut

_METHODS: dict[int, str] = {
    pb.OPERATION_EXEC: "Exec",
    pb.OPERATION_PORT_FORWARD: "PortForward",
    pb.OPERATION_RSYNC: "Rsync",
}


def client_init_message(operation: int, open_msg: pb.SessionOpen) -> bytes:
    """The encoded client init (ExecRequest/PortForwardRequest/RsyncRequest) a WS client's session stands for."""
    if operation == pb.OPERATION_EXEC:
        return pb.ExecRequest(init=open_msg.exec).SerializeToString()
    if operation == pb.OPERATION_PORT_FORWARD:
        return pb.PortForwardRequest(init=open_msg.port_forward).SerializeToString()
    return pb.RsyncRequest(init=open_msg.rsync).SerializeToString()


async def relay_client(
    scaleout: ScaleOut,
    owner: Owner,
    ws: web.WebSocketResponse,
    identity: Identity,
    init: ClientInit,
    peer: str,
    buffer: int,
) -> None:
    """Relay a WS client to the replica that holds its agent or session."""
    from osmo_router.router.scaleout.placer import NearSide

    operation = operation_of(init.open_msg)
    session = Session(key="", workflow_id=init.target.workflow_id, task=init.target.task, buffer=buffer)
    session.operation, session.user = operation, identity.subject
    endpoint = WsClientEndpoint(
        ws, session, parse_resize=init.parse_resize, want_exit=init.want_exit, want_eof=init.want_eof
    )

    async def drop_ready(_first: bytes) -> None:
        """The old protocol has no ready message."""

    async def fail(err: RouterError) -> None:
        await close_with_error(ws, err)

    near = NearSide(endpoint, peer, drop_ready, fail)
    raw_init = client_init_message(operation, init.open_msg)
    await scaleout.relay(owner, _METHODS[operation], session, identity, raw_init, near, near_is_client=True)


async def relay_backend(
    scaleout: ScaleOut,
    owner: Owner,
    ws: web.WebSocketResponse,
    identity: Identity,
    init: pb.ConnectInit,
    operation: int,
    send_init: bool,
    peer: str,
    buffer: int,
) -> None:
    """Relay a WS backend to the replica where its session waits."""
    from osmo_router.router.scaleout.placer import NearSide

    session = Session(key="", workflow_id=init.workflow_id, task=init.task, buffer=buffer)
    session.user = identity.subject

    async def send_open(first: bytes) -> None:
        open_msg = pb.ConnectResponse.FromString(first).open
        if operation_of(open_msg) != operation:
            raise InvalidArgument("the session is of another operation than this backend serves")
        if send_init:
            await ws.send_bytes(open_msg.SerializeToString())
        elif operation == pb.OPERATION_EXEC:
            await ws.send_bytes(size_message(open_msg.exec.size.rows, open_msg.exec.size.cols))

    async def fail(err: RouterError) -> None:
        await close_with_error(ws, err)

    near = NearSide(WsBackendEndpoint(ws, operation=operation), peer, send_open, fail)
    raw_init = pb.ConnectRequest(init=init).SerializeToString()
    await scaleout.relay(owner, "Connect", session, identity, raw_init, near, near_is_client=False)
