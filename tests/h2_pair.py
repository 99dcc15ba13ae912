"""Two HTTP/2 connections, client and server, over a loopback socket: the unit tests' shared rig."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from osmo_router.h2.connection import Connection, H2Config, Stream

#: Request headers of a gRPC call (what the client side opens a stream with).
REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/t.S/M"), (":authority", "x"), ("te", "trailers")]


@dataclass
class Pair:
    """The client connection, the streams the server accepted (as they open) and the server's connections."""

    client: Connection
    streams: asyncio.Queue[Stream]
    servers: list[Connection]


@contextlib.asynccontextmanager
async def connected_pair(
    config: H2Config,
    *,
    via: Callable[[int], Awaitable[int]] | None = None,
    tls: tuple[ssl.SSLContext, ssl.SSLContext] | None = None,
    rcvbuf: int = 0,
) -> AsyncIterator[Pair]:
    """A server on a loopback port and a client connected to it, both with `config`, handshake done.

    `via(port)`: the port to dial instead of the server's (a relay in between: a delay link, a trickle);
    `tls`: (server, client) contexts, the client checking "localhost"; `rcvbuf`: the server's sockets get
    that SO_RCVBUF, locked (accepted sockets inherit the listener's).
    """
    loop = asyncio.get_running_loop()
    streams: asyncio.Queue[Stream] = asyncio.Queue()
    servers: list[Connection] = []

    def accept() -> Connection:
        conn = Connection("server", config, on_stream=streams.put_nowait)
        servers.append(conn)
        return conn

    listener = socket.socket()
    if rcvbuf:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    listener.bind(("127.0.0.1", 0))
    server = await loop.create_server(accept, sock=listener, ssl=tls[0] if tls else None)
    port = int(server.sockets[0].getsockname()[1])
    if via is not None:
        port = await via(port)
    extra: dict[str, Any] = {"ssl": tls[1], "server_hostname": "localhost"} if tls else {}
    _, client = await loop.create_connection(lambda: Connection("client", config), "127.0.0.1", port, **extra)
    try:
        async with asyncio.timeout(5):
            await client.ready()
        yield Pair(client, streams, servers)
    finally:
        client.close()
        server.close()
        await server.wait_closed()


async def read_until(conn: Connection, done: Callable[[], bool]) -> None:
    """Until `done()` holds, checked after each read of `conn`'s socket (the frames read are handled by then)."""
    if done():
        return
    arrived = asyncio.Event()
    received = conn.buffer_updated

    def buffer_updated(count: int) -> None:
        received(count)
        if done():
            arrived.set()

    conn.buffer_updated = buffer_updated  # type: ignore[method-assign]
    try:
        await arrived.wait()
    finally:
        conn.buffer_updated = received  # type: ignore[method-assign]
