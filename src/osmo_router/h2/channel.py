"""A gRPC client channel on the h2 core: grpc.aio's Channel API without grpc's core (issue 18).

    channel = Channel("router:443", ssl=client_ssl_context(ca, cert, key), server_name="router.example")
    stub = pb_grpc.RouterClientServiceStub(channel)          # generated stubs work as they are
    call = fast_method(channel, path, pb.ExecResponse)()      # and so do raw multicallables
    await channel.close(grace=None)

One HTTP/2 connection, dialled on first use and again by the first call after it was lost (or
after the server's GOAWAY), never in the background; the calls on it are `client_calls.Call`s,
raising real `grpc.aio.AioRpcError`s. A connection that cannot be made fails the call UNAVAILABLE
with grpc's wording ("failed to connect to all addresses; last error: ..."), so dial/errors.py
explains it as it does grpc's. Keepalive pings and message limits come from wire/protocol.py.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from typing import Any

import grpc

from osmo_router.h2.client_calls import Call, Deserializer, Serializer, UnaryResponseCall, aio_error, start_requests
from osmo_router.h2.config import H2Config
from osmo_router.h2.connection import Connection, ConnectionClosed
from osmo_router.h2.grpc import encode_metadata, format_timeout
from osmo_router.h2.stream import Headers, Stream

#: Opens a connected socket to (host, port) to dial over, or returns None to dial directly.
Tunnel = Callable[[str, int], Awaitable[socket.socket | None]]

#: Bound on dialling (TCP, TLS, the server's SETTINGS), as grpc's connect deadline.
CONNECT_TIMEOUT = 20.0
USER_AGENT = "osmo-router-h2"
#: How long close() lets the connection close cleanly before it drops it.
CLOSE_WAIT = 1.0


def client_ssl_context(ca: str | None = None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """A TLS client context offering ALPN h2: verified against `ca` (else the system store), with a client cert."""
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2"])
    return context


def split_target(target: str) -> tuple[str, int]:
    """(host, port) of "host:port", "[v6]:port" or "dns:///host:port"; port 443 when none is given."""
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix) :]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or (host.count(":") and not host.startswith("[")):
        return target.strip("[]"), 443
    return host.strip("[]"), int(port)


class _MultiCallable:
    """One method of the channel: calling it makes a call (what grpc.aio's multicallables do)."""

    def __init__(
        self, channel: Channel, path: str, serializer: Serializer | None, deserializer: Deserializer | None
    ) -> None:
        self._channel = channel
        self._path = path
        self._serializer = serializer
        self._deserializer = deserializer

    def _call(self, kind: type[Call], timeout: float | None, metadata: Any) -> Call:
        headers = self._channel.request_headers(self._path, timeout, metadata)
        call = kind(lambda: self._channel.open_stream(headers), self._serializer, self._deserializer, timeout)
        self._channel.track(call)
        return call


class StreamStreamMultiCallable(_MultiCallable, grpc.aio.StreamStreamMultiCallable):  # type: ignore[misc]
    """A bidirectional-streaming method."""

    def __call__(
        self,
        request_iterator: AsyncIterable[Any] | Iterable[Any] | None = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Call:
        call = self._call(Call, timeout, metadata)
        start_requests(call, request_iterator)
        return call


class StreamUnaryMultiCallable(_MultiCallable, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[misc]
    """A client-streaming method: awaiting the call gives the response."""

    def __call__(
        self,
        request_iterator: AsyncIterable[Any] | Iterable[Any] | None = None,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> UnaryResponseCall:
        call = self._call(UnaryResponseCall, timeout, metadata)
        start_requests(call, request_iterator)
        return call


class UnaryStreamMultiCallable(_MultiCallable, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[misc]
    """A server-streaming method."""

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> Call:
        call = self._call(Call, timeout, metadata)
        start_requests(call, [request])
        return call


class UnaryUnaryMultiCallable(_MultiCallable, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[misc]
    """A unary method: awaiting the call gives the response."""

    def __call__(
        self,
        request: Any,
        *,
        timeout: float | None = None,
        metadata: Any = None,
        credentials: Any = None,
        wait_for_ready: bool | None = None,
        compression: Any = None,
    ) -> UnaryResponseCall:
        call = self._call(UnaryResponseCall, timeout, metadata)
        start_requests(call, [request])
        return call


class Channel(grpc.aio.Channel):  # type: ignore[misc]
    """A grpc.aio.Channel on one h2 connection to `target` (see the module docstring)."""

    def __init__(
        self,
        target: str,
        *,
        ssl: ssl.SSLContext | None = None,
        server_name: str | None = None,
        config: H2Config | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        tunnel: Tunnel | None = None,
    ) -> None:
        """`tunnel(host, port)`: a connected socket to dial over (an HTTP CONNECT proxy's), or None to dial directly."""
        self._tunnel = tunnel
        self._target = target
        self._host, self._port = split_target(target)
        self._ssl = ssl
        self._server_name = server_name
        self._config = config or H2Config()
        self._connect_timeout = connect_timeout
        self._authority = server_name or target
        self._scheme = "https" if ssl is not None else "http"
        self._conn: Connection | None = None
        self._dialling: asyncio.Future[Connection] | None = None
        self._calls: set[Call] = set()
        self._closed = False

    # -- calls -------------------------------------------------------------------------------------

    def request_headers(self, path: str, timeout: float | None, metadata: Any) -> Headers:
        """The HEADERS of a call to `path` (metadata: the caller's, e.g. the bearer token)."""
        headers: Headers = [
            (":method", "POST"),
            (":scheme", self._scheme),
            (":path", path),
            (":authority", self._authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", USER_AGENT),
        ]
        if timeout is not None:
            headers.append(("grpc-timeout", format_timeout(timeout)))
        if metadata:
            headers.extend(encode_metadata(tuple(metadata)))
        return headers

    def track(self, call: Call) -> None:
        """Hold `call` until it ends (close cancels what is still running)."""
        self._calls.add(call)
        call.add_done_callback(self._calls.discard)

    async def open_stream(self, headers: Headers) -> Stream:
        """A new stream on the connection (dialled if there is none); AioRpcError UNAVAILABLE if none can be."""
        for _attempt in range(2):
            conn = await self._connection()
            try:
                return await conn.open_stream(headers)
            except ConnectionClosed:
                # The connection went away between the dial and now (GOAWAY, lost): once more on a new one.
                if self._conn is conn:
                    self._conn = None
        raise aio_error(grpc.StatusCode.UNAVAILABLE, "Socket closed")

    async def _connection(self) -> Connection:
        if self._closed:
            raise aio_error(grpc.StatusCode.CANCELLED, "the channel is closed")
        conn = self._conn
        if conn is not None and not conn.closed:
            return conn
        if self._dialling is None or self._dialling.done():
            self._dialling = asyncio.ensure_future(self._dial())
            self._dialling.add_done_callback(_retrieve)
        return await asyncio.shield(self._dialling)

    async def _dial(self) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                tunnel = await self._tunnel(self._host, self._port) if self._tunnel is not None else None
                where = {"sock": tunnel} if tunnel is not None else {"host": self._host, "port": self._port}
                transport, conn = await loop.create_connection(
                    lambda: Connection("client", self._config),
                    ssl=self._ssl,
                    server_hostname=(self._server_name or self._host) if self._ssl is not None else None,
                    **where,
                )
                if self._ssl is not None and transport.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
                    transport.close()
                    raise ConnectionError("Cannot check peer: missing selected ALPN property")
                await conn.ready()
        except ValueError as err:  # a malformed tunnel (proxy) setting
            raise aio_error(grpc.StatusCode.UNAVAILABLE, str(err)) from None
        except (OSError, ConnectionClosed, TimeoutError) as err:
            raise aio_error(
                grpc.StatusCode.UNAVAILABLE,
                f"failed to connect to all addresses; last error: UNAVAILABLE: {self._target}: {_describe(err)}",
            ) from None
        self._conn = conn
        return conn

    # -- grpc.aio.Channel ------------------------------------------------------------------------------

    def stream_stream(
        self,
        method: str,
        request_serializer: Serializer | None = None,
        response_deserializer: Deserializer | None = None,
        _registered_method: bool | None = False,
    ) -> StreamStreamMultiCallable:
        """A bidirectional-streaming method (as generated stubs and wire.codec.fast_method ask for)."""
        return StreamStreamMultiCallable(self, method, request_serializer, response_deserializer)

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer | None = None,
        response_deserializer: Deserializer | None = None,
        _registered_method: bool | None = False,
    ) -> StreamUnaryMultiCallable:
        """A client-streaming method."""
        return StreamUnaryMultiCallable(self, method, request_serializer, response_deserializer)

    def unary_stream(
        self,
        method: str,
        request_serializer: Serializer | None = None,
        response_deserializer: Deserializer | None = None,
        _registered_method: bool | None = False,
    ) -> UnaryStreamMultiCallable:
        """A server-streaming method."""
        return UnaryStreamMultiCallable(self, method, request_serializer, response_deserializer)

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer | None = None,
        response_deserializer: Deserializer | None = None,
        _registered_method: bool | None = False,
    ) -> UnaryUnaryMultiCallable:
        """A unary method."""
        return UnaryUnaryMultiCallable(self, method, request_serializer, response_deserializer)

    async def channel_ready(self) -> None:
        """Until the connection is up (dialling it; raises AioRpcError UNAVAILABLE if it cannot be)."""
        await self._connection()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        """READY with a live connection, else IDLE (CONNECTING while dialling)."""
        if self._conn is not None and not self._conn.closed:
            return grpc.ChannelConnectivity.READY
        if self._dialling is not None and not self._dialling.done():
            return grpc.ChannelConnectivity.CONNECTING
        if try_to_connect and not self._closed:
            self._dialling = asyncio.ensure_future(self._dial())
            self._dialling.add_done_callback(_retrieve)
            return grpc.ChannelConnectivity.CONNECTING
        return grpc.ChannelConnectivity.IDLE

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        """Until the state differs from `last_observed_state` (polled on the connection's events)."""
        while self.get_state() == last_observed_state:
            if self._dialling is not None and not self._dialling.done():
                await asyncio.wait([self._dialling])
            elif self._conn is not None and not self._conn.closed:
                await self._conn.wait_closed()
            else:
                return

    async def close(self, grace: float | None = None) -> None:
        """Cancel the calls still running (after `grace` seconds, if given) and close the connection."""
        self._closed = True
        if grace and self._calls:
            await asyncio.wait([asyncio.ensure_future(c.code()) for c in list(self._calls)], timeout=grace)
        for call in list(self._calls):
            call.cancel()
        if self._dialling is not None and not self._dialling.done():
            self._dialling.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            transport = conn.transport
            if transport is not None and not transport.get_write_buffer_size():
                conn.abort()  # nothing left to send: no need to wait for TLS's close_notify exchange
            else:
                conn.close()
            try:
                # A TLS close waits for the peer's close_notify, which grpc servers do not always send.
                await asyncio.wait_for(conn.wait_closed(), CLOSE_WAIT)
            except TimeoutError:
                conn.abort()
                await conn.wait_closed()

    async def __aenter__(self) -> Channel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close(None)


def _describe(err: BaseException) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "Connection refused"
    if isinstance(err, ConnectionClosed):
        return "Socket closed"
    if isinstance(err, TimeoutError):
        return "Deadline Exceeded"
    if isinstance(err, ssl.SSLError):
        return f"Ssl handshake failed: {err}"
    return str(err) or type(err).__name__


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


__all__ = ["Channel", "client_ssl_context", "split_target"]
