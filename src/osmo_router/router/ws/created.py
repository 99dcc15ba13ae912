"""Old-protocol sides of sessions an orchestrator created (RouterControlService, core/created.py).

What a created session gives the WebSocket endpoints:

- the workflow: an old URL may name it by any of its aliases (its name, its UUID); the session
  lives in the id's key space, so the CLI's typed name and the backend's id meet;
- the parameters an old URL cannot say: an old client's exec runs the created command (terminal
  or not), a port-forward reaches the created port over TCP or UDP;
- the old port-forward's (and old rsync's) control channel (docs/migration.md 1.6): the router
  itself is the far end of the client's channel. It reads the client's `{"key", "cookie"}`
  messages and records each connection key as a child of the session; the connection's own
  WebSocket then becomes a session on that key with the created port (or rsync module): a gRPC
  agent is asked for it like for any session, and a WebSocket backend (osmo-ctrl, or
  `agent --transport ws`) holding the session's own key is sent the same `{"key", "cookie"}`
  message on its control channel, and dials the connection's backend side, as with the old router;
- the old backend's credential: under --auth=jwt a backend without a token that presents the key
  (or one of its connection keys) serves that session, and only that one (`key_identity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import WSMessage, WSMsgType, web

from osmo_router.cli.logs import fingerprint
from osmo_router.router.auth.identity import ROLE_AGENT, Identity
from osmo_router.router.core.created import CreatedSession, CreatedSessions
from osmo_router.wire.errors import AlreadyExists, InvalidArgument, RouterError
from osmo_router.wire.ops import Operation
from osmo_router.wire.protocol import pb
from osmo_router.wire.wsproto import CLOSE_ERROR, CLOSE_NORMAL, control_message, error_reason

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
    return created.is_control_key(key)


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
    as a connection of the session (and announced to its backend, `serve_control_backend`). A
    malformed message, or a key the store refuses, closes the channel with 4000 and the reason, as
    osmo-ctrl would end it; nothing else is affected.
    """
    try:
        store.attach_client(created)
    except RouterError as err:
        await _close(ws, CLOSE_ERROR, error_reason(err.code, err.message))
        return
    try:
        while True:
            msg = await _next_or_ended(ws, created)
            if msg is None or msg.type not in (WSMsgType.BINARY, WSMsgType.TEXT):
                return
            data = msg.data if isinstance(msg.data, bytes) else str(msg.data).encode()
            try:
                store.announce(created, data)
            except RouterError as err:
                await _close(ws, CLOSE_ERROR, error_reason(err.code, err.message))
                return
    finally:
        store.detach_client(created)
        await _close(ws, CLOSE_NORMAL, "")


async def serve_control_backend(ws: web.WebSocketResponse, created: CreatedSession, send_init: bool) -> None:
    """Be the client of a backend's control channel: announce each connection as OSMO's client would.

    The backend (osmo-ctrl, or `agent --transport ws`) gets one `{"key", "cookie"}` message per
    connection, those announced before it joined first; a new backend (`init=1`) first gets a
    SessionOpen without init, which says that a control channel follows. The channel closes when the
    client's does or the session ends. One backend per session (ALREADY_EXISTS for a second).
    """
    if created.backend_attached:
        raise AlreadyExists("a backend already serves this session's control channel")
    created.backend_attached = True
    created.hold(+1)
    sent = 0
    try:
        if send_init:
            await ws.send_bytes(pb.SessionOpen(session_key=created.key).SerializeToString())
        while not ws.closed:
            for conn_key in created.children[sent:]:
                await ws.send_bytes(control_message(conn_key))
            sent = len(created.children)
            if created.channel_closed or created.ended.is_set():
                return
            created.changed.clear()
            if await _next_or_ended(ws, created, created.changed) is not None and ws.closed:
                return
    except (ConnectionError, RuntimeError):
        return
    finally:
        created.backend_attached = False
        created.hold(-1)
        await _close(ws, CLOSE_NORMAL, "")


async def _next_or_ended(
    ws: web.WebSocketResponse, created: CreatedSession, also: asyncio.Event | None = None
) -> WSMessage | None:
    """The WebSocket's next message; None once the session ended (or `also` was set) first."""
    receive = asyncio.ensure_future(ws.receive())
    waits = [asyncio.ensure_future(created.ended.wait())]
    if also is not None:
        waits.append(asyncio.ensure_future(also.wait()))
    try:
        await asyncio.wait((receive, *waits), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
    if receive.done():
        return receive.result()
    receive.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await receive  # so that the next receive does not overlap this one
    return None


async def _close(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    if ws.closed:
        return
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.close(code=code, message=reason.encode())
