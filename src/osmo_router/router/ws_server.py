"""The old router's WebSocket endpoints, served by this router on `--ws-port` (aiohttp, same event loop).

A WebSocket side joins the same SessionStore as a gRPC side (`join_client` / `join_agent`), with
the same Authenticator, limits, relay and metrics; it only adds the translation of
`router/ws_endpoints.py`. So a WS client can meet a gRPC agent, a gRPC client an old WS backend,
and either transport its own kind.
"""

from __future__ import annotations

import ssl
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from osmo_router import __version__
from osmo_router.errors import Cancelled, InvalidArgument, RouterError, Unavailable
from osmo_router.protocol import AUTHORIZATION_HEADER, pb
from osmo_router.router import audit
from osmo_router.router.auth import Authenticator, Identity
from osmo_router.router.config import RouterConfig
from osmo_router.router.http_limits import serve_app, ws_limits  # issue 14
from osmo_router.router.metrics import RouterMetrics
from osmo_router.router.relay import relay_side
from osmo_router.router.sessions import Session, SessionStore
from osmo_router.router.ws_endpoints import WsBackendEndpoint, WsClientEndpoint, close_with_error
from osmo_router.router.ws_init import client_init
from osmo_router.router.ws_relay import relay_backend, relay_client
from osmo_router.wsproto import ERROR_HEADER, MAX_ERROR_HEADER, OPERATIONS, SESSION_PATH, VERSION_PATH, size_message

if TYPE_CHECKING:
    from osmo_router.router.scaleout import ScaleOut

#: HTTP status of a refusal before the WebSocket upgrade, by gRPC status name.
_HTTP_STATUS = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "INVALID_ARGUMENT": 400, "UNAVAILABLE": 503}
#: Longest `?timeout=` a client may ask for, in seconds.
MAX_RENDEZVOUS_TIMEOUT = 3600.0
#: How long closing a WebSocket waits for the peer's close frame.
CLOSE_TIMEOUT = 2.0


def server_ssl_context(config: RouterConfig) -> ssl.SSLContext | None:
    """TLS for the WebSocket port: the gRPC port's certificate and key (and client CA)."""
    if not config.tls_enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.load_verify_locations(config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


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
        self, config: RouterConfig, sessions: SessionStore, auth: Authenticator, metrics: RouterMetrics
    ) -> None:
        self._config = config
        self._sessions = sessions
        self._auth = auth
        self._metrics = metrics
        self._runner: web.AppRunner | None = None
        # The exec client's first message, passed verbatim to a WS backend (byte compatibility).
        self._first_messages: weakref.WeakKeyDictionary[Session, bytes] = weakref.WeakKeyDictionary()
        #: With a shared directory (--redis-url): sides whose session is elsewhere are relayed there.
        self.scaleout: ScaleOut | None = None
        self.port = 0

    def app(self) -> web.Application:
        """The application with the old router's routes."""
        app = web.Application()
        app.router.add_get(VERSION_PATH, self._version)
        for side, handler in (("client", self._client), ("backend", self._backend)):
            path = SESSION_PATH.format(operation="{operation}", workflow="{workflow}", side=side, key="{key}")
            app.router.add_get(path, handler)
        return app

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port (0 picks a free port, stored in `port`)."""
        # Sessions were drained before close; whatever is left is cut off like the gRPC side (grace 1s).
        # issue 14: per-address and total connection caps, TLS handshake and header timeouts.
        self._runner, self.port = await serve_app(
            self.app(),
            host,
            port,
            ws_limits(self._config),
            ssl_context=server_ssl_context(self._config),
            shutdown_timeout=1.0,
            registry=self._metrics.registry,
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
        )

    async def _authenticate(self, request: web.Request, operation: str) -> Identity:
        if operation not in OPERATIONS:
            raise InvalidArgument(f"unknown operation {operation!r} (exec, portforward or rsync)")
        header = request.headers.get("Authorization")
        token = request.query.get("token")
        metadata: list[tuple[str, str]] = []
        if header:
            metadata.append((AUTHORIZATION_HEADER, header))
        elif token:
            metadata.append((AUTHORIZATION_HEADER, f"Bearer {token}"))
        return await self._auth.authenticate(metadata)

    async def _refuse(self, operation: str, err: RouterError, request: web.Request) -> web.Response:
        self._metrics.error(operation, err.code, "ws")
        audit.refused(operation, err, request.remote or "unknown", transport="ws")
        text = f"{err.code.name}: {err.message}"
        # A header carries the cause too: WebSocket clients see a refused handshake's headers, not its body.
        line = "".join(ch if 0x20 <= ord(ch) < 0x7F else " " for ch in text)[:MAX_ERROR_HEADER]
        return web.Response(status=_HTTP_STATUS.get(err.code.name, 400), headers={ERROR_HEADER: line}, text=text + "\n")

    async def _client(self, request: web.Request) -> web.StreamResponse:
        op_name, workflow, key = (request.match_info[k] for k in ("operation", "workflow", "key"))
        try:
            identity = await self._authenticate(request, op_name)
        except RouterError as err:
            return await self._refuse(op_name if op_name in OPERATIONS else "unknown", err, request)
        ws = self._websocket()
        await ws.prepare(request)
        try:
            timeout = rendezvous_timeout(request.query, self._config.rendezvous_timeout)
            init = await client_init(ws, OPERATIONS[op_name], workflow, key, request.query, self._config.init_timeout)
            if self.scaleout is not None:
                place = await self.scaleout.place_client(identity, init.target, from_peer=False)
                if place.owner is not None:
                    peer, buffer = request.remote or "unknown", self._config.flow_control_buffer
                    await relay_client(self.scaleout, place.owner, ws, identity, init, peer, buffer)
                    return ws
            session = self._sessions.join_client(identity, OPERATIONS[op_name], init.target, init.open_msg)
        except RouterError as err:
            self._metrics.error(op_name, err.code, "ws")
            audit.refused(op_name, err, request.remote or "unknown", identity, transport="ws")
            await close_with_error(ws, err)
            return ws
        if init.first_message is not None:
            self._first_messages[session] = init.first_message
        endpoint = WsClientEndpoint(
            ws, session, parse_resize=init.parse_resize, want_exit=init.want_exit, want_eof=init.want_eof
        )
        await self._run_client(session, ws, endpoint, timeout, request.remote or "unknown")
        return ws

    async def _run_client(
        self, session: Session, ws: web.WebSocketResponse, endpoint: WsClientEndpoint, timeout: float, peer: str
    ) -> None:
        op_name = session.operation_name
        started, clean, active = time.monotonic(), False, False
        failure: RouterError | None = None
        try:
            if not session.paired.is_set():
                await self._sessions.wait_paired(session, timeout)
            if session.paired_at is not None:
                self._metrics.rendezvous_duration.labels(op_name).observe(session.paired_at - session.created)
            self._metrics.sessions_active.labels(op_name).inc()
            self._metrics.sessions_total.labels(op_name).inc()
            self._metrics.sessions_by_transport.labels(op_name, "ws").inc()
            active = True
            audit.session_event("session start", session, peer, transport="ws")
            await relay_side(
                session,
                endpoint,
                is_client=True,
                flow_control_timeout=self._config.flow_control_timeout,
                hooks=self._metrics,
            )
            clean = True
        except RouterError as err:
            failure = err
        except (ConnectionError, RuntimeError) as err:  # the WebSocket broke under a write
            failure = Cancelled(f"the client's WebSocket broke: {err}")
        finally:
            if not clean:
                session.fail(failure or Cancelled("the client went away"))
            self._sessions.remove(session)
            if active:
                self._metrics.sessions_active.labels(op_name).dec()
                audit.session_event("session end", session, peer, time.monotonic() - started, transport="ws")
        if failure is not None:
            self._metrics.error(op_name, failure.code, "ws")
            await close_with_error(ws, failure)
        elif not ws.closed:
            await ws.close()

    async def _backend(self, request: web.Request) -> web.StreamResponse:
        op_name, workflow, key = (request.match_info[k] for k in ("operation", "workflow", "key"))
        init = pb.ConnectInit(
            session_key=key,
            agent_id=f"ws-backend@{request.remote or 'unknown'}",
            workflow_id=workflow,
            task=request.query.get("task", ""),
        )
        try:
            identity = await self._authenticate(request, op_name)
            timeout = rendezvous_timeout(request.query, self._config.rendezvous_timeout)
            place = await self.scaleout.place_agent(identity, init, from_peer=False) if self.scaleout else None
            # Joined before the upgrade: once a backend's handshake is done, a client finds it.
            session = self._sessions.join_agent(identity, init) if place is None or place.owner is None else None
        except RouterError as err:
            return await self._refuse("connect", err, request)
        send_init = request.query.get("init", "") in ("1", "true")
        if session is None:
            assert self.scaleout is not None and place is not None and place.owner is not None
            ws = self._websocket()
            await ws.prepare(request)
            peer, buffer = request.remote or "unknown", self._config.flow_control_buffer
            operation = OPERATIONS[op_name]
            await relay_backend(self.scaleout, place.owner, ws, identity, init, operation, send_init, peer, buffer)
            return ws
        ws = self._websocket()
        try:
            await ws.prepare(request)
        except BaseException:
            session.fail(Unavailable("the backend went away during the handshake"))
            self._sessions.remove(session)
            raise
        await self._run_backend(session, ws, OPERATIONS[op_name], timeout, send_init)
        return ws

    async def _run_backend(
        self, session: Session, ws: web.WebSocketResponse, operation: int, timeout: float, send_init: bool
    ) -> None:
        clean = False
        failure: RouterError | None = None
        try:
            if not session.paired.is_set():
                await self._sessions.wait_paired(session, timeout)
            if session.operation != operation:
                raise InvalidArgument(f"the session is {session.operation_name}, this backend serves another")
            self._metrics.agent_sessions_by_transport.labels(session.operation_name, "ws").inc()
            if send_init:  # the `init=1` extension: the whole SessionOpen, for a new backend
                await ws.send_bytes(pb.ConnectResponse.FromString(session.open_message).open.SerializeToString())
            elif operation == pb.OPERATION_EXEC:
                await ws.send_bytes(self._first_messages.get(session) or _size_of(session))
            await relay_side(
                session,
                WsBackendEndpoint(ws, operation=operation),
                is_client=False,
                flow_control_timeout=self._config.flow_control_timeout,
                hooks=self._metrics,
            )
            clean = True
        except RouterError as err:
            failure = err
        except (ConnectionError, RuntimeError) as err:
            failure = Unavailable(f"the backend's WebSocket broke: {err}")
        finally:
            if not clean:
                session.fail(failure or Unavailable("the agent disconnected"))
                self._sessions.remove(session)
        if failure is not None:
            await close_with_error(ws, failure)
        elif not ws.closed:
            await ws.close()


def _size_of(session: Session) -> bytes:
    """The size message for a WS backend whose client came over gRPC (from the ExecInit)."""
    init = pb.ConnectResponse.FromString(session.open_message).open.exec
    return size_message(init.size.rows, init.size.cols)
