"""Old-protocol WebSockets as the relay's Endpoints: WS messages in and out, encoded frames inside.

The relay, its flow control and its metrics only see encoded frame messages (field 2 = Frame,
the same bytes on every stream), so a WebSocket side meets a gRPC side, or another WebSocket
side, through the same code path. The translation is `wsproto.frame_to_message` and
`wsproto.message_to_frame`; what the old protocol cannot carry is handled here:

- towards a WS client, an exit status is dropped (or, with the `exit=1` extension, becomes the
  reason of the final close), and so is the agent's half-close (or, with `eof=1`, it is the empty
  message); an error frame closes with code 4000 and `CODE: message`;
- from a WS backend, the end of its pipe (empty message or close) is its half-close, and for exec
  it also stands for exit status 0: the old protocol has no exit codes, and its clients took a
  clean end as success.
"""

from __future__ import annotations

import contextlib

import grpc
from aiohttp import WSMsgType, web

from osmo_router.router.core.sessions import Session
from osmo_router.wire.errors import Cancelled, RouterError
from osmo_router.wire.protocol import ENCODED_HALF_CLOSE, ENCODED_SESSION_END, pb
from osmo_router.wire.wsproto import (
    CLOSE_ERROR,
    CLOSE_NORMAL,
    error_from_reason,
    error_reason,
    exit_from_reason,
    exit_reason,
    frame_to_message,
    message_to_frame,
)

#: Message types that end a WebSocket's stream of messages.
_ENDED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


def encode(frame: pb.Frame) -> bytes:
    """A frame as the relay carries it (an encoded message whose field 2 is the frame)."""
    return pb.ConnectRequest(frame=frame).SerializeToString()


def decode(message: bytes) -> pb.Frame:
    """The frame inside an encoded frame message."""
    return pb.ConnectRequest.FromString(message).frame


async def close_with_error(ws: web.WebSocketResponse, error: RouterError) -> None:
    """Close a WebSocket with code 4000 and the error as its reason (bounded by the ws timeout)."""
    with contextlib.suppress(Exception):
        await ws.close(code=CLOSE_ERROR, message=error_reason(error.code, error.message).encode())


async def _receive(ws: web.WebSocketResponse) -> bytes | str | None:
    """The next message's bytes; at the end, the close reason (str), or None if there was none."""
    while True:
        msg = await ws.receive()
        if msg.type == WSMsgType.BINARY:
            data: bytes = msg.data
            return data
        if msg.type == WSMsgType.TEXT:
            return str(msg.data).encode()
        if msg.type == WSMsgType.CLOSE:
            return str(msg.extra or "")
        if msg.type in _ENDED:
            return None


class WsClientEndpoint:
    """The user's side of a session over the old protocol."""

    def __init__(
        self, ws: web.WebSocketResponse, session: Session, *, parse_resize: bool, want_exit: bool, want_eof: bool
    ) -> None:
        self._ws = ws
        self._session = session
        self._parse_resize = parse_resize
        self._want_exit = want_exit
        self._want_eof = want_eof
        self._exit: pb.ExitStatus | None = None
        self._closing = False

    async def read(self) -> bytes | None:
        """The client's next message as an encoded frame; a close (not ours) ends the session."""
        data = await _receive(self._ws)
        if not isinstance(data, bytes):
            if not self._closing:
                # The old protocol: a close ends the whole pipe (an empty message is the EOF).
                self._session.fail(Cancelled("the client closed its WebSocket"))
            return None
        return encode(message_to_frame(data, parse_resize=self._parse_resize))

    async def write(self, message: bytes) -> None:
        """Deliver an encoded frame (or the SessionEnd) to the client in the old form."""
        if self._closing:
            return
        if message == ENCODED_SESSION_END:
            reason = exit_reason(self._exit) if self._want_exit and self._exit is not None else ""
            await self._close(CLOSE_NORMAL, reason)
            return
        frame = decode(message)
        kind = frame.WhichOneof("kind")
        if kind == "exit_status":
            self._exit = frame.exit_status
        elif kind == "error":
            code = _status_code(frame.error.code)
            await self._close(CLOSE_ERROR, error_reason(code, frame.error.message))
        elif kind == "half_close":
            if self._want_eof:  # an old client never sees an empty message: the close ends its pipe
                await self._ws.send_bytes(b"")
        elif (payload := frame_to_message(frame, to_backend=False)) is not None:
            await self._ws.send_bytes(payload)

    async def _close(self, code: int, reason: str) -> None:
        self._closing = True
        await self._ws.close(code=code, message=reason.encode())


class WsBackendEndpoint:
    """The container's side of a session over the old protocol (an old agent, or `agent --transport ws`)."""

    def __init__(self, ws: web.WebSocketResponse, *, operation: int) -> None:
        self._ws = ws
        self._is_exec = operation == pb.OPERATION_EXEC
        self._half_closed = False
        self._pending: list[bytes | None] = []

    async def read(self) -> bytes | None:
        """The backend's next message as an encoded frame; its end becomes a clean half-close."""
        while not self._pending:
            data = await _receive(self._ws)
            if isinstance(data, bytes):
                if data:
                    return encode(pb.Frame(data=data))
                if not self._half_closed:  # the empty message: EOF of the backend's output
                    self._half_closed = True
                    return ENCODED_HALF_CLOSE
                continue
            # The close. The old protocol has no exit codes: a clean end of an exec backend is
            # exit 0, unless its close reason carries one (the `exit` extension of new backends);
            # a new backend reports an error as the router does, with code 4000 and `CODE: message`.
            status = exit_from_reason(data) if isinstance(data, str) else None
            if isinstance(data, str) and self._ws.close_code == CLOSE_ERROR:
                err = error_from_reason(data)
                self._pending.append(encode(pb.Frame(error=pb.Error(code=err.code.value[0], message=err.message))))
            elif self._is_exec:
                self._pending.append(encode(pb.Frame(exit_status=status or pb.ExitStatus(code=0))))
            elif status is not None:
                self._pending.append(encode(pb.Frame(exit_status=status)))
            if not self._half_closed:
                self._half_closed = True
                self._pending.append(ENCODED_HALF_CLOSE)
            self._pending.append(None)
        return self._pending.pop(0)

    async def write(self, message: bytes) -> None:
        """Deliver the client's encoded frame to the backend in the old form."""
        frame = decode(message)
        if frame.WhichOneof("kind") == "resize" and not self._is_exec:
            return
        if (payload := frame_to_message(frame, to_backend=True)) is not None and not self._ws.closed:
            await self._ws.send_bytes(payload)


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN
