"""The keepalive of a connection whose peer does not read (issue 14): a PING queued behind our data
is not answered, and that is no reason to cut the connection, whose sessions the flow-control
limits judge; with nothing waiting for the peer an unanswered PING still closes it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import pytest_asyncio

from osmo_router.h2.connection import Connection, H2Config, Stream

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/t.S/M"), (":authority", "x"), ("te", "trailers")]
KEEPALIVE = 0.2


@dataclass
class Pair:
    client: Connection
    server: Connection
    served: Stream
    pings: asyncio.Queue[None]  # one item per PING the server sends
    lost: asyncio.Event  # the server's connection is gone


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[Pair]:
    config = H2Config(stream_window=64 * 1024, keepalive_time=KEEPALIVE, keepalive_timeout=KEEPALIVE)
    loop = asyncio.get_running_loop()
    streams: asyncio.Queue[Stream] = asyncio.Queue()
    servers: list[Connection] = []
    pings: asyncio.Queue[None] = asyncio.Queue()
    lost = asyncio.Event()

    def accept() -> Connection:
        conn = Connection("server", config, on_stream=streams.put_nowait, on_close=lambda _c: lost.set())
        ping = conn._timers._ping

        def counted() -> None:
            pings.put_nowait(None)
            ping()

        conn._timers._ping = counted  # type: ignore[method-assign]
        servers.append(conn)
        return conn

    server = await loop.create_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(lambda: Connection("client", H2Config()), "127.0.0.1", port)
    async with asyncio.timeout(5):
        await client.ready()
        await client.open_stream(REQUEST)
        served = await streams.get()
    served.send_headers([(":status", "200"), ("content-type", "application/grpc")])
    yield Pair(client, servers[0], served, pings, lost)
    client.close()
    server.close()
    await server.wait_closed()


@pytest.mark.asyncio
async def test_an_unanswered_ping_behind_data_the_peer_does_not_read_keeps_the_connection(pair: Pair) -> None:
    async with asyncio.timeout(10):
        assert pair.client.transport is not None
        pair.client.transport.pause_reading()  # the peer stops reading its socket
        # More than its window and the socket buffers take: our writer waits for the peer.
        writes = [asyncio.ensure_future(pair.served.write(b"x" * (1 << 20))) for _ in range(16)]
        for _ in range(3):  # three keepalive rounds, each PING unanswered
            await pair.pings.get()
        assert not pair.lost.is_set() and not pair.server.closed
        assert not all(w.done() for w in writes)  # the data still waits: the flow-control limits' case
        for write in writes:
            write.cancel()


@pytest.mark.asyncio
async def test_an_unanswered_ping_with_nothing_waiting_closes_the_connection(pair: Pair) -> None:
    async with asyncio.timeout(10):
        assert pair.client.transport is not None
        pair.client.transport.pause_reading()
        await pair.lost.wait()
        assert pair.server.closed


@pytest.mark.asyncio
async def test_a_client_cuts_a_server_that_stopped_answering_even_with_its_data_waiting() -> None:
    """The client role has no flow-control limits: a silent server must be noticed, so it can resume."""
    config = H2Config(stream_window=64 * 1024, keepalive_time=KEEPALIVE, keepalive_timeout=KEEPALIVE)
    loop = asyncio.get_running_loop()
    servers: list[Connection] = []

    def accept() -> Connection:
        servers.append(Connection("server", H2Config()))
        return servers[-1]

    server = await loop.create_server(accept, "127.0.0.1", 0)
    lost = asyncio.Event()
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(
        lambda: Connection("client", config, on_close=lambda _c: lost.set()), "127.0.0.1", port
    )
    try:
        async with asyncio.timeout(10):
            await client.ready()
            stream = await client.open_stream(REQUEST)
            assert servers[0].transport is not None
            servers[0].transport.pause_reading()  # the server goes silent
            writes = [asyncio.ensure_future(stream.write(b"x" * (1 << 20))) for _ in range(16)]
            await lost.wait()
            assert client.closed
            assert not all(w.done() for w in writes)  # it was cut while its data still waited
            for write in writes:
                write.cancel()
    finally:
        client.close()
        for conn in servers:  # its reading paused, it would never see the client go
            conn.abort()
        server.close()
        await server.wait_closed()
