"""The router's lifecycle: start listeners, serve, drain on SIGTERM, close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import ssl
import time
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from osmo_router.cli.logs import fingerprint
from osmo_router.h2.server import tls_context
from osmo_router.io.forwarding import format_peer, os_errors_named
from osmo_router.router.auth.identity import Authenticator, NoAuth
from osmo_router.router.config import RouterConfig, is_loopback_host
from osmo_router.router.core.budget import Budgets, container_memory_limit, default_total_bytes
from osmo_router.router.core.created import CreatedLimits, CreatedSessions
from osmo_router.router.core.memory_guard import MemoryGuard, default_limit
from osmo_router.router.core.pipeline import SessionPipeline
from osmo_router.router.core.registry import AgentRegistry
from osmo_router.router.core.sessions import Session, SessionStore
from osmo_router.router.grpc.agent_service import AgentService
from osmo_router.router.grpc.client_service import ClientService
from osmo_router.router.grpc.control_service import CONTROL_SERVICE, ControlService
from osmo_router.router.grpc.list_sessions import ListSessions
from osmo_router.router.ops.conn_limits import ConnectionBudget, connection_budget, log_limits
from osmo_router.router.ops.grpc_server import build_grpc_server, grpc_credentials
from osmo_router.router.ops.health import MetricsServer
from osmo_router.router.ops.http_limits import metrics_limits, ws_limits
from osmo_router.router.ops.metrics import RouterMetrics
from osmo_router.router.ops.tls_reload import TlsReloader
from osmo_router.router.scaleout.directory import Directory, MemoryDirectory
from osmo_router.router.scaleout.placer import ScaleOut
from osmo_router.router.ws.server import WsServer, server_ssl_context, ws_tls_context
from osmo_router.wire.errors import DeadlineExceeded
from osmo_router.wire.protocol import AGENT_SERVICE, CLIENT_SERVICE

log = logging.getLogger(__name__)

#: What the ends of a resumable session read when a draining router moves them: to another replica when
#: they share a directory (--redis-url), else to this one once it is back (a restart in place).
DRAINING = "router draining: the session resumes on another replica"
DRAINING_ALONE = "router draining: the session resumes once the router is back (it has no other replica)"
#: After --drain-timeout, how long the sessions ended then may take to end (their status sent, audited).
DRAIN_END_WAIT = 1.0


def build_authenticator(config: RouterConfig) -> Authenticator:
    """The authenticator the config asks for."""
    if config.auth == "none":
        return NoAuth()
    from osmo_router.router.auth.jwt import JwtAuthenticator

    authenticator: Authenticator = JwtAuthenticator.from_config(config)
    return authenticator


def created_limits(config: RouterConfig) -> CreatedLimits:
    """The bounds on created sessions the config asks for."""
    return CreatedLimits(
        max_sessions=config.max_created_sessions,
        max_per_service=config.max_created_per_service,
        max_bytes=config.max_created_bytes,
        max_bytes_per_service=config.max_created_bytes_per_service,
        default_ttl=config.created_session_ttl,
        max_ttl=max(24 * 3600.0, config.created_session_ttl),
    )


class RouterServer:
    """One router process: gRPC services, metrics port, session janitor."""

    def __init__(self, config: RouterConfig, authenticator: Authenticator | None = None) -> None:
        config.validate()
        if not config.router_id:
            config = replace(config, router_id=secrets.token_hex(4))
        self.config = config
        self.registry = AgentRegistry()
        self.budgets = Budgets(config.user_buffer_bytes, config.total_buffer_bytes or default_total_bytes())
        self.sessions = SessionStore(
            self.registry,
            buffer=config.flow_control_buffer,
            buffer_bytes=config.flow_control_bytes,
            max_pending=config.max_pending_rendezvous,
            max_sessions=config.max_sessions,
            max_per_user=config.max_sessions_per_user,
            max_pending_per_identity=config.max_pending_per_identity,
            max_per_forward=config.max_connections_per_forward,
            budgets=self.budgets,
            on_remove=self._session_removed,
            created=CreatedSessions(created_limits(config)),
            rendezvous_timeout=config.rendezvous_timeout,
        )
        guard_limit = config.memory_guard_bytes or default_limit(self.budgets.total.limit, container_memory_limit())
        self.guard = MemoryGuard(guard_limit, self.sessions.sessions, self._guard_ended)
        # Read at scrape time, so the gauges are exact without bookkeeping on every join and leave.
        self.metrics = RouterMetrics(
            live_sessions=self.sessions.sessions,
            pending=lambda: self.sessions.pending,
            standby=self.registry.standby_count,
            buffered=lambda: self.budgets.total.used,
            held=lambda: self.budgets.total.held,
            created=lambda: len(self.sessions.created),
            replay=self.registry.replay_bytes,
        )
        self.auth = authenticator or build_authenticator(config)
        self.directory: Directory = MemoryDirectory()
        self.scaleout: ScaleOut | None = None
        if config.redis_url:
            from osmo_router.router.scaleout.redis_directory import RedisDirectory

            self.directory = RedisDirectory(
                config.redis_url, replica=config.router_id, ttl=config.directory_ttl, registry=self.metrics.registry
            )
            self.scaleout = ScaleOut(config, self.sessions, self.registry, self.directory, self.metrics)
        self.pipeline = SessionPipeline(config, self.sessions, self.metrics, self.scaleout)
        relay = self.scaleout.list_sessions if self.scaleout is not None else None
        self.client_service = ClientService(
            config, self.auth, self.pipeline, ListSessions(self.auth, self.registry, relay), self.sessions.created
        )
        self.agent_service = AgentService(
            config, self.sessions, self.registry, self.auth, self.metrics, self.directory, self.pipeline
        )
        self.control_service = ControlService(self.auth, self.sessions)
        self.ws_server = WsServer(
            config, self.auth, self.pipeline, self.metrics.registry, created=self.sessions.created
        )
        #: Loads the certificate again when its files change (router/ops/tls_reload.py).
        self.tls = TlsReloader(config, tls_context) if config.tls_enabled else None
        self.health = health.aio.HealthServicer()
        self.metrics_server = MetricsServer(self.metrics, self.is_ready)
        self.port = 0
        self.draining = False
        self._server: grpc.aio.Server | None = None
        self._janitor: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    def is_ready(self) -> bool:
        """Serving and not draining."""
        return self._server is not None and not self.draining

    async def start(self) -> None:
        """Bind the gRPC and metrics ports and start serving."""
        # One share of the descriptor limit per port, worked out once (it may raise the soft limit).
        budget = connection_budget(self.config)
        log_limits(self.config, budget)
        self._log_memory_limits()
        server = self._grpc_server(budget)
        advertise = self.advertise_address() if self.config.redis_url else ""
        await server.start()
        self._server = server
        if self.config.redis_url:
            await self.directory.start(advertise, lambda scoped: self.sessions.get_scoped(scoped) is not None)
        for name in ("", CLIENT_SERVICE, AGENT_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.metrics_port >= 0:
            limits = metrics_limits(self.config, budget)
            with _listening(self.config.host, self.config.metrics_port, "the metrics port (--metrics-port)"):
                await self.metrics_server.start(self.config.host, self.config.metrics_port, limits)
        if self.config.ws_port >= 0:
            with _listening(self.config.host, self.config.ws_port, "the WebSocket port (--ws-port)"):
                context = server_ssl_context(self.config)
                if context is not None and self.tls is not None:
                    self.tls.track(context, lambda: ws_tls_context(self.config))
                await self.ws_server.start(
                    self.config.host, self.config.ws_port, ws_limits(self.config, budget), context
                )
        self._janitor = asyncio.create_task(self._watch())
        if self.tls is not None:
            self.tls.start()
        self._log_listening(advertise)

    def _grpc_server(self, budget: ConnectionBudget) -> grpc.aio.Server:
        """The gRPC server with every service added and its port bound (not started)."""
        server = build_grpc_server(self.config, budget, self.metrics.registry)
        server.add_generic_rpc_handlers((self.client_service.handler(), self.agent_service.handler()))
        if self.scaleout is not None:
            # Internal (replicas only), so not advertised through reflection.
            server.add_generic_rpc_handlers((self.scaleout.handler(self.client_service, self.agent_service),))
        self.control_service.add_to(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (CLIENT_SERVICE, AGENT_SERVICE, CONTROL_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = format_peer((self.config.host, self.config.port))
        with _listening(self.config.host, self.config.port, "the gRPC port (--port)"):
            if self.tls is not None:
                credentials = grpc_credentials(self.config)  # (clear errors for missing or bad files)
                if isinstance(credentials, ssl.SSLContext):
                    config = self.config
                    credentials = self.tls.track(
                        credentials, lambda: tls_context(config.tls_cert, config.tls_key, config.tls_client_ca)
                    )
                else:
                    credentials = self.tls.grpcio_credentials()
                self.port = server.add_secure_port(address, credentials)
            else:
                if not is_loopback_host(self.config.host):
                    log.warning("plaintext on %s: tokens travel in the clear unless a proxy terminates TLS", address)
                self.port = server.add_insecure_port(address)
        return server

    def _log_listening(self, advertise: str) -> None:
        """The "listening" line: ports, server kind, TLS, auth, directory (also as structured fields)."""
        log.info(
            "osmo-router %s listening on %s:%d (grpc %s, tls=%s, auth=%s), metrics %s, websocket %s",
            self.config.router_id,
            self.config.host,
            self.port,
            self.config.grpc_server,
            self.config.tls_enabled,
            self.config.auth,
            f"on port {self.metrics_server.port}" if self.config.metrics_port >= 0 else "off",
            f"on port {self.ws_server.port}" if self.config.ws_port >= 0 else "off",
            extra={
                "fields": {
                    "event": "listening",
                    "grpc_port": self.port,
                    "grpc_server": self.config.grpc_server,
                    "metrics_port": self.metrics_server.port if self.config.metrics_port >= 0 else -1,
                    "ws_port": self.ws_server.port if self.config.ws_port >= 0 else -1,
                    "router_id": self.config.router_id,
                    "directory": "redis" if self.config.redis_url else "memory",
                    "advertise_address": advertise,
                }
            },
        )

    def advertise_address(self) -> str:
        """host:port at which the other replicas reach this one (--advertise-address, else --host and the port)."""
        if self.config.advertise_address:
            return self.config.advertise_address
        host = self.config.host
        if host in ("", "0.0.0.0", "::", "[::]"):
            raise ValueError("--advertise-address is required with --redis-url when --host is a wildcard address")
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def _session_removed(self, session: Session) -> None:
        """The shared directory withdraws a session this replica forgot."""
        self.directory.session_removed(session.scoped_key)

    async def serve(self) -> None:
        """Run until SIGTERM/SIGINT or `close`: the first signal drains, a second one exits at once."""
        loop = asyncio.get_running_loop()
        first, second = asyncio.Event(), asyncio.Event()

        def on_signal() -> None:
            if first.is_set():
                second.set()
            first.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal)
        if await _first_of(first.wait(), self._stopped.wait()) == 0:
            drained = await _first_of(self.drain(), second.wait())
            if drained == 1:
                log.info("second signal: exiting now, cutting off %d sessions", len(self.sessions))
                await self.close(grace=0.0)
                return
        await self.close()

    async def drain(self) -> None:
        """Refuse new sessions, move resumable ones, let the others finish up to --drain-timeout.

        Resumable sessions (the client asked and the agent answered with a Resume frame) are ended
        at once with UNAVAILABLE "router draining": both ends take it as a break and resume on
        another replica (or on this router once it is back), so they hold up neither the drain
        nor the user. The others (WebSocket transport, clients or agents without resume) are
        waited for, as before.
        """
        if self.draining:
            return
        self.draining = True
        self.metrics.draining.set(1)
        self.sessions.accepting = False
        await self.health.enter_graceful_shutdown()
        # Parked standby streams are no sessions: end them now (new ones are refused while draining).
        for reg in self.registry.registrations():
            reg.close_standby()
        if self.scaleout is not None:
            # Agents re-register with another replica at once, so their new sessions (and the
            # resumes of the sessions moved below) work there.
            for reg in self.registry.registrations():
                reg.replaced.set()
        moved = self.pipeline.move_resumable(DRAINING if self.scaleout is not None else DRAINING_ALONE)
        log.info(
            "draining: %d sessions in flight (%d resumable ones moved), waiting up to %gs",
            len(self.sessions),
            moved,
            self.config.drain_timeout,
            extra={"fields": {"event": "draining", "moved": moved}},
        )
        deadline = time.monotonic() + self.config.drain_timeout
        await self.sessions.wait_empty(self.config.drain_timeout)
        await self.pipeline.wait_relays_idle(max(0.0, deadline - time.monotonic()))
        log.info("drained (%d sessions left)", len(self.sessions))
        if self.pipeline.end_all(
            f"router shutting down: the session outlived its --drain-timeout ({self.config.drain_timeout:g}s)"
        ):
            # Their ends (and audit lines) say why, before the server's stop cuts what is left.
            await self.sessions.wait_empty(DRAIN_END_WAIT)
            await self.pipeline.wait_relays_idle(DRAIN_END_WAIT)

    async def close(self, grace: float = 1.0) -> None:
        """Stop everything; sessions still open are cut off (gRPC calls get `grace` seconds)."""
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(BaseException):
                await self._janitor
            self._janitor = None
        # Withdraw this replica's directory entries first: the others stop sending streams here.
        await self.directory.close()
        if self._server is not None:
            await self._server.stop(grace=grace)
            self._server = None
        await self.ws_server.close()
        if self.scaleout is not None:
            await self.scaleout.close()
        await self.metrics_server.close()
        await self.auth.close()
        if self.tls is not None:
            await self.tls.close()
        self._stopped.set()

    def _log_memory_limits(self) -> None:
        """One log line with the byte budgets and the memory guard in force (`event: memory limits`)."""
        fields = {
            "event": "memory limits",
            "flow_control_bytes": self.config.flow_control_bytes,
            "user_buffer_bytes": self.budgets.per_user,
            "total_buffer_bytes": self.budgets.total.limit,
            "memory_guard_bytes": self.guard.limit,
            "min_drain_rate": self.config.min_drain_rate,
            "grpc_server": self.config.grpc_server,
            # Native server: what one stream the relay does not read can hold besides the budgets.
            "stream_window_bytes": self.config.stream_window_bytes if self.config.grpc_server == "native" else None,
            "max_stream_window_bytes": (
                self.config.max_stream_window_bytes if self.config.grpc_server == "native" else None
            ),
        }
        log.info(
            "memory limits: %d MiB per user, %d MiB in all, memory guard at %d MiB RSS",
            self.budgets.per_user >> 20,
            self.budgets.total.limit >> 20,
            self.guard.limit >> 20,
            extra={"fields": fields},
        )

    async def _watch(self) -> None:
        """The background checks: idle sessions, and the memory guard."""
        await asyncio.gather(self._expire_idle_sessions(), self.guard.run())

    def _guard_ended(self, _user: str, count: int) -> None:
        self.metrics.memory_guard_sessions_total.inc(count)

    async def _expire_idle_sessions(self) -> None:
        ttl = self.config.session_ttl
        interval = max(0.05, min(ttl / 4, 10.0))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            self.sessions.created.expire()
            for session in self.sessions.sessions():
                if session.paired.is_set() and now - session.last_activity > ttl and session.error is None:
                    log.info(
                        "session %s idle for %.0fs: expired", fingerprint(session.key), now - session.last_activity
                    )
                    self.metrics.sessions_expired_total.inc()
                    session.fail(DeadlineExceeded(f"session idle for longer than --session-ttl ({ttl:g}s)"))


async def _first_of(*waits: Coroutine[Any, Any, Any]) -> int:
    """Run the coroutines until one finishes; cancel the others; the index of the one that finished."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return next(i for i, task in enumerate(tasks) if task in done)


def _listening(host: str, port: int, what: str) -> contextlib.AbstractContextManager[None]:
    """Name the address and the port's flag in a failure to listen."""
    return os_errors_named(f"cannot listen on {format_peer((host, port))}, {what}")
