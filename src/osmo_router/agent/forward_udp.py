"""A forwarded UDP port on the agent: one connected UDP socket per local peer of the client.

Each Datagram frame names the client-side sender in `peer`; the agent sends it from that peer's
own socket, so the target's reply comes back on that socket and is returned with the same `peer`.
Mappings idle for UDP_IDLE_TIMEOUT are closed by a timer (no polling); at most MAX_PEERS live at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, cast

import grpc

from osmo_router.io.forwarding import UDP_IDLE_TIMEOUT, UDP_QUEUE_DEPTH, drain
from osmo_router.wire.errors import RouterError
from osmo_router.wire.protocol import half_close_frame, pb
from osmo_router.wire.streams import FrameStream

log = logging.getLogger(__name__)

#: Peer mappings (sockets) one UDP forward may hold; the least recently used one goes first.
MAX_PEERS = 1024


class _PeerSocket(asyncio.DatagramProtocol):
    """The socket that speaks to the target on behalf of one client-side peer."""

    def __init__(self, relay: UdpRelay, peer: str) -> None:
        self.relay = relay
        self.peer = peer
        self.transport: asyncio.DatagramTransport | None = None
        self.last_used = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport and arm the idle timer."""
        # (The selector loop's datagram transport does not subclass asyncio.DatagramTransport.)
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._arm(UDP_IDLE_TIMEOUT)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """A reply from the target: back to the client, addressed to this peer."""
        self.last_used = time.monotonic()
        self.relay.reply(self.peer, data)

    def error_received(self, exc: Exception) -> None:
        """ICMP errors (nothing listening): UDP has no delivery guarantee, so only log them."""
        log.debug("udp to the target for %s: %s", self.peer, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the mapping."""
        if self._timer is not None:
            self._timer.cancel()
        self.relay.forget(self)

    def send(self, payload: bytes) -> None:
        """Send one datagram to the target."""
        self.last_used = time.monotonic()
        if self.transport is not None:
            self.transport.sendto(payload)

    def close(self) -> None:
        """Close the socket (connection_lost follows)."""
        if self.transport is not None:
            self.transport.close()

    def _arm(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        idle = time.monotonic() - self.last_used
        if idle >= UDP_IDLE_TIMEOUT:
            log.debug("udp mapping for %s idle for %.0fs: closed", self.peer, idle)
            self.close()
        else:
            self._arm(UDP_IDLE_TIMEOUT - idle)


class UdpRelay:
    """One forwarded UDP port: datagrams from the stream to the target and replies back."""

    def __init__(self, stream: FrameStream, host: str, port: int) -> None:
        self.stream = stream
        self.target = (host, port)
        self._peers: dict[str, _PeerSocket] = {}
        self._replies: asyncio.Queue[pb.Frame | None] = asyncio.Queue(UDP_QUEUE_DEPTH)
        self.dropped = 0

    async def run(self) -> None:
        """Relay until the client half-closes (then end cleanly) or the session breaks."""
        sender = asyncio.create_task(self._send_replies())
        clean = False
        try:
            while (frame := await self.stream.recv()) is not None:
                kind = frame.WhichOneof("kind")
                if kind == "datagram":
                    await self._deliver(frame.datagram)
                elif kind == "half_close":
                    clean = True
                    break
        except (grpc.aio.AioRpcError, RouterError, asyncio.InvalidStateError) as err:
            log.info("udp forward to port %d broke: %s", self.target[1], err)
        finally:
            for peer in list(self._peers.values()):
                peer.close()
            await self._finish_sender(sender, graceful=clean)
        if clean:
            await self.stream.send(half_close_frame())
            await self.stream.close()
            await drain(self.stream)

    async def _finish_sender(self, sender: asyncio.Task[None], *, graceful: bool) -> None:
        """Let queued replies go out (bounded) after a clean end; drop them after a broken one."""
        if graceful:
            with contextlib.suppress(asyncio.QueueFull):
                self._replies.put_nowait(None)
            await asyncio.wait({sender}, timeout=1.0)
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)

    async def _deliver(self, datagram: pb.Datagram) -> None:
        peer = self._peers.get(datagram.peer)
        if peer is None:
            if len(self._peers) >= MAX_PEERS:
                oldest = min(self._peers.values(), key=lambda p: p.last_used)
                self.forget(oldest)
                oldest.close()
            try:
                _, peer = await asyncio.get_running_loop().create_datagram_endpoint(
                    lambda: _PeerSocket(self, datagram.peer), remote_addr=self.target
                )
            except OSError as err:
                log.info("udp socket to %s:%d: %s", *self.target, err)
                return
            self._peers[datagram.peer] = peer
        peer.send(datagram.payload)

    def reply(self, peer: str, payload: bytes) -> None:
        """Queue a reply for the client (dropped if the client is far behind: UDP may drop)."""
        try:
            self._replies.put_nowait(pb.Frame(datagram=pb.Datagram(payload=payload, peer=peer)))
        except asyncio.QueueFull:
            self.dropped += 1

    def forget(self, peer: _PeerSocket) -> None:
        """Remove a closed mapping."""
        if self._peers.get(peer.peer) is peer:
            del self._peers[peer.peer]

    async def _send_replies(self) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while (frame := await self._replies.get()) is not None:
                await self.stream.send(frame)
