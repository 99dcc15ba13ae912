"""Connection caps and timeouts for the router's aiohttp ports (WebSocket and metrics).

aiohttp alone keeps a connection that sends half a request line for its keep-alive timeout (about
an hour by default) and accepts any number of connections from one address. `serve_app` serves an
application with:

- a cap on connections per peer address and on the port's total: past either, a new connection is
  reset right after `accept()`, before any byte is read, so it costs a descriptor for microseconds;
- TLS done after that check (`loop.connect_accepted_socket` with a handshake timeout), so connections
  stuck in the TLS handshake count against the caps too;
- a header timeout: a connection whose first request line and headers are not complete within it
  is aborted (aiohttp has no such timeout; the idle keep-alive timeout bounds the later requests).

Admission is at accept (the ConnectionGate of connection_gate.py), release in `connection_lost` of a
`RequestHandler` subclass: nothing is added to the data path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from osmo_router.router.config import RouterConfig
from osmo_router.router.ops.conn_limits import ConnectionBudget, connection_budget
from osmo_router.router.ops.connection_gate import ConnectionGate, HttpLimits, peer_address
from osmo_router.router.ops.header_bytes import HEADERS_TOO_LARGE, HeaderBytes
from osmo_router.router.ops.http_errors import QuietBadRequests

log = logging.getLogger(__name__)

#: Listen backlog of the guarded ports: a burst of connects waits in the kernel, not in SYN retries.
BACKLOG = 1024


def ws_limits(config: RouterConfig, budget: ConnectionBudget | None = None) -> HttpLimits:
    """The WebSocket port's limits."""
    budget = budget or connection_budget(config)
    return HttpLimits(
        "ws",
        budget.ws,
        config.ws_max_connections_per_address,
        config.http_header_timeout,
        config.http_idle_timeout,
        config.handshake_timeout,
    )


def metrics_limits(config: RouterConfig, budget: ConnectionBudget | None = None) -> HttpLimits:
    """The metrics port's limits (its cap is its own share: floods on the other ports cannot take it)."""
    budget = budget or connection_budget(config)
    return HttpLimits(
        "metrics",
        budget.metrics,
        config.metrics_max_connections_per_address,
        config.http_header_timeout,
        config.http_idle_timeout,
        config.handshake_timeout,
    )


class GuardedRequestHandler(QuietBadRequests):
    """aiohttp's request handler for one admitted connection: counted out when it ends, with a header timeout."""

    __slots__ = ("_address", "_gate", "_header_bytes", "_header_timer", "_headers_seen", "_made")

    def __init__(self, manager: web.Server, *, gate: ConnectionGate, address: str, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gate = gate
        self._address = address
        self._made = False
        self._headers_seen = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = HeaderBytes()

    def data_received(self, data: bytes) -> None:
        """Pass the bytes to aiohttp unless a request's line and headers pass MAX_HEADER_BYTES."""
        if not self._header_bytes.fits(data):  # router/ops/header_bytes.py
            self._gate.refuse("header_size", self._address)
            if self.transport is not None:
                self.transport.write(HEADERS_TOO_LARGE)
                self.transport.close()
            self._header_bytes.upgraded()  # nothing more is counted, or passed on
            self._force_close = True  # aiohttp ignores whatever else arrives
            return
        super().data_received(data)

    def set_parser(self, parser: Any, data_received_cb: Callable[[], None] | None = None) -> None:
        """aiohttp accepted a WebSocket upgrade (it sets the frame reader before the 101): what follows
        are its frames, not headers. Not at the request's `Upgrade` header: a request naming one that
        is answered as HTTP (not a WebSocket path, a refused handshake) keeps the connection, and the
        requests after it must stay counted."""
        self._header_bytes.upgraded()
        super().set_parser(parser, data_received_cb)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Serve the connection (TLS, when on, is done by now); the header timeout starts."""
        self._made = True
        super().connection_made(transport)
        timeout = self._gate.limits.header_timeout
        if timeout > 0 and not self._headers_seen:
            self._header_timer = asyncio.get_running_loop().call_later(timeout, self._header_deadline)

    def headers_seen(self) -> None:
        """A complete request arrived: the header timeout no longer applies (keep-alive does)."""
        if not self._headers_seen:
            self._headers_seen = True
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._headers_seen or self.transport is None:
            return
        self._gate.refuse("header_timeout", self._address)
        self.transport.abort()  # not close(): a TLS close would wait for the peer's close_notify

    def release(self) -> None:
        """Count the connection out of the gate (once)."""
        if self._address:
            self._gate.release(self._address)
            self._address = ""
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_lost(self, exc: BaseException | None) -> None:
        """Count the connection out; aiohttp's own clean-up if it ever saw the connection."""
        self.release()
        if self._made:  # uvloop reports a failed TLS handshake to the app protocol too
            super().connection_lost(exc)


class GuardedListener:
    """Listening sockets whose connections are admitted by a ConnectionGate before the loop sees them.

    The accept is ours (not `loop.create_server`): a refused connection is closed before any transport
    or TLS state exists, and an admitted one is handed over with `loop.connect_accepted_socket`, TLS
    and its handshake timeout included, so connections in their handshake count against the caps too.
    (`loop.start_tls` from `connection_made` would race with uvloop, which starts reading right after
    `connection_made` even when the protocol paused reading.)
    """

    def __init__(
        self,
        sockets: list[socket.socket],
        gate: ConnectionGate,
        factory: Callable[[str], GuardedRequestHandler],
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        self.sockets = sockets
        self._gate = gate
        self._factory = factory
        self._ssl = ssl_context
        self._loop = asyncio.get_running_loop()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        """Accept connections."""
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(BACKLOG):
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE, ENFILE, ENOBUFS...: wait, as asyncio does
                log.warning("%s port: accept failed (%s); retrying in 1s", self._gate.limits.port_name, err)
                self._loop.remove_reader(listener.fileno())
                self._loop.call_later(1.0, self._resume, listener)
                return
            self._admit(conn, peer_address(peer))

    def _resume(self, listener: socket.socket) -> None:
        if not self._closed:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def _admit(self, conn: socket.socket, address: str) -> None:
        if not self._gate.admit(address):
            with contextlib.suppress(OSError):  # RST: the descriptor is freed at once, no TIME_WAIT
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()
            return
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handler = self._factory(address)
        task = self._loop.create_task(self._hand_over(conn, handler, address))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _hand_over(self, conn: socket.socket, handler: GuardedRequestHandler, address: str) -> None:
        timeout = self._gate.limits.handshake_timeout
        started = self._loop.time()
        try:
            if self._ssl is None:
                await self._loop.connect_accepted_socket(lambda: handler, conn)
            else:
                await self._loop.connect_accepted_socket(
                    lambda: handler,
                    conn,
                    ssl=self._ssl,
                    ssl_handshake_timeout=timeout,
                    ssl_shutdown_timeout=timeout,
                )
        except asyncio.CancelledError:
            handler.release()
            conn.close()
            raise
        except Exception:  # a failed or timed-out TLS handshake, a reset
            if self._loop.time() - started >= timeout * 0.9:  # the loops raise ConnectionAbortedError
                self._gate.refuse("tls_handshake", address)
            handler.release()
            conn.close()

    def close(self) -> None:
        """Stop accepting; abort connections still in their TLS handshake."""
        self._closed = True
        for sock in self.sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        for task in list(self._handshakes):
            task.cancel()


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for host:port (every address host resolves to; "" for all)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[Any] = set()
    try:
        for family, kind, proto, _name, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family this host does not have (IPv6 off): skipped, as asyncio does
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # one free port for every address
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(f"cannot listen on {host}:{port}: no usable address")
    return sockets


@web.middleware
async def _mark_headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    protocol = request.protocol
    if isinstance(protocol, GuardedRequestHandler):
        protocol.headers_seen()
    return await handler(request)


class GuardedRunner(web.AppRunner):
    """An AppRunner whose clean-up also stops the GuardedListener (and its TLS handshakes in flight)."""

    listener: GuardedListener | None = None

    async def cleanup(self) -> None:
        """Stop listening, abort handshakes in flight, close the connections aiohttp serves."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        await super().cleanup()


async def serve_app(
    app: web.Application,
    host: str,
    port: int,
    limits: HttpLimits,
    *,
    ssl_context: ssl.SSLContext | None = None,
    shutdown_timeout: float = 60.0,
    registry: CollectorRegistry | None = None,
) -> tuple[GuardedRunner, int]:
    """Serve `app` on host:port under `limits`; the runner (clean it up to stop) and the bound port."""
    app.middlewares.append(_mark_headers)
    runner = GuardedRunner(app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    server = runner.server
    assert server is not None
    gate = ConnectionGate(limits, registry)
    loop = asyncio.get_running_loop()

    def factory(address: str) -> GuardedRequestHandler:
        return GuardedRequestHandler(
            server, gate=gate, address=address, loop=loop, access_log=None, keepalive_timeout=limits.idle_timeout
        )

    try:
        sockets = listening_sockets(host, port)
    except BaseException:
        await runner.cleanup()
        raise
    runner.listener = GuardedListener(sockets, gate, factory, ssl_context)
    runner.listener.start()
    return runner, int(sockets[0].getsockname()[1])
