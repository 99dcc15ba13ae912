"""Two HTTP/2 connections, client and server, over a loopback socket: the unit tests' shared rig."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

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
async def connected_pair(config: H2Config) -> AsyncIterator[Pair]:
    """A server on a loopback port and a client connected to it, both with `config`, handshake done."""
    loop = asyncio.get_running_loop()
    streams: asyncio.Queue[Stream] = asyncio.Queue()
    servers: list[Connection] = []

    def accept() -> Connection:
        conn = Connection("server", config, on_stream=streams.put_nowait)
        servers.append(conn)
        return conn

    server = await loop.create_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(lambda: Connection("client", config), "127.0.0.1", port)
    try:
        async with asyncio.timeout(5):
            await client.ready()
        yield Pair(client, streams, servers)
    finally:
        client.close()
        server.close()
        await server.wait_closed()
