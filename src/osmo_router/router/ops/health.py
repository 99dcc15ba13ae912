"""The metrics port: /metrics, /healthz (alive) and /readyz (serving and not draining)."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from osmo_router.router.config import RouterConfig
from osmo_router.router.ops.connection_gate import HttpLimits
from osmo_router.router.ops.http_limits import metrics_limits, serve_app
from osmo_router.router.ops.metrics import RouterMetrics


class MetricsServer:
    """An aiohttp server on the metrics port, on the router's own event loop."""

    def __init__(self, metrics: RouterMetrics, ready: Callable[[], bool]) -> None:
        self._metrics = metrics
        self._ready = ready
        self._runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        """The application, with its three routes."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_page)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        return app

    async def start(self, host: str, port: int, limits: HttpLimits | None = None) -> None:
        """Listen on host:port (0 picks a free port, stored in `port`).

        Under `limits` (default: the defaults of `RouterConfig`): its own connection cap, per-address cap
        and header timeout, so /healthz keeps answering while other ports or other addresses are flooded.
        """
        limits = limits or metrics_limits(RouterConfig())
        self._runner, self.port = await serve_app(
            self.app(), host, port, limits, shutdown_timeout=1.0, registry=self._metrics.registry
        )

    async def close(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics_page(self, _request: web.Request) -> web.Response:
        return web.Response(body=self._metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="draining\n")
