"""open_channel: a router slow to answer a new connection (busy under load) is waited for, not given up on.

gRPC core takes `grpc.min_reconnect_backoff_ms` as the minimum time it gives one connection attempt
to receive the server's SETTINGS; set to the reconnect backoff (250 ms) it made every attempt to a
router that answered after a few seconds fail ("connection attempt timed out before receiving
SETTINGS frame") until the client's own connect timeout gave up: the stall test's trickle reader
that never paired. Real sockets: a grpc server behind a proxy that holds its first bytes back.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from osmo_router.dial.channel import open_channel
from osmo_router.dial.config import DialConfig

#: How long the proxy holds back the server's first bytes (its SETTINGS): past the reconnect backoff's 2 s cap.
DELAY = 3.0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        first = True
        while data := await reader.read(65536):
            if first and delay:
                await asyncio.sleep(delay)  # the slow answer under test, not synchronisation
            first = False
            writer.write(data)
            await writer.drain()
    writer.close()


async def _slow_proxy(upstream: int) -> asyncio.Server:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(_pipe(client_r, server_w, 0.0), _pipe(server_r, client_w, DELAY))

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.asyncio
async def test_a_router_answering_a_new_connection_after_seconds_is_still_reached() -> None:
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    proxy = await _slow_proxy(port)
    address = f"127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    channel = open_channel(DialConfig(address=address, tls=False))
    try:
        async with asyncio.timeout(4 * DELAY):
            await channel.channel_ready()
        assert channel.get_state() == grpc.ChannelConnectivity.READY
    finally:
        await channel.close()
        proxy.close()
        await server.stop(None)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("http://router:443", "is a URL"),
        ("router:99999", "within 1-65535"),
        ("router:http", "within 1-65535"),
        (":50051", "has no host"),
        ("::1", "in brackets"),
        ("[::1", "is not [IPv6]:port"),
    ],
)
def test_router_addresses_that_could_never_be_dialled_are_named(address: str, problem: str) -> None:
    from osmo_router.dial.config import address_problem

    found = address_problem(address)
    assert found is not None and problem in found


@pytest.mark.parametrize("address", ["router:50051", "10.0.0.1:1", "[::1]:50051", "[fe80::1]", "router"])
def test_router_addresses_that_may_be_dialled_pass(address: str) -> None:
    from osmo_router.dial.config import address_problem

    assert address_problem(address) is None
