"""What a WS client's session is: its init, built from the URL, the extensions and the first message.

An old client names only operation, workflow and key in its URL; for exec its first message is the
terminal size. The gRPC side needs a full init, so the defaults are the old router's behaviour: the
container's shell in a terminal of that size. A new client adds what the old protocol lacked with
query parameters (see wsproto).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import WSMsgType, web
from multidict import MultiMapping

from osmo_router.router.core.created import CreatedSession
from osmo_router.router.ws.created import created_exec, created_forward, created_rsync
from osmo_router.wire.errors import DeadlineExceeded, InvalidArgument
from osmo_router.wire.protocol import pb
from osmo_router.wire.wsproto import parse_size

#: Most argv entries a client may pass in the URL.
MAX_ARGS = 256
#: Longest terminal size message (`{"Rows": R, "Cols": C}` is about 30 bytes). It is kept for the
#: session's life (passed verbatim to an old backend), outside every byte budget: a 4 MiB one padded
#: with an unknown field made each waiting exec session hold 4 MiB.
MAX_SIZE_MESSAGE = 1024


@dataclass(frozen=True)
class ClientInit:
    """A WS client's session parameters."""

    target: pb.SessionTarget
    open_msg: pb.SessionOpen
    #: The exec client's first (size) message, as it came.
    first_message: bytes | None = None
    parse_resize: bool = False
    want_exit: bool = False
    #: The `eof=1` extension: the agent's half-close reaches the client as an empty message.
    want_eof: bool = False
    #: A created UDP forward: each message is a datagram behind OSMO's 6-byte IPv4 sender header.
    udp: bool = False


def _flag(query: MultiMapping[str], name: str, default: bool) -> bool:
    value = query.get(name)
    return default if value is None else value.lower() in ("1", "true", "yes", "on")


def _args(query: MultiMapping[str], name: str) -> list[str]:
    values = query.getall(name, [])
    if len(values) > MAX_ARGS:
        raise InvalidArgument(f"more than {MAX_ARGS} {name} parameters")
    return [str(v) for v in values]


def _env(query: MultiMapping[str]) -> dict[str, str]:
    """The `env` extension (NAME=VALUE, repeated): the command's environment beyond the agent's."""
    environment: dict[str, str] = {}
    for setting in _args(query, "env"):
        name, sep, value = setting.partition("=")
        if not sep or not name:
            raise InvalidArgument(f"env parameter {setting[:64]!r} is not NAME=VALUE")
        environment[name] = value
    return environment


def _port(query: MultiMapping[str]) -> int:
    """The `port` extension; 0 when absent (an old client's pipe to an old backend needs none)."""
    raw = query.get("port", "0")
    if not raw.isdigit() or not 0 <= int(raw) < 65536:
        raise InvalidArgument(f"port must be a port number, not {raw!r}")
    return int(raw)


async def first_message(ws: web.WebSocketResponse, timeout: float) -> bytes:
    """The client's first message, within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            msg = await ws.receive()
    except TimeoutError:
        raise DeadlineExceeded(f"no terminal size message within {timeout:g}s") from None
    if msg.type == WSMsgType.BINARY:
        data = bytes(msg.data)
    elif msg.type == WSMsgType.TEXT:
        data = str(msg.data).encode()
    else:
        raise InvalidArgument("the WebSocket ended before the terminal size message")
    if len(data) > MAX_SIZE_MESSAGE:
        raise InvalidArgument(f"the terminal size message is longer than {MAX_SIZE_MESSAGE} bytes")
    return data


async def client_init(
    ws: web.WebSocketResponse,
    operation: int,
    workflow: str,
    key: str,
    query: MultiMapping[str],
    timeout: float,
    created: CreatedSession | None = None,
) -> ClientInit:
    """The init of a WS client's session (reads the size message of an exec session).

    With `created` (a session an orchestrator created), its task, command, terminal mode, port and
    protocol stand in for what the URL does not say.
    """
    task = query.get("task", "") or (created.task if created is not None else "")
    target = pb.SessionTarget(workflow_id=workflow, task=task, session_key=key)
    want_exit, want_eof = _flag(query, "exit", False), _flag(query, "eof", False)
    if operation == pb.OPERATION_EXEC:
        first = await first_message(ws, timeout)
        rows, cols = parse_size(first)
        tty = _flag(query, "tty", True)
        init = pb.ExecInit(
            target=target,
            command=_args(query, "cmd"),
            tty=tty,
            size=pb.TerminalSize(rows=rows, cols=cols),
            term=query.get("term", ""),
            env=_env(query),
            workdir=query.get("cwd", ""),
        )
        if created is not None:
            created_exec(created, init)
        return ClientInit(target, pb.SessionOpen(exec=init), first, init.tty, want_exit, want_eof)
    if operation == pb.OPERATION_PORT_FORWARD:
        forward = pb.PortForwardInit(
            target=target, protocol=pb.PROTOCOL_TCP, remote_port=_port(query), remote_host=query.get("host", "")
        )
        if created is not None:
            created_forward(created, forward)
        udp = forward.protocol == pb.PROTOCOL_UDP
        # OSMO's CLI (no extension) closes a connection's WebSocket at its local EOF, and osmo-ctrl then
        # closed the target (docs/migration.md 1.6): the agent ends the connection there too.
        forward.close_at_client_eof = not udp and not (want_eof or want_exit)
        open_msg = pb.SessionOpen(port_forward=forward)
        return ClientInit(target, open_msg, want_exit=want_exit, want_eof=want_eof, udp=udp)
    rsync = pb.RsyncInit(target=target, server_args=_args(query, "arg"))
    if created is not None:
        created_rsync(created, rsync)
    return ClientInit(target, pb.SessionOpen(rsync=rsync), want_exit=want_exit, want_eof=want_eof)
