"""The container's side of a session over the old WebSocket protocol (an old agent, or `agent --transport ws`).

The translation between the old protocol and our frames, both ways, is described in ws/sides.py;
this module holds the backend's half of it: what a backend's messages and close stand for, and the
client's frames in the form an old backend takes.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import WSMsgType, web

from osmo_router.router.ws.sides import WsSide, received_payload
from osmo_router.wire.codec import ENCODED_HALF_CLOSE, decode_frame, encode_frame
from osmo_router.wire.errors import InvalidArgument, RouterError, Unavailable
from osmo_router.wire.ops import Operation, operation_of
from osmo_router.wire.protocol import MAX_MESSAGE_SIZE, pb
from osmo_router.wire.wsproto import (
    CLOSE_ERROR,
    CLOSE_NORMAL,
    STDERR_SUBPROTOCOL,
    datagram_frame,
    datagram_message,
    error_from_reason,
    exit_from_reason,
    frame_to_message,
    size_message,
    stderr_frame,
)


class WsBackendSide(WsSide):
    """The container's side of a session over the old protocol (an old agent, or `agent --transport ws`).

    Its upgrade waits until the session is joined (`accept`): once a backend's handshake is done, a
    client finds it. For exec, the first message it gets is the client's own first message
    (`first_messages`, by session key, when the client came over WebSocket) or a size message.
    """

    def __init__(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        operation: Operation | None,
        *,
        key: str,
        send_init: bool,
        first_messages: Mapping[str, bytes],
        max_message: int = MAX_MESSAGE_SIZE,
    ) -> None:
        super().__init__(request, ws, max_message=max_message)
        self._operation = operation
        self._is_exec = operation is not None and operation.value == pb.OPERATION_EXEC
        self._key = key
        self._send_init = send_init
        self._first_messages = first_messages
        self._half_closed = False
        self._pending: list[bytes | None] = []
        #: A UDP forward: datagrams go as OSMO's messages (6-byte sender header), both ways.
        self._udp = False

    async def send_first(self, message: bytes) -> None:
        """The SessionOpen in the old form: nothing, the exec size message, or (`init=1`) the whole open."""
        open_msg = pb.ConnectResponse.FromString(message).open
        if self._operation is None or not _serves(self._operation.value, open_msg):
            raise InvalidArgument("the session is of another operation than this backend serves")
        self._udp = open_msg.WhichOneof("init") == "port_forward" and open_msg.port_forward.protocol == pb.PROTOCOL_UDP
        if self._send_init:  # the `init=1` extension: the whole SessionOpen, for a new backend
            await self._send(open_msg.SerializeToString())
        elif self._is_exec:
            first = self._first_messages.get(self._key)
            await self._send(first or size_message(open_msg.exec.size.rows, open_msg.exec.size.cols))

    async def read(self) -> bytes | None:
        """The backend's next message as an encoded frame; its end becomes a clean half-close."""
        while not self._pending:
            msg = await self._next_message()
            if msg is not None and msg.type == WSMsgType.TEXT and self.ws.ws_protocol == STDERR_SUBPROTOCOL:
                return encode_frame(stderr_frame(str(msg.data)))
            data = None if msg is None else received_payload(msg)
            if msg is not None and msg.type in (WSMsgType.CLOSED, WSMsgType.ERROR) and self._send_init:
                # A new backend always ends with a close frame (its exit status or error as the reason):
                # a connection lost without one is a backend killed or cut off, as a gRPC agent's stream
                # ending without its half-close is (core/relay.py). An old one ends every exec this way.
                raise Unavailable("the backend disconnected")
            if isinstance(data, bytes):
                if data:
                    return encode_frame(datagram_frame(data) if self._udp else pb.Frame(data=data))
                if not self._half_closed:  # the empty message: EOF of the backend's output
                    self._half_closed = True
                    return ENCODED_HALF_CLOSE
                continue
            self._pending.extend(self._ending(data))
        return self._pending.pop(0)

    def _ending(self, reason: str | None) -> list[bytes | None]:
        """The frames the backend's close stands for, then the end of its stream.

        The old protocol has no exit codes: a clean end of an exec backend is exit 0, unless its
        close reason carries one (the `exit` extension of new backends); a new backend reports an
        error as the router does, with code 4000 and `CODE: message`. A new backend's exec that ends
        without an exit status gets none (the client then says the session ended without one, as
        for a gRPC agent): exit 0 there would report a failed session as a success.
        """
        out: list[bytes | None] = []
        status = exit_from_reason(reason) if reason is not None else None
        if reason is not None and self.ws.close_code == CLOSE_ERROR:
            err = error_from_reason(reason)
            out.append(encode_frame(pb.Frame(error=pb.Error(code=err.code.value[0], message=err.message))))
        elif self._is_exec and not self._send_init:
            out.append(encode_frame(pb.Frame(exit_status=status or pb.ExitStatus(code=0))))
        elif status is not None:
            out.append(encode_frame(pb.Frame(exit_status=status)))
        if not self._half_closed:
            self._half_closed = True
            out.append(ENCODED_HALF_CLOSE)
        out.append(None)
        return out

    async def write(self, message: bytes) -> None:
        """Deliver the client's encoded frame to the backend in the old form."""
        frame = decode_frame(message)
        if frame.WhichOneof("kind") == "resize" and not self._is_exec:
            return
        if frame.WhichOneof("kind") == "datagram" and self._udp and not self.ws.closed:
            await self._send(datagram_message(frame.datagram))
            return
        if frame.WhichOneof("kind") == "half_close" and not (self._send_init or self._is_exec or self._udp):
            # osmo-ctrl's connection takes no half-close (an empty message is a zero-byte write) and
            # closes both its ends when one direction ends; the old router ended the whole pipe on the
            # client's end, after all it had relayed. So the client's EOF is a normal close, behind the data.
            if not self.ws.closed:
                await self._close_ws(CLOSE_NORMAL, "")
            return
        if (payload := frame_to_message(frame, to_backend=True)) is not None and not self.ws.closed:
            await self._send(payload)

    def _broken(self, err: Exception) -> RouterError:
        return Unavailable(f"the backend's WebSocket broke: {err}")


def _serves(backend_operation: int, open_msg: pb.SessionOpen) -> bool:
    """Whether a backend of `backend_operation` may serve the session `open_msg` opens.

    The same operation, or OSMO's rsync: its CLI opens each rsync connection at `rsync/.../client/K`
    and its backend dials `portforward/.../backend/K` (rsync's daemon protocol through a forward), and
    the old router paired them on the key alone. Only an old client's rsync session (no server
    arguments: its URL carries none) pairs so; a new client's never reaches a forward.
    """
    operation = operation_of(open_msg)
    if operation == backend_operation:
        return True
    legacy_rsync = operation == pb.OPERATION_RSYNC and not open_msg.rsync.server_args
    return legacy_rsync and backend_operation == pb.OPERATION_PORT_FORWARD
