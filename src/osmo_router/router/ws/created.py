"""Old-protocol sides of sessions an orchestrator created (RouterControlService, core/created.py).

What a created session gives the WebSocket endpoints:

- the workflow: an old URL may name it by any of its aliases (its name, its UUID); the session
  lives in the id's key space, so the CLI's typed name and the backend's id meet;
- the parameters an old URL cannot say: an old client's exec runs the created command (terminal
  or not), a port-forward reaches the created port over TCP or UDP;
- the old port-forward's control channel (docs/migration.md 1.6): when a gRPC agent serves the
  workflow, the router itself is the control channel's far end. It reads the client's
  `{"key", "cookie"}` messages and records each connection key as a child of the session; the
  connection's own WebSocket then becomes a PortForward session to the agent on the created port.
  (With an old backend, the channel is piped to it as the old router did, and the connection keys
  are recorded on the way, so the backend's per-connection WebSockets present a known key.)
- the old backend's credential: under --auth=jwt a backend without a token that presents the key
  (or one of its connection keys) serves that session, and only that one (`key_identity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import WSMsgType, web

from osmo_router.cli.logs import fingerprint
from osmo_router.router.auth.identity import ROLE_AGENT, Identity
from osmo_router.router.core.created import CreatedSession, CreatedSessions
from osmo_router.wire.errors import InvalidArgument, RouterError
from osmo_router.wire.ops import Operation
from osmo_router.wire.protocol import pb
from osmo_router.wire.wsproto import CLOSE_ERROR, CLOSE_NORMAL, error_reason, parse_control_message

log = logging.getLogger(__name__)


def check_operation(created: CreatedSession, operation: Operation, *, backend: bool) -> None:
    """Refuse a URL whose operation is not the created session's.

    An old rsync backend dials its connections on the `portforward` operation (docs/migration.md 1.8),
    so a backend of a created rsync session may say `portforward`.
    """
    if operation.value == created.operation:
        return
    if backend and created.operation == pb.OPERATION_RSYNC and operation.value == pb.OPERATION_PORT_FORWARD:
        return
    raise InvalidArgument(f"the session key was created for another operation than {operation.label}")


def is_control_channel(created: CreatedSession, key: str) -> bool:
    """Whether a client WebSocket on `key` is an old port-forward's control channel (TCP, or rsync)."""
    if key != created.key:
        return False
    if created.operation == pb.OPERATION_RSYNC:
        return True
    return created.operation == pb.OPERATION_PORT_FORWARD and created.message.port_forward.protocol != pb.PROTOCOL_UDP


def key_identity(created: CreatedSession, workflow_id: str) -> Identity:
    """The identity of an old backend that presents a created session's key instead of a token.

    An agent identity for the session's workflow (and task) alone; the caller uses it for this one
    key, so the key is a credential for exactly its session.
    """
    subject = f"session-key:{fingerprint(created.key)}"
    return Identity(subject, ROLE_AGENT, (workflow_id,), task=None)


def created_exec(created: CreatedSession, init: pb.ExecInit) -> None:
    """Give an old client's ExecInit the created command and terminal mode."""
    if created.message.HasField("exec"):
        del init.command[:]
        init.command.extend(created.message.exec.command)
        init.tty = created.message.exec.tty


def created_forward(created: CreatedSession, init: pb.PortForwardInit) -> None:
    """Give an old client's PortForwardInit the created port and protocol."""
    if created.message.HasField("port_forward"):
        init.remote_port = created.message.port_forward.port
        udp = created.message.port_forward.protocol == pb.PROTOCOL_UDP
        init.protocol = pb.PROTOCOL_UDP if udp else pb.PROTOCOL_TCP


def created_rsync(created: CreatedSession, init: pb.RsyncInit) -> None:
    """An old client's rsync connection: the agent serves the created module in rsync's daemon protocol."""
    if created.message.HasField("rsync"):
        del init.server_args[:]
        module = created.message.rsync
        init.daemon.CopyFrom(pb.RsyncDaemon(module=module.module, path=module.path, writable=module.writable))


async def serve_control_channel(ws: web.WebSocketResponse, created: CreatedSession, store: CreatedSessions) -> None:
    """Be the far end of an old client's control channel until it closes or the session ends.

    Each message must be one JSON object with a `key` (as osmo-ctrl requires); the key is recorded
    as a connection of the session. A malformed message, or a key the store refuses, closes the
    channel with 4000 and the reason, as osmo-ctrl would end it; nothing else is affected.
    """
    ended = asyncio.ensure_future(created.ended.wait())
    try:
        while True:
            receive = asyncio.ensure_future(ws.receive())
            await asyncio.wait((receive, ended), return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():
                receive.cancel()
                await _close(ws, CLOSE_NORMAL, "")
                return
            msg = receive.result()
            if msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                return
            data = msg.data if isinstance(msg.data, bytes) else str(msg.data).encode()
            try:
                conn_key, _cookie, _kind = parse_control_message(data)
                store.add_child(created, conn_key)
            except RouterError as err:
                await _close(ws, CLOSE_ERROR, error_reason(err.code, err.message))
                return
    finally:
        ended.cancel()


def record_connection(created: CreatedSession, store: CreatedSessions, data: bytes) -> None:
    """A control message an old client sends to an old backend: record its connection key (best effort)."""
    with contextlib.suppress(RouterError):
        conn_key, _cookie, _kind = parse_control_message(data)
        store.add_child(created, conn_key)


async def _close(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.close(code=code, message=reason.encode())
