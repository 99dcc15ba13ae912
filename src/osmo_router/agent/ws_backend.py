"""`osmo-router agent --transport ws`: serve one session as a WebSocket backend of the old protocol.

A gRPC agent learns its sessions from the router (Register); an old-protocol backend cannot, so an
orchestrator hands it the session key, as the old router's workflow service did. The backend dials
`/api/router/{operation}/{workflow}/backend/{key}` with the `init=1` extension, so its first message
is the session's init (command, terminal, port, rsync arguments) whatever transport the client
used, and then serves the session with the very handlers of the gRPC agent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, replace

import aiohttp
from google.protobuf.message import DecodeError

from osmo_router.agent.config import AgentConfig
from osmo_router.agent.handlers import default_handlers
from osmo_router.transport.ws_dial import client_session
from osmo_router.transport.ws_transport import WsSessionStream, connect
from osmo_router.wire.errors import InvalidArgument, RouterError, Unavailable
from osmo_router.wire.protocol import pb
from osmo_router.wire.wsproto import (
    CLOSE_ERROR,
    STDERR_SUBPROTOCOL,
    base_url,
    default_ws_address,
    error_from_reason,
    parse_control_message,
    session_url,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WsBackendConfig:
    """One session to serve over WebSocket."""

    agent: AgentConfig
    session_key: str
    operation: int
    ws_address: str | None = None
    #: How long the router may wait for the client (`?timeout=`); None: the router's default.
    rendezvous_timeout: float | None = None


async def _read_open(ws: aiohttp.ClientWebSocketResponse) -> pb.SessionOpen:
    """The first message: the session's init (the router sends it once the client joined)."""
    msg = await ws.receive()
    if msg.type == aiohttp.WSMsgType.BINARY:
        try:
            return pb.SessionOpen.FromString(msg.data)
        except DecodeError as err:
            raise InvalidArgument(f"the router's first message is no session init: {err}") from None
    if ws.close_code == CLOSE_ERROR:
        raise error_from_reason(str(msg.extra or ""))
    raise Unavailable("the router closed the WebSocket before the session started")


async def serve_ws_session(config: WsBackendConfig) -> int:
    """Serve the session to its end; 0 when it was served, 1 when it could not be."""
    dial = config.agent.dial
    base = base_url(config.ws_address or default_ws_address(dial.address), dial.tls)
    query = [("init", "1")] + ([("task", config.agent.task)] if config.agent.task else [])
    if config.rendezvous_timeout is not None:
        query.append(("timeout", f"{config.rendezvous_timeout:g}"))
    url = session_url(base, config.operation, config.agent.workflow_id, "backend", config.session_key, query)
    async with client_session(connect_timeout=20.0) as http:
        try:
            # Offered for stderr apart; a router that does not select it gets stderr merged (wsproto).
            ws = await connect(http, url, dial, timeout=20.0, protocols=(STDERR_SUBPROTOCOL,))
            log.info(
                "waiting for the client of session %s",
                config.session_key[:8],
                extra={"fields": {"event": "connected", "transport": "ws"}},
            )
            open_msg = await _read_open(ws)
        except RouterError as err:
            log.error("session %s: %s [%s]", config.session_key[:8], err.message, err.code.name)
            return 1
        if open_msg.WhichOneof("init") is None:
            await _serve_control_channel(ws, config)
        elif not await _serve_opened(ws, open_msg, config):
            return 1
    log.info("session %s served", config.session_key[:8], extra={"fields": {"event": "session served"}})
    return 0


async def _serve_opened(ws: aiohttp.ClientWebSocketResponse, open_msg: pb.SessionOpen, config: WsBackendConfig) -> bool:
    """Serve an opened session with the gRPC agent's handlers; False when this agent does not serve it."""
    init = open_msg.WhichOneof("init") or ""
    handler = default_handlers().get(init)
    tty = init == "exec" and open_msg.exec.tty
    udp = init == "port_forward" and open_msg.port_forward.protocol == pb.PROTOCOL_UDP
    stream = WsSessionStream(
        ws,
        operation=config.operation,
        backend=True,
        parse_resize=tty,
        udp=udp,
        split_stderr=ws.protocol == STDERR_SUBPROTOCOL,
    )
    if handler is None:
        log.error("session %s: this agent does not serve %s", config.session_key[:8], init)
        await stream.close()
        return False
    try:
        await handler(stream, open_msg, config.agent)
    except (RouterError, ConnectionError, asyncio.CancelledError) as err:
        log.info("session %s ended: %r", config.session_key[:8], err)
    finally:
        await stream.aclose()
    return True


async def _serve_control_channel(ws: aiohttp.ClientWebSocketResponse, config: WsBackendConfig) -> None:
    """An old port-forward's control channel (a SessionOpen without init, then OSMO's control messages).

    Each message `{"key": K, "cookie": ...}` announces one connection: it is served as its own
    session on K (the `portforward` operation, as osmo-ctrl dials it), with the parameters the router
    sends for it. The channel ends when the router closes it; the connections under way finish.
    """
    connections: set[asyncio.Task[int]] = set()
    try:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY:
                continue
            try:
                conn_key, _cookie, _kind = parse_control_message(msg.data)
            except RouterError as err:
                log.warning("control channel %s: %s", config.session_key[:8], err.message)
                break
            connection = replace(config, session_key=conn_key, operation=pb.OPERATION_PORT_FORWARD)
            task = asyncio.create_task(serve_ws_session(connection))
            connections.add(task)
            task.add_done_callback(connections.discard)
    finally:
        await ws.close()
        if connections:
            await asyncio.gather(*connections, return_exceptions=True)
