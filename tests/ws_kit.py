"""Helpers for the WebSocket migration tests: WS backends as real processes, raw old-protocol sockets."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from tests.harness import AgentProc, Router, metric_value

T = TypeVar("T")
WAIT = 30.0


@contextlib.asynccontextmanager
async def serving_on_loopback(app: web.Application) -> AsyncIterator[int]:
    """Serve an aiohttp application on 127.0.0.1 (a free port) while the block runs; yields the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


def new_key() -> str:
    """A fresh session key, as an orchestrator would issue it."""
    return secrets.token_urlsafe(16)


class WsBackendProc(AgentProc):
    """`osmo-router agent --transport ws` serving one orchestrator-keyed session (waits until joined)."""

    def __init__(
        self,
        router: Router,
        workflow: str,
        key: str,
        *args: str,
        operation: str = "exec",
        tls: bool = False,
        env: dict[str, str] | None = None,
        launcher: Sequence[str] = (),
    ) -> None:
        super().__init__(
            router.address,
            workflow,
            "--transport",
            "ws",
            "--session-key",
            key,
            "--operation",
            operation,
            "--ws-address",
            f"127.0.0.1:{router.ws_port}",
            *args,
            tls=tls,
            wait=False,
            env=env,
            launcher=launcher,
        )
        self.wait_event("connected")


def ws_url(router: Router, operation: str, workflow: str, side: str, key: str, query: str = "") -> str:
    """The URL of one side of a session on the router's WebSocket port."""
    url = f"http://127.0.0.1:{router.ws_port}/api/router/{operation}/{workflow}/{side}/{key}"
    return f"{url}?{query}" if query else url


def client_args(router: Router, workflow: str, transport: str, *extra: str) -> list[str]:
    """osmo-net-client flags for a transport, with both of the router's addresses."""
    return [
        "--router-address",
        router.address,
        "--ws-address",
        f"127.0.0.1:{router.ws_port}",
        "--workflow-id",
        workflow,
        "--tls=false",
        "--transport",
        transport,
        *extra,
    ]


def run(coro_fn: Callable[[aiohttp.ClientSession], Awaitable[T]], timeout: float = WAIT) -> T:
    """Run an async test body with an aiohttp session, bounded."""

    async def main() -> T:
        async with asyncio.timeout(timeout), aiohttp.ClientSession() as http:
            return await coro_fn(http)

    return asyncio.run(main())


async def receive_until(ws: aiohttp.ClientWebSocketResponse, needle: bytes, timeout: float = WAIT) -> bytes:
    """Binary messages joined until `needle` shows up (bounded)."""
    seen = b""
    async with asyncio.timeout(timeout):
        while needle not in seen:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.BINARY, f"{msg.type} before {needle!r}; seen {seen[-300:]!r}"
            seen += msg.data
    return seen


async def receive_close(ws: aiohttp.ClientWebSocketResponse, timeout: float = WAIT) -> tuple[int | None, str, bytes]:
    """(close code, close reason, data received before it), skipping data messages (bounded)."""
    seen = b""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                seen += msg.data
                continue
            reason = str(msg.extra or "") if msg.type == aiohttp.WSMsgType.CLOSE else ""
            return ws.close_code, reason, seen


def transport_counts(router: Router, operation: str) -> dict[str, float]:
    """Paired sessions by transport: client_grpc, client_ws, agent_grpc, agent_ws."""
    text = router.metrics_text()
    out: dict[str, float] = {}
    for side, name in (
        ("client", "router_grpc_sessions_by_transport_total"),
        ("agent", "router_grpc_agent_sessions_by_transport_total"),
    ):
        for transport in ("grpc", "ws"):
            labels = {"operation": operation, "transport": transport}
            out[f"{side}_{transport}"] = metric_value(text, name, labels)
    return out


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The counters that moved."""
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}
