"""The user's side of a session over the old WebSocket protocol (the module docstring of ws/sides.py says
what the old protocol cannot carry and how each case is translated)."""

from __future__ import annotations

import grpc
from aiohttp import web

from osmo_router.router.core.sessions import RendezvousTimeout
from osmo_router.router.ws.sides import WsSide
from osmo_router.wire.codec import ENCODED_HALF_CLOSE, ENCODED_SESSION_END, decode_frame, encode_frame
from osmo_router.wire.errors import Cancelled, RouterError
from osmo_router.wire.protocol import MAX_MESSAGE_SIZE, pb
from osmo_router.wire.wsproto import (
    CLOSE_ERROR,
    CLOSE_NORMAL,
    STDERR_SUBPROTOCOL,
    datagram_frame,
    datagram_message,
    error_reason,
    exit_reason,
    frame_to_message,
    message_to_frame,
    stderr_messages,
)


class WsClientSide(WsSide):
    """The user's side of a session over the old protocol."""

    # OSMO's CLI (websockets) reports a close whose handshake it could not finish as a failure. Its
    # reader's stopped receive ends the read as our own close does (read() returns None).
    waits_for_close_frame = True

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, *, max_message: int = MAX_MESSAGE_SIZE) -> None:
        super().__init__(request, ws, max_message=max_message)
        self._parse_resize = self._want_exit = self._want_eof = self._udp = False
        self._old_stream = self._ended = False
        self._exit: pb.ExitStatus | None = None

    def set_extensions(
        self, *, parse_resize: bool, want_exit: bool, want_eof: bool, udp: bool = False, stream: bool = False
    ) -> None:
        """What the client's URL asked for (see ws/init.py); `udp`: OSMO's datagram framing (a created UDP
        forward); `stream`: a byte stream (a TCP forward's or an rsync connection), not an exec."""
        self._parse_resize, self._want_exit, self._want_eof = parse_resize, want_exit, want_eof
        self._udp = udp
        # An old client's stream (OSMO's CLI: no `eof`/`exit` extension) has no half-close either way: it
        # closes its WebSocket at its local EOF, and takes the close for the far end's EOF (1.6).
        self._old_stream = stream and not udp and not (want_eof or want_exit)

    async def read(self) -> bytes | None:
        """The client's next message as an encoded frame; a close (not ours) ends the session."""
        if self._ended:
            return None
        data = await self._receive()
        if isinstance(data, bytes):
            if self._udp:
                return encode_frame(datagram_frame(data))
            return encode_frame(message_to_frame(data, parse_resize=self._parse_resize))
        if self._closing:
            return None
        if self._old_stream and self.ws.close_code == CLOSE_NORMAL:
            # OSMO's CLI closing a connection normally is its local EOF, after all it sent: the old
            # router delivered every message before it closed the backend. So it is a half-close,
            # behind the data, never a break that drops what is still queued for the agent.
            self._ended = True
            return ENCODED_HALF_CLOSE
        # The old protocol: a close ends the whole pipe (an empty message is the EOF).
        raise Cancelled("the client closed its WebSocket")

    async def write(self, message: bytes) -> None:
        """Deliver an encoded frame (or the SessionEnd) to the client in the old form."""
        if self._closing:
            return
        if message == ENCODED_SESSION_END:
            reason = exit_reason(self._exit) if self._want_exit and self._exit is not None else ""
            await self._close_ws(CLOSE_NORMAL, reason)
            return
        frame = decode_frame(message)
        kind = frame.WhichOneof("kind")
        if kind == "exit_status":
            self._exit = frame.exit_status
        elif kind == "error":
            await self._close_ws(CLOSE_ERROR, error_reason(_status_code(frame.error.code), frame.error.message))
        elif kind == "datagram" and self._udp:
            await self._send(datagram_message(frame.datagram))
        elif kind == "stderr" and self.ws.ws_protocol == STDERR_SUBPROTOCOL:
            for text in stderr_messages(frame.stderr):
                await self._send(text)
        elif kind == "half_close":
            if self._want_eof:  # an old client never sees an empty message: the close ends its pipe
                await self._send(b"")
            elif self._old_stream:
                # The far end's EOF: OSMO's CLI has no half-close and ends the connection only on a close
                # (osmo-ctrl closed both when one direction ended); waiting for the session's end
                # would wait for a local EOF that a client reading to the end never sends.
                await self._close_ws(CLOSE_NORMAL, "")
        elif self._ended and kind == "data":
            # OSMO's CLI reads nothing after its local EOF (run_tcp_with_sock closes the WebSocket) and
            # OSMO's router stopped copying to it (router.py run_connect_client): the far end's bytes are
            # dropped. Writing them would fail and break the session, dropping the client's last bytes.
            return
        elif (payload := frame_to_message(frame, to_backend=False)) is not None:
            await self._send(payload)

    async def send_first(self, message: bytes) -> None:
        """The old protocol has no ready message."""

    async def refuse(self, error: RouterError) -> None:
        """As `WsSide.refuse`; but an old client (no `eof`/`exit` extension) whose rendezvous timed out
        is closed with 1000, as the old router closed it (OSMO's CLI takes that for a normal end)."""
        legacy = not (self._want_eof or self._want_exit)
        if legacy and isinstance(error, RendezvousTimeout) and self.ws.prepared:
            await self._close_ws(CLOSE_NORMAL, "")
            return
        await super().refuse(error)

    def _broken(self, err: Exception) -> RouterError:
        return Cancelled(f"the client's WebSocket broke: {err}")


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
