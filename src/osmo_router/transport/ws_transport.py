"""The WebSocket transport: the old router's protocol (wsproto) behind the SessionStream interface.

One WebSocket per session (as the old router had it), opened with aiohttp. What the old protocol
cannot carry is lost exactly as it was with the old router: signals are not delivered, and stdin
EOF in pipe mode is the empty message. The client asks for the exit status with the `exit=1`
extension (without it a clean end counts as exit 0), and offers wsproto.STDERR_SUBPROTOCOL for stderr
apart from stdout (text messages); where the router does not select it (OSMO's), stderr arrives
merged into stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterable
from urllib.parse import urlsplit

import aiohttp
import grpc

from osmo_router.dial.config import DialConfig
from osmo_router.dial.proxy import Proxy, ProxyError, proxy_for
from osmo_router.transport import WS, SessionInit, SessionStream
from osmo_router.transport.ws_dial import client_session
from osmo_router.wire.codec import decode_data_message
from osmo_router.wire.errors import (
    InvalidArgument,
    PermissionDenied,
    RouterError,
    Unauthenticated,
    Unavailable,
)
from osmo_router.wire.keys import new_session_key
from osmo_router.wire.protocol import MAX_MESSAGE_SIZE, pb
from osmo_router.wire.wsproto import (
    CLOSE_ERROR,
    CLOSE_NORMAL,
    ERROR_HEADER,
    MAX_REQUEST_TARGET,
    STDERR_SUBPROTOCOL,
    base_url,
    client_protocols,
    client_query,
    datagram_frame,
    datagram_message,
    error_from_reason,
    error_reason,
    exit_from_reason,
    exit_reason,
    frame_to_message,
    message_to_frame,
    session_url,
    size_message,
    stderr_frame,
    stderr_messages,
)

log = logging.getLogger(__name__)

#: Keep idle sessions alive through load balancers, as the gRPC keepalive does.
HEARTBEAT = 20.0
_HANDSHAKE_ERRORS: dict[int, type[RouterError]] = {
    400: InvalidArgument,
    401: Unauthenticated,
    403: PermissionDenied,
    503: Unavailable,
}


def client_ssl_context(dial: DialConfig) -> ssl.SSLContext | None:
    """TLS for wss://, verified like the gRPC channel (system store or --tls-ca, optional client cert)."""
    if not dial.tls:
        return None
    context = ssl.create_default_context(cafile=dial.tls_ca)
    if dial.tls_cert and dial.tls_key:
        context.load_cert_chain(dial.tls_cert, dial.tls_key)
    return context


def auth_headers(dial: DialConfig) -> dict[str, str]:
    """The bearer token and the load-balancer cookie, as the old router's clients sent them."""
    headers: dict[str, str] = {}
    if token := dial.current_token():
        headers["Authorization"] = f"Bearer {token}"
    if dial.cookie:
        headers["Cookie"] = dial.cookie
    return headers


async def connect(
    session: aiohttp.ClientSession, url: str, dial: DialConfig, timeout: float, protocols: tuple[str, ...] = ()
) -> aiohttp.ClientWebSocketResponse:
    """Open one WebSocket, offering `protocols`; handshake refusals become the matching RouterError.

    `session` comes from ws_dial.client_session: through the HTTP proxy the environment names for the
    router's host (chosen as for the gRPC channel, dial/proxy.py) it opens a CONNECT tunnel, for ws://
    as for wss:// (RFC 6455 section 4.1), and runs the WebSocket (and TLS) inside it.
    """
    try:
        proxy = proxy_for(urlsplit(url).hostname or "")
    except ValueError as err:
        raise Unavailable(str(err)) from None
    try:
        return await session.ws_connect(
            url,
            headers=auth_headers(dial),
            heartbeat=HEARTBEAT,
            max_msg_size=MAX_MESSAGE_SIZE,
            ssl=client_ssl_context(dial) or True,
            server_hostname=dial.tls_server_name,
            timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
            compress=0,
            protocols=protocols,
        )
    except aiohttp.WSServerHandshakeError as err:
        # The router names the cause in a header (`CODE: message`); another server only gives a status.
        error = error_from_reason(err.headers.get(ERROR_HEADER, "") if err.headers else "")
        if type(error) is RouterError:
            error = _HANDSHAKE_ERRORS.get(err.status, Unavailable)(_refusal(err, proxy))
        raise error from None
    except (aiohttp.ClientError, OSError, TimeoutError) as err:
        base = url.split("/api/")[0]
        cause = err.os_error if isinstance(err, aiohttp.ClientConnectorError) else err
        if isinstance(cause, ProxyError):
            if not cause.target_unreachable:  # the proxy itself (down, wants credentials): as the gRPC dial says
                raise Unavailable(str(cause)) from None
            raise PortUnreachable(base, str(cause)) from None
        via = f" (through the proxy {proxy.address})" if proxy else ""
        raise PortUnreachable(base, f"{err}{via}") from None


def _refusal(err: aiohttp.WSServerHandshakeError, proxy: Proxy | None) -> str:
    """What a handshake refused without the router's own reason says."""
    if proxy is None:
        return f"the router refused the WebSocket: {err.message}"
    # Inside a CONNECT tunnel the answer is the router's, or a TLS-terminating middlebox's.
    return f"the router behind the proxy {proxy.address} refused the WebSocket: {err.status} {err.message}"


class PortUnreachable(Unavailable):
    """No WebSocket could be opened to the router's port (refused, timed out, TLS failed)."""

    def __init__(self, base: str, reason: str) -> None:
        super().__init__(f"cannot reach the router's WebSocket port ({base}): {reason}")
        self.base = base
        self.reason = reason


class WsSessionStream:
    """Frames over one old-protocol WebSocket, as the client (`backend=False`) or as the backend."""

    #: The old protocol carries no signals (client/exec.py ends a session itself where it would send one).
    carries_signals = False

    def __init__(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        *,
        operation: int,
        backend: bool,
        parse_resize: bool = False,
        udp: bool = False,
        split_stderr: bool = False,
    ) -> None:
        """`udp`: a UDP forward, each message one datagram behind OSMO's 6-byte sender header (wsproto);
        `split_stderr`: the router selected STDERR_SUBPROTOCOL, so stderr travels as text messages."""
        self.ws = ws
        self._udp = udp
        self._split_stderr = split_stderr
        self._is_exec = operation == pb.OPERATION_EXEC
        self._backend = backend
        self._parse_resize = parse_resize
        self._write_lock = asyncio.Lock()
        self._ended = False
        self._exit: pb.ExitStatus | None = None
        self._error: str | None = None
        self._half_closed = False
        self.closed_for_writing = False
        #: Our close has begun (aclose): recv reads no further (see recv).
        self._closing = False
        self._abort: asyncio.Task[None] | None = None

    async def send(self, frame: pb.Frame) -> None:
        """Send one frame in its old form; what the old protocol cannot carry is dropped."""
        if frame.WhichOneof("kind") == "exit_status":
            self._exit = frame.exit_status  # a backend reports it as its close reason
            return
        if frame.WhichOneof("kind") == "half_close":
            if self._half_closed:
                return
            self._half_closed = True
            payload: bytes | None = b""  # EOF of this direction, both ways
        elif frame.WhichOneof("kind") == "datagram" and self._udp:
            payload = datagram_message(frame.datagram)
        elif frame.WhichOneof("kind") == "stderr" and self._split_stderr:
            await self._send_texts(stderr_messages(frame.stderr))
            return
        else:
            payload = frame_to_message(frame, to_backend=not self._backend)
        if payload is None:
            return
        async with self._write_lock:
            if self.closed_for_writing or self.ws.closed:
                return
            with contextlib.suppress(ConnectionError):
                await self.ws.send_bytes(payload)

    async def _send_texts(self, texts: Iterable[str]) -> None:
        async with self._write_lock:
            for text in texts:
                if self.closed_for_writing or self.ws.closed:
                    return
                with contextlib.suppress(ConnectionError):
                    await self.ws.send_str(text)

    @property
    def raw(self) -> bool:
        """False: data goes as WebSocket messages, never as pre-encoded frame messages."""
        return False

    async def send_data_message(self, message: bytes) -> None:
        """Send a pre-encoded data-frame message's payload (callers check `raw` and rarely get here)."""
        payload = decode_data_message(message)
        if payload is None:
            raise InvalidArgument("not a data-frame message")
        await self.send_data(bytes(payload))

    def abort(self) -> None:
        """Start closing the WebSocket at once, from synchronous code too."""
        if self._abort is None:
            self._abort = asyncio.get_running_loop().create_task(self.aclose())

    async def send_data(self, payload: bytes) -> None:
        """Send a data frame."""
        await self.send(pb.Frame(data=payload))

    async def send_error(self, code: grpc.StatusCode, message: str) -> None:
        """A backend reports an error as the reason of its close (code 4000, as the router does)."""
        if self._backend:
            self._error = error_reason(code, message)
        else:
            log.info("session error (a client has no way to report it over WebSocket): %s: %s", code.name, message)

    async def recv(self) -> pb.Frame | None:
        """The next frame; the router's close becomes the exit status (client), or the end."""
        if self._ended:
            return None
        while True:
            if self._closing:
                # Our own close is under way. aiohttp's receive() on a closing WebSocket closes it itself,
                # with code 1000 and no reason, and that close goes first when a message was already
                # queued ahead of our close's wake-up (client_ws.py, receive and close): a backend's
                # exit status, its close reason, was lost, and the router reported exit 0.
                self._ended = True
                return None
            msg = await self.ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                if self._udp:
                    return datagram_frame(msg.data)
                return message_to_frame(msg.data, parse_resize=self._parse_resize)
            if msg.type == aiohttp.WSMsgType.TEXT:
                if self._split_stderr:
                    return stderr_frame(str(msg.data))
                return message_to_frame(str(msg.data).encode(), parse_resize=self._parse_resize)
            if msg.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG):
                continue
            self._ended = True
            return self._end(msg)

    def _end(self, msg: aiohttp.WSMessage) -> pb.Frame | None:
        reason = str(msg.extra or "") if msg.type == aiohttp.WSMsgType.CLOSE else ""
        if self._backend:
            return None
        if self.ws.close_code == CLOSE_ERROR:
            raise error_from_reason(reason)
        if msg.type == aiohttp.WSMsgType.ERROR or self.ws.close_code is None:
            raise Unavailable(f"the WebSocket to the router broke: {self.ws.exception() or 'connection lost'}")
        status = exit_from_reason(reason)
        if status is None and self._is_exec:
            status = pb.ExitStatus(code=0)  # an old backend: the old protocol has no exit codes
        return pb.Frame(exit_status=status) if status is not None else None

    async def close(self) -> None:
        """End this side, as FrameStream.close does on gRPC.

        A client only half-closes (the empty message; the agent's output keeps coming until the
        router closes). A backend ends its stream: the WebSocket's close, whose reason carries the
        exit status or the error (the router ends the session then, as for a gRPC agent).
        """
        if not self._backend:
            await self.send(pb.Frame(half_close=pb.HalfClose()))
            self.closed_for_writing = True
            return
        await self.aclose()

    async def aclose(self) -> None:
        """Close the WebSocket now (a backend with its exit status or error as the close reason)."""
        self._closing = True
        async with self._write_lock:
            self.closed_for_writing = True
        code, reason = CLOSE_NORMAL, ""
        if self._backend and self._error is not None:
            code, reason = CLOSE_ERROR, self._error
        elif self._backend and self._exit is not None:
            reason = exit_reason(self._exit)
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, message=reason.encode())


class WsTransport:
    """Sessions as old-protocol WebSockets to the router's --ws-port."""

    name = WS

    def __init__(
        self, dial: DialConfig, ws_address: str, *, connect_timeout: float = 20.0, fallback_from: str | None = None
    ) -> None:
        self._dial = dial
        self.base = base_url(ws_address, dial.tls)
        self._timeout = connect_timeout
        #: The gRPC address this transport stands in for (transport/rollout.py's fallback), if any.
        self._fallback_from = fallback_from
        self._session: aiohttp.ClientSession | None = None

    async def open(self, operation: int, init: SessionInit) -> SessionStream:
        """Connect `/client/{key}` (the orchestrator's key, or a fresh one) and send the exec size."""
        if self._session is None:
            self._session = client_session(self._timeout)
        if isinstance(init, pb.PortForwardInit) and init.protocol == pb.PROTOCOL_UDP:
            raise InvalidArgument("UDP port-forward is not carried over WebSocket; use --transport grpc")
        key = init.target.session_key or new_session_key()  # typed by users later: `attach KEY`
        url = session_url(
            self.base, operation, init.target.workflow_id, "client", key, client_query(init, want_exit=True)
        )
        if (length := len(url) - len(self.base)) > MAX_REQUEST_TARGET:
            # The router would answer 400 to a request line it cannot read: say why, before dialling.
            raise InvalidArgument(
                f"the command and its environment are too long for the WebSocket transport ({length} bytes "
                f"of URL, at most {MAX_REQUEST_TARGET}): use the gRPC transport (--transport grpc)"
            )
        try:
            ws = await connect(self._session, url, self._dial, self._timeout, client_protocols(init))
        except PortUnreachable as err:
            if self._fallback_from is None:
                raise
            from osmo_router.transport.rollout import neither_port

            raise Unavailable(neither_port(self._fallback_from, err.base, err.reason)) from None
        if isinstance(init, pb.ExecInit):
            await ws.send_bytes(size_message(init.size.rows, init.size.cols))
        split_stderr = ws.protocol == STDERR_SUBPROTOCOL  # selected: the router sends stderr as text
        return WsSessionStream(ws, operation=operation, backend=False, split_stderr=split_stderr)

    async def aclose(self) -> None:
        """Close the HTTP session (and with it every WebSocket still open)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
