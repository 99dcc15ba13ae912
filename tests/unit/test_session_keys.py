"""Session keys never start like a command-line option, whoever draws them (router or WebSocket client)."""

from __future__ import annotations

import asyncio
import gc
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from osmo_router.dial.config import DialConfig
from osmo_router.router.core.ids import new_session_key as router_key
from osmo_router.transport.ws_transport import WsTransport
from osmo_router.wire.keys import new_session_key
from osmo_router.wire.protocol import pb

#: Draws that a plain token_urlsafe could give, the bad ones first (1 in 32 draws starts with '-' or '_').
DRAWS = ("-looks-like-an-option", "_underscore-first", "fine-key")


@pytest.fixture
def rigged_draws(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """secrets.token_urlsafe gives DRAWS in order, whoever calls it."""
    left = list(DRAWS)
    monkeypatch.setattr(secrets, "token_urlsafe", lambda nbytes=None: left.pop(0))
    yield left


def test_a_key_starting_like_an_option_is_drawn_again(rigged_draws: list[str]) -> None:
    assert new_session_key() == "fine-key" and not rigged_draws
    assert router_key is new_session_key  # the router and the client draw by one rule


#: A WebSocket server in a process of its own: prints its port, then the path of every connection.
SERVER = """
import asyncio, sys
from aiohttp import web

async def handler(request):
    print(request.path, flush=True)
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    await ws.receive()
    return ws

async def main():
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture
def ws_server() -> Iterator[tuple[int, subprocess.Popen[str]]]:
    """The recording WebSocket server on loopback: (its port, its process)."""
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        yield int(proc.stdout.readline()), proc
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.asyncio
async def test_the_websocket_client_names_its_session_with_a_key_attach_can_take(
    rigged_draws: list[str], ws_server: tuple[int, subprocess.Popen[str]]
) -> None:
    port, server = ws_server
    transport = WsTransport(DialConfig(address=f"127.0.0.1:{port}", tls=False), f"127.0.0.1:{port}")
    try:
        target = pb.SessionTarget(workflow_id="wf")  # no key: the client draws one
        init = pb.PortForwardInit(target=target, protocol=pb.PROTOCOL_TCP, remote_port=80)
        async with asyncio.timeout(10):
            stream = await transport.open(pb.OPERATION_PORT_FORWARD, init)
            await stream.close()
    finally:
        await transport.aclose()
        # aiohttp's client objects are in reference cycles: collected now, their finalizers cannot run
        # inside a later test's ast.parse (CPython 3.11.7 then raises "AST constructor recursion depth
        # mismatch").
        gc.collect()
    assert server.stdout is not None
    path = server.stdout.readline().strip()  # printed before the handshake completed
    assert path.endswith("/client/fine-key"), path
