"""The services on an in-process router: gRPC and WebSocket entry points through the one pipeline.

A real RouterServer on loopback in the test's own event loop, driven by raw gRPC calls and an
aiohttp WebSocket: what each transport's Side sends first, how a session ends, and that both
transports count the same things the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
import pytest_asyncio

from osmo_router.router.config import RouterConfig
from osmo_router.router.server import RouterServer
from osmo_router.wire.codec import ENCODED_HALF_CLOSE, ENCODED_SESSION_END
from osmo_router.wire.protocol import pb
from tests.raw_grpc import CONNECT, EXEC, REGISTER, RawCall, connect_init, exec_init, frame, hello, raw_channel

pytestmark = pytest.mark.asyncio
WF = "wf-svc"
BOUND = 10.0


@pytest_asyncio.fixture
async def router() -> AsyncIterator[RouterServer]:
    config = RouterConfig(port=0, metrics_port=-1, ws_port=0, tls_enabled=False, auth="none", rendezvous_timeout=5)
    server = RouterServer(config)
    await server.start()
    yield server
    await server.close()


class RawAgent:
    """A registered agent made of raw calls: it answers each SessionRequest with a Connect stream."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.register = RawCall(channel, REGISTER, None)

    async def start(self) -> None:
        await self.register.send(hello(WF))
        registered = pb.RegisterResponse.FromString(await self.register.read() or b"")
        assert registered.WhichOneof("kind") == "registered"

    async def accept(self) -> tuple[RawCall, pb.SessionOpen]:
        """The next session: its Connect call and the SessionOpen the router sent on it."""
        while True:
            response = pb.RegisterResponse.FromString(await self.register.read() or b"")
            if response.WhichOneof("kind") == "session_request":
                break
        connect = RawCall(self.channel, CONNECT, None)
        await connect.send(connect_init(WF, response.session_request.session_key))
        opened = pb.ConnectResponse.FromString(await connect.read() or b"")
        return connect, opened.open


def _sample(router: RouterServer, name: str, **labels: str) -> float:
    return router.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_grpc_client_and_agent_pair_relay_and_end_with_session_end(router: RouterServer) -> None:
    async with raw_channel(f"127.0.0.1:{router.port}") as channel:
        agent = RawAgent(channel)
        await agent.start()
        client = RawCall(channel, EXEC, None)
        await client.send(exec_init(WF, ["cat"]))
        connect, opened = await agent.accept()
        assert list(opened.exec.command) == ["cat"] and opened.session_key
        ready = pb.ExecResponse.FromString(await client.read() or b"").ready
        assert ready.session_key == opened.session_key
        await client.send(frame(data=b"hello"))
        assert await connect.read() == frame(data=b"hello")
        await connect.send(frame(data=b"world"), frame(exit_status=pb.ExitStatus(code=4)), ENCODED_HALF_CLOSE)
        outcome = await connect.finish()
        assert outcome.code == grpc.StatusCode.OK
        got = [await client.read() for _ in range(4)]
        assert got == [
            frame(data=b"world"),
            frame(exit_status=pb.ExitStatus(code=4)),
            ENCODED_HALF_CLOSE,
            ENCODED_SESSION_END,
        ]
        assert (await client.finish()).code == grpc.StatusCode.OK
    assert _sample(router, "router_grpc_sessions_by_transport_total", operation="exec", transport="grpc") == 1
    assert len(router.sessions) == 0


async def test_ws_client_meets_a_grpc_agent_through_the_same_pipeline(router: RouterServer) -> None:
    url = f"http://127.0.0.1:{router.ws_server.port}/api/router/exec/{WF}/client/key-ws-1?tty=0&cmd=cat"
    async with raw_channel(f"127.0.0.1:{router.port}") as channel, aiohttp.ClientSession() as http:
        agent = RawAgent(channel)
        await agent.start()
        ws = await http.ws_connect(url)
        await ws.send_bytes(b'{"Rows": 24, "Cols": 80}')  # the old protocol's first message: the size
        connect, opened = await agent.accept()
        assert opened.session_key == "key-ws-1" and list(opened.exec.command) == ["cat"]
        for payload in (b"one", b"two", b"three"):  # queued while the agent reads: one message each
            await connect.send(frame(data=payload))
        async with asyncio.timeout(BOUND):
            got = [(await ws.receive()).data for _ in range(3)]
        assert got == [b"one", b"two", b"three"]
        await connect.send(ENCODED_HALF_CLOSE)
        await connect.finish()
        async with asyncio.timeout(BOUND):
            closed = await ws.receive()
        assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1000
    assert _sample(router, "router_grpc_sessions_by_transport_total", operation="exec", transport="ws") == 1
    assert _sample(router, "router_grpc_agent_sessions_by_transport_total", operation="exec", transport="grpc") == 1


async def test_a_client_going_away_counts_as_no_error_on_either_transport(router: RouterServer) -> None:
    url = f"http://127.0.0.1:{router.ws_server.port}/api/router/exec/{WF}/client/key-ws-2?tty=0&cmd=cat"
    async with raw_channel(f"127.0.0.1:{router.port}") as channel, aiohttp.ClientSession() as http:
        agent = RawAgent(channel)
        await agent.start()
        grpc_client = RawCall(channel, EXEC, None)
        await grpc_client.send(exec_init(WF, ["cat"]))
        grpc_connect, _ = await agent.accept()
        await grpc_client.read()
        ws = await http.ws_connect(url)
        await ws.send_bytes(b'{"Rows": 24, "Cols": 80}')
        ws_connect, _ = await agent.accept()
        grpc_client.cancel()
        await ws.close()
        # Each agent stream is ended once its client left.
        for connect in (grpc_connect, ws_connect):
            outcome = await connect.finish(half_close=False)
            assert outcome.code != grpc.StatusCode.OK or outcome.responses == []
        assert await router.sessions.wait_empty(BOUND)
    for code in ("CANCELLED", "UNAVAILABLE"):
        assert _sample(router, "router_grpc_errors_total", operation="exec", code=code) == 0
    assert _sample(router, "router_grpc_sessions_active", operation="exec") == 0


async def test_ws_backend_refused_before_the_upgrade_gets_an_http_status(router: RouterServer) -> None:
    url = f"http://127.0.0.1:{router.ws_server.port}/api/router/nosuchop/{WF}/backend/k"
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(url)
    assert refused.value.status == 400
    labels = {"operation": "connect", "code": "INVALID_ARGUMENT", "transport": "ws"}
    assert _sample(router, "router_grpc_errors_by_transport_total", **labels) == 1


async def _pending_drops_to(router: RouterServer, value: int) -> None:
    """Poll the pending count (no event exists for it), within BOUND."""
    for _ in range(int(BOUND / 0.01)):
        if router.sessions.pending == value:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"pending stayed {router.sessions.pending}, not {value}")


async def test_pending_websocket_sessions_end_with_their_socket(router: RouterServer) -> None:
    base = f"http://127.0.0.1:{router.ws_server.port}/api/router"
    async with aiohttp.ClientSession() as http:
        # Backends with an hour-long rendezvous timeout, and clients, that connect and go away.
        sockets = [await http.ws_connect(f"{base}/portforward/{WF}/backend/bk-{i}?timeout=3600") for i in range(5)]
        for i in range(5):
            ws = await http.ws_connect(f"{base}/portforward/{WF}/client/ck-{i}?timeout=3600")
            sockets.append(ws)
        await _pending_drops_to(router, 10)
        for ws in sockets:
            await ws.close()
        await _pending_drops_to(router, 0)
    assert len(router.sessions) == 0
    for code in ("CANCELLED", "DEADLINE_EXCEEDED"):
        assert _sample(router, "router_grpc_errors_total", operation="portforward", code=code) == 0
