"""A WebSocket backend's close carries its exit status even when a message was queued as it closed.

The backend (`osmo-router agent --transport ws`) reports the exit status as the reason of its close. Its
input pump waits in aiohttp's receive() while the session ends; when a message of the router (the
client's half-close, late through another replica) was already queued as the close began, the pump took
it and called receive() again, and aiohttp's receive() on a closing WebSocket closes it itself, with no
reason, ahead of ours: the router then reported exit 0 (seen in CI in test_ws_scaleout_e2e, about 1 in
200 under load). A real aiohttp server on loopback records the close reason it receives.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import WSMessage, WSMsgType, web

from osmo_router.transport.ws_transport import WsSessionStream
from osmo_router.wire.protocol import pb
from tests.ws_kit import serving_on_loopback


@pytest_asyncio.fixture
async def router_ws() -> AsyncIterator[tuple[str, asyncio.Future[str]]]:
    """A WebSocket endpoint on loopback: its URL, and the reason of the first close it receives."""
    reason: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        while (msg := await ws.receive()).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
            pass  # (the backend sends nothing before its close here)
        if not reason.done():
            reason.set_result(f"{msg.type.name} {msg.data} {msg.extra!r}")
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    async with serving_on_loopback(app) as port:
        yield f"http://127.0.0.1:{port}/ws", reason


@pytest.mark.asyncio
async def test_backend_close_keeps_its_exit_reason_with_a_message_queued(
    router_ws: tuple[str, asyncio.Future[str]],
) -> None:
    url, reason = router_ws
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        stream = WsSessionStream(ws, operation=pb.OPERATION_EXEC, backend=True)
        received: list[pb.Frame] = []

        async def pump_input() -> None:  # as agent/process.py's pump_input reads the session
            while (frame := await stream.recv()) is not None:
                received.append(frame)

        pump = asyncio.create_task(pump_input())
        await asyncio.sleep(0)  # (the pump's first step: it now waits in ws.receive())
        # The router's half-close arrives (its bytes parsed into aiohttp's queue; the pump not yet woken),
        # and in the same turn the process's end: its exit status, then the close.
        ws._reader.feed_data(WSMessage(WSMsgType.BINARY, b"", None), 0)
        await stream.send(pb.Frame(exit_status=pb.ExitStatus(code=4)))
        async with asyncio.timeout(10):  # (not wait_for: a task of its own would let the pump run first)
            await stream.aclose()
            await pump
        assert [frame.WhichOneof("kind") for frame in received] == ["half_close"]  # it was taken, not lost
        assert await asyncio.wait_for(reason, 10) == "CLOSE 1000 'exit:4'"
