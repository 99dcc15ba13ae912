"""A gRPC server on the h2 transport that hosts grpc handler objects (drop-in for grpc.aio.server).

It subclasses grpc.aio.Server so generated `add_*Servicer_to_server`, grpc health and reflection
register on it as on a grpc.aio server: `add_generic_rpc_handlers`, `add_registered_method_handlers`,
all four cardinalities, serializers or raw bytes. TLS is an `ssl.SSLContext` (`tls_context`) passed
to `add_secure_port` instead of grpc credentials.

Limits, as grpc's channel arguments give them (router/ops/conn_limits.py): `max_connections`
(past it a new connection is closed at once), `address_gate` (connections per peer address: one the
gate refuses is aborted as soon as its address is known, after TLS), per connection `H2Config.max_concurrent_streams`,
`max_connection_idle`, `max_connection_age` (+ grace) and `handshake_timeout` (TLS handshake, then
preface and SETTINGS), the peer's ping rate (`min_ping_interval`) and `max_message_size`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import grpc

from osmo_router.h2 import grpc as g
from osmo_router.h2.calls import Call, Handlers, refuse
from osmo_router.h2.config import H2Config
from osmo_router.h2.connection import Connection
from osmo_router.h2.core import LINGER
from osmo_router.h2.stream import Stream
from osmo_router.io.byte_shares import ByteShares

log = logging.getLogger(__name__)

#: How long a finished call's status may wait behind data its client does not read before a reset.
CLOSE_GRACE = 5.0


class AddressGate(Protocol):
    """Admits connections by peer address (`transport.get_extra_info("peername")`)."""

    def admit(self, peer: Any) -> bool:
        """Count a new connection from `peer`, or refuse it (False)."""
        ...

    def release(self, peer: Any) -> None:
        """A connection `admit` let in ended."""
        ...


class _GatedConnection(Connection):
    """A server connection counted by peer address: refused (aborted) when the gate says so."""

    gate: AddressGate
    admitted = False

    def connection_made(self, transport: Any) -> None:
        peer = transport.get_extra_info("peername")
        if not self.gate.admit(peer):
            transport.abort()
            return
        self.admitted = True
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.admitted:
            self.admitted = False
            self.gate.release(self.peer_address)
        super().connection_lost(exc)


class _Refused(asyncio.Protocol):
    """A connection past the cap: closed at once (the client retries, as with grpc)."""

    def connection_made(self, transport: Any) -> None:
        transport.abort()


def tls_context(cert: str, key: str, client_ca: str | None = None, alpn: str = "h2") -> ssl.SSLContext:
    """A server TLS context with ALPN `alpn`; with `client_ca`, client certificates required and verified."""
    # Not create_default_context: it would also trust the system's CAs for client certificates.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols([alpn])
    if client_ca:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class NativeServer(grpc.aio.Server):  # type: ignore[misc]  # grpc ships no stubs
    """gRPC on osmo_router.h2: no grpc core on the data path."""

    def __init__(
        self,
        config: H2Config,
        max_connections: int = 0,
        close_grace: float = CLOSE_GRACE,
        address_gate: AddressGate | None = None,
    ) -> None:
        self.config = config
        self.max_connections = max_connections
        self.address_gate = address_gate
        self.close_grace = close_grace
        self.handlers = Handlers()
        self.connections: set[Connection] = set()
        self.calls: set[Call] = set()
        self._sockets: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        self._servers: list[asyncio.Server] = []
        self._stopping = False
        self._terminated = asyncio.Event()
        #: What streams not yet counted in any byte budget hold, per connection and in all (H2Config).
        self._uncounted = (
            ByteShares(config.max_uncounted_total, config.max_uncounted_per_connection)
            if config.max_uncounted_total and config.max_uncounted_per_connection
            else None
        )

    # -- registration -------------------------------------------------------------------------------------

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Handlers asked, in order, for every method not registered by path."""
        self.handlers.generic.extend(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Any]) -> None:
        """Handlers by method name (newer generated code registers these besides the generic one)."""
        for method, handler in method_handlers.items():
            self.handlers.by_path[f"/{service_name}/{method}"] = handler

    def add_insecure_port(self, address: str) -> int:
        """Bind `address` ("host:port", "[::]:port") now; serve plaintext h2c from start(). The port bound."""
        return self._bind(address, None)

    def add_secure_port(self, address: str, server_credentials: Any) -> int:
        """Bind `address` now; serve TLS with `server_credentials`, an ssl.SSLContext (see tls_context)."""
        if not isinstance(server_credentials, ssl.SSLContext):
            raise TypeError("the native server takes an ssl.SSLContext, not grpc credentials")
        return self._bind(address, server_credentials)

    def _bind(self, address: str, tls: ssl.SSLContext | None) -> int:
        host, _, port_text = address.rpartition(":")
        host = host.strip("[]") or None  # type: ignore[assignment]
        port = int(port_text)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        bound = 0
        families = {info[0] for info in infos}
        for family, kind, proto, _, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and socket.AF_INET in families:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if bound:
                sockaddr = (sockaddr[0], bound, *sockaddr[2:])
            try:
                sock.bind(sockaddr)
            except OSError:
                sock.close()
                if not bound and (family, kind, proto, _, sockaddr) == infos[-1]:
                    raise
                continue
            sock.listen(1024)
            sock.setblocking(False)
            bound = sock.getsockname()[1]
            self._sockets.append((sock, tls))
        if not bound:
            raise OSError(f"cannot bind {address}")
        return bound

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve on every bound port."""
        loop = asyncio.get_running_loop()
        handshake = self.config.handshake_timeout or None
        for sock, tls in self._sockets:
            server = await loop.create_server(
                self._accept, sock=sock, ssl=tls, ssl_handshake_timeout=handshake if tls else None
            )
            self._servers.append(server)

    def _accept(self) -> asyncio.BaseProtocol:
        if self._stopping or (self.max_connections and len(self.connections) >= self.max_connections):
            return _Refused()
        kind = Connection if self.address_gate is None else _GatedConnection
        conn = kind("server", self.config, self._on_stream, self.connections.discard, self._uncounted)
        if isinstance(conn, _GatedConnection) and self.address_gate is not None:
            conn.gate = self.address_gate
        self.connections.add(conn)
        return conn

    async def stop(self, grace: float | None) -> None:
        """Stop accepting; GOAWAY every connection; give running calls `grace` seconds, then cancel them.

        Then every connection closes gracefully: the calls' statuses (queued behind data their clients
        still read) go out, then FIN, and the peer's EOF is awaited (connection.py close). Each step is
        bounded, so a peer that does not read holds the stop for at most about close_grace + LINGER
        seconds (1 + LINGER with `grace` 0) before it is cut off.
        """
        self._stopping = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.goaway()
        if grace and self.calls:
            await asyncio.wait([c.task for c in self.calls], timeout=grace)
        for call in list(self.calls):
            call.cancel()  # a running handler ends with UNAVAILABLE; a status going out is left to finish
        if self.calls:
            flush = self.close_grace if grace else min(1.0, self.close_grace)
            await asyncio.wait([c.task for c in self.calls], timeout=flush)
        await self._close_connections()
        for server in self._servers:
            await server.wait_closed()
        self._terminated.set()

    async def _close_connections(self) -> None:
        """Close every connection gracefully (what is queued, FIN, the peer's EOF); abort what is left after
        LINGER: a process that exits with bytes unsent or unread loses them (the kernel sends RST)."""
        for conn in list(self.connections):
            conn.close()
        if self.connections:
            closing = [asyncio.ensure_future(conn.wait_closed()) for conn in self.connections]
            await asyncio.wait(closing, timeout=LINGER + 0.5)
            for waiter in closing:
                waiter.cancel()
        for conn in list(self.connections):
            conn.abort()

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Until stop() finished (True) or `timeout` passed (False)."""
        try:
            async with asyncio.timeout(timeout):
                await self._terminated.wait()
        except TimeoutError:
            return False
        return True

    # -- calls --------------------------------------------------------------------------------------------

    def _on_stream(self, stream: Stream) -> None:
        # Started once the rest of this read was handled: a stream the peer reset in the same read
        # (HTTP/2 rapid reset) never runs its handler, which is most of what such a flood costs.
        asyncio.get_running_loop().call_soon(self._start_call, stream)

    def _start_call(self, stream: Stream) -> None:
        if stream.reset_code is not None or stream.conn.closed:
            return
        headers = dict(stream.headers or ())
        path = headers.get(":path", "")
        if headers.get(":method") != "POST" or not headers.get("content-type", "").startswith(g.CONTENT_TYPE):
            refuse(stream, g.UNIMPLEMENTED if headers.get(":method") == "POST" else g.INTERNAL, "not a gRPC request")
            return
        encoding = headers.get("grpc-encoding", "identity")
        if encoding != "identity":
            refuse(stream, g.UNIMPLEMENTED, f"message encoding {encoding!r} not supported")
            return
        deadline = None
        if "grpc-timeout" in headers:
            timeout = g.parse_timeout(headers["grpc-timeout"])
            if timeout is None:
                refuse(stream, g.INTERNAL, "malformed grpc-timeout")
                return
            deadline = time.monotonic() + timeout
        handler = self.handlers.lookup(path, g.metadata_of(stream.headers or ()))
        if handler is None:
            refuse(stream, g.UNIMPLEMENTED, "Method not found!")
            return
        call = Call(stream, handler, deadline, _auth_context(stream.conn), self.close_grace)
        self.calls.add(call)
        call.task.add_done_callback(lambda _t: self.calls.discard(call))


def _auth_context(conn: Connection) -> Mapping[str, Iterable[bytes]]:
    """What grpc reports in auth_context: the security type and, with a client certificate, its names."""
    transport = conn.transport
    if transport is None or transport.get_extra_info("sslcontext") is None:
        return {"transport_security_type": [b"insecure"]}
    auth: dict[str, list[bytes]] = {"transport_security_type": [b"ssl"]}
    cert = transport.get_extra_info("peercert")
    if cert:
        names = [value.encode() for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
        if names:
            auth["x509_common_name"] = names
        sans = [
            value.encode() for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "URI", "IP Address")
        ]
        if sans:
            auth["x509_subject_alternative_name"] = sans
    return auth
