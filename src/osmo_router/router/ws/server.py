"""The old router's WebSocket endpoints, served by this router on `--ws-port` (aiohttp, same event loop).

An endpoint parses the URL, authenticates, builds a WebSocket Side (ws/sides.py) and hands it to
the same SessionPipeline as a gRPC stream: same limits, placement across replicas, relay, metrics
and audit. So a WS client can meet a gRPC agent, a gRPC client an old WS backend, and either
transport its own kind.

A key an orchestrator created (RouterControlService) brings its session's workflow names and
parameters, makes the router both ends of OSMO's port-forward control channel, and is an old
backend's credential for that session (ws/created.py).
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry

from osmo_router import __version__
from osmo_router.h2.server import tls_context
from osmo_router.router.auth.identity import Authenticator, Identity
from osmo_router.router.config import RouterConfig
from osmo_router.router.core.created import CreatedSession, CreatedSessions
from osmo_router.router.core.pipeline import SessionPipeline
from osmo_router.router.core.side import CONNECT, AgentJoin, ClientJoin
from osmo_router.router.ops.connection_gate import HttpLimits
from osmo_router.router.ops.http_limits import serve_app, ws_limits
from osmo_router.router.ws.aliases import WorkflowAliases
from osmo_router.router.ws.backend_side import WsBackendSide
from osmo_router.router.ws.client_side import WsClientSide
from osmo_router.router.ws.created import (
    check_operation,
    is_control_channel,
    key_identity,
    serve_control_backend,
    serve_control_channel,
)
from osmo_router.router.ws.init import client_init
from osmo_router.wire.errors import InvalidArgument, RouterError
from osmo_router.wire.ops import BY_LABEL, Operation
from osmo_router.wire.protocol import AUTHORIZATION_HEADER, pb
from osmo_router.wire.wsproto import SESSION_PATH, STDERR_SUBPROTOCOL, VERSION_PATH

#: Longest `?timeout=` a client may ask for, in seconds.
MAX_RENDEZVOUS_TIMEOUT = 3600.0
#: How long closing a WebSocket waits for the peer's close frame. A busy client reads everything
#: queued before it (a whole `cat` of output) and only then answers the close: the old CLI takes a
#: close it could not answer for a broken connection ("Connection Closed"), so be patient (aiohttp's
#: own default); a peer that never answers costs this handler 10 s.
CLOSE_TIMEOUT = 10.0


def server_ssl_context(config: RouterConfig) -> ssl.SSLContext | None:
    """TLS for the WebSocket port: the gRPC port's certificate and key (and client CA)."""
    return ws_tls_context(config) if config.tls_enabled else None


def ws_tls_context(config: RouterConfig) -> ssl.SSLContext:
    """The WebSocket port's TLS context from the files as they are now (the gRPC port's, with HTTP/1.1)."""
    return tls_context(config.tls_cert, config.tls_key, config.tls_client_ca, alpn="http/1.1")


def rendezvous_timeout(query: Mapping[str, str], default: float) -> float:
    """The `?timeout=` of a request in seconds (the router's own when absent)."""
    raw = query.get("timeout")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidArgument(f"timeout must be a number of seconds, not {raw!r}") from None
    if not 0 < value <= MAX_RENDEZVOUS_TIMEOUT:
        raise InvalidArgument(f"timeout must be in (0, {MAX_RENDEZVOUS_TIMEOUT:g}] seconds")
    return value


class WsServer:
    """The aiohttp application of the WebSocket endpoints, and its listener."""

    def __init__(
        self,
        config: RouterConfig,
        auth: Authenticator,
        pipeline: SessionPipeline,
        registry: CollectorRegistry,
        *,
        created: CreatedSessions | None = None,
    ) -> None:
        """`registry`: where the port's connection metrics go (the router's metrics registry).

        `created`: the sessions orchestrators created (ws/created.py).
        """
        self._config = config
        self._registry = registry
        self._auth = auth
        self._pipeline = pipeline
        self._runner: web.AppRunner | None = None
        # An exec client's first message, passed verbatim to a WS backend (byte compatibility), by key.
        self._first_messages: dict[str, bytes] = {}
        # A client's workflow as typed (name or UUID), to the ID backends dial with (--ws-workflow-aliases).
        self._aliases = WorkflowAliases(config.ws_workflow_aliases)
        self._created = created if created is not None else CreatedSessions()
        self.port = 0

    def app(self) -> web.Application:
        """The application with the old router's routes."""
        app = web.Application()
        app.router.add_get(VERSION_PATH, self._version)
        for side, handler in (("client", self._client), ("backend", self._backend)):
            path = SESSION_PATH.format(operation="{operation}", workflow="{workflow}", side=side, key="{key}")
            app.router.add_get(path, handler)
        return app

    async def start(
        self, host: str, port: int, limits: HttpLimits | None = None, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Listen on host:port (0 picks a free port, stored in `port`), with the port's connection limits;
        TLS with `ssl_context`, else with the configured certificate (server_ssl_context) when TLS is on."""
        # Sessions were drained before close; whatever is left is cut off like the gRPC side (grace 1s).
        # Per-address and total connection caps, TLS handshake and header timeouts: ops/http_limits.py.
        self._runner, self.port = await serve_app(
            self.app(),
            host,
            port,
            limits or ws_limits(self._config),
            ssl_context=ssl_context or server_ssl_context(self._config),
            shutdown_timeout=1.0,
            registry=self._registry,
        )

    async def close(self) -> None:
        """Stop listening and close the WebSockets still open."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _version(self, _request: web.Request) -> web.Response:
        return web.json_response(__version__)

    def _websocket(self) -> web.WebSocketResponse:
        return web.WebSocketResponse(
            max_msg_size=self._config.max_message_size,
            compress=False,  # payloads are terminal bytes, TCP streams and rsync data: not worth the CPU
            heartbeat=self._config.heartbeat_interval,
            timeout=CLOSE_TIMEOUT,
            # Selected when our client or WS agent offers it (stderr apart, wsproto); others offer none.
            protocols=(STDERR_SUBPROTOCOL,),
        )

    async def _authenticate(self, request: web.Request, operation: Operation | None) -> Identity:
        if operation is None:
            raise InvalidArgument(f"unknown operation {request.match_info['operation']!r} (exec, portforward or rsync)")
        header = request.headers.get("Authorization")
        token = request.query.get("token")
        metadata: list[tuple[str, str]] = []
        if header:
            metadata.append((AUTHORIZATION_HEADER, header))
        elif token:
            metadata.append((AUTHORIZATION_HEADER, f"Bearer {token}"))
        return await self._auth.authenticate(metadata)

    async def _client(self, request: web.Request) -> web.StreamResponse:
        typed, key = request.match_info["workflow"], request.match_info["key"]
        operation = BY_LABEL.get(request.match_info["operation"])
        label = operation.label if operation is not None else "unknown"
        side = WsClientSide(request, self._websocket(), max_message=self._config.max_message_size)
        identity = None
        try:
            identity = await self._authenticate(request, operation)
            assert operation is not None
            created = self._created.lookup(key, typed)
            workflow = created.workflow_id if created is not None else self._aliases.resolve(typed)
            # Before the upgrade, as the docs promise (403 with the reason): an agent's token, or a user
            # without the workflow, was accepted and then closed with 4000 (the old router's timeout code).
            identity.require_user()
            identity.require_workflow(workflow)
            if created is not None:
                check_operation(created, operation, backend=False)
                created.use()
                if await self._control_channel(side, identity, created, key):
                    return side.response
            await side.accept()
            timeout = rendezvous_timeout(request.query, self._config.rendezvous_timeout)
            init = await client_init(
                side.ws, operation.value, workflow, key, request.query, self._config.init_timeout, created
            )
        except RouterError as err:
            await self._pipeline.refuse(side, label, err, identity)
            return side.response
        side.set_extensions(
            parse_resize=init.parse_resize,
            want_exit=init.want_exit,
            want_eof=init.want_eof,
            udp=init.udp,
            stream=operation.label != "exec",
        )
        raw_init = operation.encode_init(getattr(init.open_msg, operation.open_field))
        join = ClientJoin(identity, operation, init.target, init.open_msg, raw_init, timeout)
        first = init.first_message
        if first is not None:
            self._first_messages.setdefault(key, first)
        del init
        try:
            await self._pipeline.serve_client(side, join)
        finally:
            if first is not None and self._first_messages.get(key) is first:
                del self._first_messages[key]
        return side.response

    async def _control_channel(self, side: WsClientSide, identity: Identity, created: CreatedSession, key: str) -> bool:
        """Serve an old client's control channel of a created session here (ws/created.py).

        True when it was served (the request is done); False when the WebSocket is no control channel.
        """
        if not is_control_channel(created, key):
            return False
        identity.require_user()
        identity.require_workflow(created.workflow_id)
        await side.accept()
        await serve_control_channel(side.ws, created, self._created)
        return True

    async def _backend(self, request: web.Request) -> web.StreamResponse:
        typed, key = request.match_info["workflow"], request.match_info["key"]
        operation = BY_LABEL.get(request.match_info["operation"])
        send_init = request.query.get("init", "") in ("1", "true")
        side = WsBackendSide(
            request,
            self._websocket(),
            operation,
            key=key,
            send_init=send_init,
            first_messages=self._first_messages,
            max_message=self._config.max_message_size,
        )
        init = pb.ConnectInit(session_key=key, agent_id=f"ws-backend@{side.peer}", workflow_id=typed)
        try:
            created = self._created.lookup(key, typed)
            if created is not None:
                init.workflow_id = created.workflow_id
            init.task = request.query.get("task", "") or (created.task if created is not None else "")
            identity = await self._backend_identity(request, operation, init.workflow_id, created)
            timeout = rendezvous_timeout(request.query, self._config.rendezvous_timeout)
            if created is not None and is_control_channel(created, key):
                identity.require_agent()
                identity.require_workflow(created.workflow_id)
                await side.accept()
                await serve_control_backend(side.ws, created, send_init)
                return side.response
        except RouterError as err:
            await self._pipeline.refuse(side, CONNECT, err)
            return side.response
        raw_init = pb.ConnectRequest(init=init).SerializeToString()
        await self._pipeline.serve_agent(side, AgentJoin(identity, init, raw_init, timeout))
        return side.response

    async def _backend_identity(
        self, request: web.Request, operation: Operation | None, workflow: str, created: CreatedSession | None
    ) -> Identity:
        """Who a backend is: its token's identity, or, without a token, the created session key it presents.

        An OSMO backend's workflow token serves its own workflow here, and nowhere else. A backend
        with no token at all is accepted for a created session whose key it presents (docs/security.md).
        """
        if created is not None and operation is not None:
            check_operation(created, operation, backend=True)
            created.use()
            if "Authorization" not in request.headers and "token" not in request.query:
                return key_identity(created, workflow)
        return (await self._authenticate(request, operation)).as_legacy_backend(workflow)
