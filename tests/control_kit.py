"""An orchestrator for the tests: RouterControlService calls to a real router process over loopback."""

from __future__ import annotations

from typing import Any

import grpc

from osmo.router.v1 import control_pb2 as cpb
from osmo.router.v1 import control_pb2_grpc as cpb_grpc
from osmo_router.wire.protocol import pb

OPERATIONS = {"exec": pb.OPERATION_EXEC, "portforward": pb.OPERATION_PORT_FORWARD, "rsync": pb.OPERATION_RSYNC}


def _stub(address: str) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(address)
    return channel, cpb_grpc.RouterControlServiceStub(channel)


def _metadata(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def created(
    workflow: str,
    key: str,
    operation: str,
    *,
    aliases: tuple[str, ...] = (),
    task: str = "",
    command: list[str] | None = None,
    tty: bool = False,
    port: int = 0,
    udp: bool = False,
    module: str = "",
    path: str = "",
    ttl: int = 0,
) -> cpb.CreatedSession:
    """A CreatedSession message."""
    session = cpb.CreatedSession(
        session_key=key,
        workflow_id=workflow,
        workflow_aliases=list(aliases),
        task=task,
        operation=OPERATIONS[operation],
        ttl_seconds=ttl,
    )
    if command is not None:
        session.exec.command.extend(command)
        session.exec.tty = tty
    if port:
        session.port_forward.port = port
        session.port_forward.protocol = pb.PROTOCOL_UDP if udp else pb.PROTOCOL_TCP
    if module:
        session.rsync.module, session.rsync.path, session.rsync.writable = module, path, True
    return session


def create_session(address: str, session: cpb.CreatedSession, token: str | None = None) -> cpb.CreateSessionResponse:
    """CreateSession (raises grpc.RpcError on refusal)."""
    channel, stub = _stub(address)
    with channel:
        response: cpb.CreateSessionResponse = stub.CreateSession(
            cpb.CreateSessionRequest(session=session), metadata=_metadata(token), timeout=10
        )
        return response


def get_session(address: str, key: str, token: str | None = None) -> cpb.GetSessionResponse:
    """GetSession (raises grpc.RpcError on refusal)."""
    channel, stub = _stub(address)
    with channel:
        response: cpb.GetSessionResponse = stub.GetSession(
            cpb.GetSessionRequest(session_key=key), metadata=_metadata(token), timeout=10
        )
        return response


def terminate_session(address: str, key: str, token: str | None = None) -> cpb.TerminateSessionResponse:
    """TerminateSession (raises grpc.RpcError on refusal)."""
    channel, stub = _stub(address)
    with channel:
        response: cpb.TerminateSessionResponse = stub.TerminateSession(
            cpb.TerminateSessionRequest(session_key=key), metadata=_metadata(token), timeout=10
        )
        return response
