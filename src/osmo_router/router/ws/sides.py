"""Old-protocol WebSockets as pipeline Sides: WS messages in and out, encoded frames inside.

The relay, its flow control and its metrics only see encoded frame messages (field 2 = Frame,
the same bytes on every stream), so a WebSocket side meets a gRPC side, or another WebSocket
side, through the same pipeline. The translation is `wsproto.frame_to_message` and
`wsproto.message_to_frame`; what the old protocol cannot carry is handled here (the client's side,
WsClientSide, in ws/client_side.py; the backend's, WsBackendSide, in ws/backend_side.py):

- towards a WS client, stderr is merged into the output, unless the WebSocket's subprotocol is
  wsproto.STDERR_SUBPROTOCOL (then stderr is text messages);
- towards a WS client, the ready is dropped (the old protocol has none), an exit status is dropped
  (or, with the `exit=1` extension, becomes the reason of the final close), and so is the agent's
  half-close (or, with `eof=1`, it is the empty message; on an old client's TCP forward or rsync
  connection, a normal close, as osmo-ctrl ended both ends); an error closes with code 4000 and
  `CODE: message`;
- an old client's normal close of such a connection is its local EOF: a half-close behind the data
  (towards an old backend, a normal close after the data), never a break that drops queued frames;
  what the far end sends after it is dropped (the client reads nothing more);
- from a WS backend, every message is output, unless the WebSocket's subprotocol is
  wsproto.STDERR_SUBPROTOCOL (then its text messages are stderr);
- from a WS backend, the end of its pipe (empty message or close) is its half-close, and for exec
  it also stands for exit status 0: the old protocol has no exit codes, and its clients took a
  clean end as success;
- a refusal before the upgrade is an HTTP status with the cause in a header (WebSocket clients
  see a refused handshake's headers, not its body);
- queued data frames are never merged into one message: the old protocol's messages each mean
  something (a port-forward control message, a datagram).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

from aiohttp import WSMessage, WSMsgType, web

from osmo_router.router.core.budget import ByteBudget
from osmo_router.router.ws.read_budget import READ_AHEAD, PairedReads, reserve, try_reserve, until_peer_closed
from osmo_router.wire.errors import RouterError
from osmo_router.wire.protocol import MAX_MESSAGE_SIZE
from osmo_router.wire.wsproto import (
    CLOSE_ERROR,
    CLOSE_NORMAL,
    ERROR_HEADER,
    MAX_ERROR_HEADER,
    error_reason,
)

#: HTTP status of a refusal before the WebSocket upgrade, by gRPC status name.
HTTP_STATUS = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "INVALID_ARGUMENT": 400, "UNAVAILABLE": 503}


def http_refusal(error: RouterError) -> web.Response:
    """The HTTP answer to a request refused before its upgrade."""
    text = f"{error.code.name}: {error.message}"
    line = "".join(ch if 0x20 <= ord(ch) < 0x7F else " " for ch in text)[:MAX_ERROR_HEADER]
    return web.Response(status=HTTP_STATUS.get(error.code.name, 400), headers={ERROR_HEADER: line}, text=text + "\n")


#: Message types that end a WebSocket's stream of messages.
_ENDED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


#: Most bytes a waiting WebSocket side keeps of what its peer sends before the session is paired
#: (read only to notice the peer leaving); past it the side stops reading, and TCP pushes back.
STASH_LIMIT = 1 << 20
#: What one kept message counts beyond its payload (its WSMessage and list slot; aiohttp's own queue
#: counts 128 too): empty messages are not free, or a flood of them is kept without limit.
STASH_MESSAGE_COST = 128


def received_payload(msg: WSMessage) -> bytes | str | None:
    """A message's bytes; for a close, its reason (str); None for a message that ends the stream without one."""
    if msg.type == WSMsgType.BINARY:
        data: bytes = msg.data
        return data
    if msg.type == WSMsgType.TEXT:
        return str(msg.data).encode()
    if msg.type == WSMsgType.CLOSE:
        return str(msg.extra or "")
    return None


class WsSide:
    """What both WebSocket sides share: the request, its WebSocket, refusals before and after the upgrade."""

    transport = "ws"
    merge_frames = False
    #: Whether a close stops this side's pending receive to wait for the peer's close frame (_close_ws).
    waits_for_close_frame = False

    def __init__(self, request: web.Request, ws: web.WebSocketResponse, *, max_message: int = MAX_MESSAGE_SIZE) -> None:
        """`max_message`: the WebSocket's `max_msg_size` (what a waiting side reserves, see watch_gone)."""
        self.ws = ws
        self._request = request
        self._max_message = max_message
        self._paused = False  # we paused the socket's reading (watch_gone)
        self._refusal: web.Response | None = None
        self.peer = request.remote or "unknown"
        #: What the peer sent while the session waited (see watch_gone), delivered first.
        self._stash: list[WSMessage] = []
        #: The task waiting in ws.receive(), and set once it left (see _close_ws).
        self._receiver: asyncio.Task[Any] | None = None
        self._receiver_left = asyncio.Event()
        self._stop_receiving = False
        self._closing = False  # we are closing the WebSocket: a receive it stops is no end of the peer's
        #: Once paired: what aiohttp may hold behind this side, in the budgets (read_budget.PairedReads).
        self._reads = PairedReads(self.read_reservation)
        self._between_reads = False  # paused after a message, without a reservation (PairedReads)

    def watch_gone(self, budgets: tuple[ByteBudget, ...] = ()) -> Awaitable[None]:
        """Read (and keep) what the peer sends while the session waits, to notice it leaving.

        What is kept counts as held in `budgets` (the user's and the process's) while the session waits,
        and reading stops once one of them is full: 200 waiting sides of one user kept 1 MiB each, 269
        MiB of the router outside every budget. Once paired, the stash is delivered first.

        A side reads only while it holds a reservation of what aiohttp may hold unread behind it (one
        message of `max_message` bytes and its read-ahead, `read_reservation`) in every budget, which it
        keeps until the session pairs or ends (what aiohttp read cannot be known, nor given back before
        it is read). Reservations take at most half of a budget (one always fits). Without room the side
        pauses its socket's reading (the kernel's buffer and TCP push back, not the router's memory) and
        stops aiohttp's heartbeat, whose pong it could not read; it resumes when a reservation is given
        back or when the session pairs. Meanwhile it looks at its TCP connection's state every 0.5 s
        (read_budget.peer_closed): a peer that closed or reset it ends the wait (before, it was noticed
        only when the session paired or its rendezvous timeout, up to an hour, passed). Before the
        reservation: 50 waiting sides of one user sending 4 MiB messages under a 4 MiB budget grew the
        router by 436 MiB (2M + 0.5 MiB each).
        """
        return self._watch_gone(budgets)

    async def _watch_gone(self, budgets: tuple[ByteBudget, ...]) -> None:
        kept = reserved = 0
        try:
            if not try_reserve(budgets, self.read_reservation):
                self._pause_reading()
                if not await until_peer_closed(reserve(budgets, self.read_reservation), self._request.transport):
                    return  # the peer left while we waited for room
                self._resume_reading()
            reserved = self.read_reservation
            while kept < STASH_LIMIT and all(budget.counted - budget.reserved < budget.limit for budget in budgets):
                msg = await self.ws.receive()
                self._stash.append(msg)
                cost = STASH_MESSAGE_COST
                if msg.type in (WSMsgType.BINARY, WSMsgType.TEXT):
                    cost += len(msg.data)
                kept += cost
                for budget in budgets:
                    budget.hold(cost)
                if msg.type in _ENDED:
                    return
            self._pause_reading()  # enough kept: aiohttp holds at most the reservation, TCP pushes back
            await until_peer_closed(asyncio.Event().wait(), self._request.transport)
        finally:  # paired (the stash then goes through the relay's queues) or gone
            self._resume_reading()
            for budget in budgets:
                budget.unhold(kept)
                if reserved:
                    budget.unreserve(reserved)

    def use_budgets(self, budgets: tuple[ByteBudget, ...]) -> None:
        """Paired: count what aiohttp may hold behind this side in `budgets`, the ones its messages are
        queued under (the relay calls this); see read_budget.PairedReads."""
        self._reads.use(budgets)

    @property
    def read_reservation(self) -> int:
        """What a waiting side reserves before it reads: one message and aiohttp's read-ahead."""
        return self._max_message + READ_AHEAD

    def _pause_reading(self) -> None:
        """Stop reading the socket (and aiohttp's heartbeat, whose pong would not be read)."""
        if self._paused or not self._pause_transport():
            return
        self._paused = True
        cancel = getattr(self.ws, "_cancel_heartbeat", None)
        if cancel is not None:  # aiohttp's private API; without it, a paused side may time out
            cancel()

    def _resume_reading(self) -> None:
        """Read the socket again, unless aiohttp paused it too (it resumes once its queue drains)."""
        if not self._paused:
            return
        self._paused = False
        reset = getattr(self.ws, "_reset_heartbeat", None)
        if reset is not None and not self.ws.closed:
            reset()
        self._resume_transport()

    def _pause_transport(self) -> bool:
        """Stop reading the socket; False when there is none (or it is closing)."""
        transport = self._request.transport
        if transport is None or transport.is_closing():
            return False
        transport.pause_reading()
        return True

    def _resume_transport(self) -> None:
        """Read the socket again, unless aiohttp paused it too (it resumes once its queue drains)."""
        transport = self._request.transport
        if transport is None or transport.is_closing():
            return
        protocol = self._request.protocol
        # aiohttp's flow control keeps these flags (base_protocol.py); its resume would not undo ours,
        # nor may ours undo its: its parser then stores all that arrives, unbounded.
        if getattr(protocol, "_reading_paused", False) or getattr(protocol, "_buffer_paused", False):
            return
        transport.resume_reading()

    async def _receive(self) -> bytes | str | None:
        """The next message's bytes; at the end, the close reason (str), or None if there was none."""
        msg = await self._next_message()
        return None if msg is None else received_payload(msg)

    async def _next_message(self) -> WSMessage | None:
        """The next data message or the end (None: stopped by our own close, _close_ws)."""
        while True:
            msg = self._stash.pop(0) if self._stash else await self._receive_ws()
            if msg is None or msg.type in (WSMsgType.BINARY, WSMsgType.TEXT, WSMsgType.CLOSE) or msg.type in _ENDED:
                return msg

    async def _receive_ws(self) -> WSMessage | None:
        task = self._receiver = asyncio.current_task()
        self._receiver_left.clear()
        bounded = not self._reads.free()
        if self._between_reads:  # the relay reads again: so may aiohttp
            self._between_reads = False
            self._reads.unhold_paused()
            self._resume_transport()
        try:
            return await self.ws.receive()
        except asyncio.CancelledError:
            if not self._stop_receiving or task is None or task.uncancel() > 0:
                raise  # (a cancellation of the reader besides our own close's)
            return None  # our own close stopped it
        finally:
            self._receiver = None
            self._receiver_left.set()
            if bounded and self._reads.active and not self._closing and self._pause_transport():
                self._between_reads = True  # no reservation: aiohttp reads no further until the relay does
                self._reads.hold_paused()

    async def _close_ws(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Close the WebSocket, waiting (aiohttp's timeout) for the peer's close frame before the
        connection (RFC 6455 7.1.1). aiohttp waits only if no other task is in receive(): else it closes
        the connection at once, and a peer that answers a moment late finds it gone (OSMO's CLI then
        reports the close handshake as failed). So a pending receive is stopped first."""
        self._closing = True
        self._release_reads()
        receiver = self._receiver
        if self.waits_for_close_frame and receiver is not None and receiver is not asyncio.current_task():
            self._stop_receiving = True
            receiver.cancel()
            await self._receiver_left.wait()
        with contextlib.suppress(Exception):
            await self.ws.close(code=code, message=reason.encode())

    @property
    def response(self) -> web.StreamResponse:
        """What the aiohttp handler returns: the refusal before the upgrade, else the WebSocket."""
        return self._refusal if self._refusal is not None else self.ws

    async def accept(self) -> None:
        """Upgrade to a WebSocket (a no-op once done)."""
        if not self.ws.prepared:
            await self.ws.prepare(self._request)

    async def refuse(self, error: RouterError) -> None:
        """Before the upgrade an HTTP status; after it, close code 4000 with `CODE: message`."""
        self._release_reads()
        if self.ws.prepared:
            await self._close_ws(CLOSE_ERROR, error_reason(error.code, error.message))
        else:
            self._refusal = http_refusal(error)

    def _release_reads(self) -> None:
        """The session is over: give back what its reads held in the budgets, and read to the end."""
        self._reads.release()
        if self._between_reads:
            self._between_reads = False
            self._resume_transport()

    async def finish(self) -> None:
        """Close the WebSocket normally if it is still open."""
        self._release_reads()
        if self.ws.prepared and not self.ws.closed:
            await self._close_ws()

    async def _send(self, payload: bytes | str) -> None:
        """One message: binary, or text for a str (stderr under STDERR_SUBPROTOCOL)."""
        try:
            await (self.ws.send_str(payload) if isinstance(payload, str) else self.ws.send_bytes(payload))
        except (ConnectionError, RuntimeError) as err:
            raise self._broken(err) from None

    def _broken(self, err: Exception) -> RouterError:
        raise NotImplementedError
