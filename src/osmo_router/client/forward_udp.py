"""A forwarded UDP port on the client: one local socket, one PortForward stream of Datagram frames.

Each datagram carries its local sender as `peer`; replies name the same peer and are sent back to
it, so many local senders share the forward. If the stream ends, the next datagram reopens it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

import grpc

from osmo_router.client.forward_events import Reporter, SessionOpener, host_port
from osmo_router.client.session import rpc_error
from osmo_router.io.datagram_queue import DatagramQueue
from osmo_router.io.forwarding import UDP_QUEUE_BYTES, UDP_QUEUE_DEPTH, format_peer, parse_peer, send_datagram
from osmo_router.transport import SessionStream
from osmo_router.wire.errors import RouterError, from_status_number
from osmo_router.wire.protocol import CLOSE_GRACE, half_close_frame, pb

log = logging.getLogger(__name__)

#: Shortest pause between two attempts to reopen a broken UDP session.
REOPEN_PAUSE = 1.0


class _Listener(asyncio.DatagramProtocol):
    def __init__(self, forward: UdpForward) -> None:
        self.forward = forward

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.forward.local_datagram(data, format_peer(addr))

    def error_received(self, exc: Exception) -> None:
        log.debug("udp listener: %s", exc)


class UdpForward:
    """One local UDP socket forwarded to a remote UDP port."""

    def __init__(self, remote_port: int, opener: SessionOpener, reporter: Reporter) -> None:
        self.remote_port = remote_port
        self._opener = opener
        self._reporter = reporter
        self._queue: DatagramQueue[tuple[bytes, str]] = DatagramQueue(UDP_QUEUE_DEPTH, UDP_QUEUE_BYTES)
        self._transport: asyncio.DatagramTransport | None = None
        self._stream: SessionStream | None = None
        self.address: tuple[str, int] = ("", 0)
        self._closing = False

    async def start(self, address: str, port: int) -> None:
        """Bind the local socket and open the session; raises OSError or RouterError."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _Listener(self), local_addr=(address, port), family=family
        )
        self._transport = transport
        host, bound = transport.get_extra_info("sockname")[:2]
        self.address = (str(host), int(bound))
        try:
            self._stream = await self._opener.open_stream(pb.PROTOCOL_UDP, self.remote_port)
        except BaseException:
            transport.close()
            raise

    def local_datagram(self, data: bytes, peer: str) -> None:
        """A datagram from a local sender (dropped when the session is far behind, as UDP may)."""
        self._queue.offer((data, peer), len(data))

    @property
    def dropped(self) -> int:
        """Local datagrams dropped because the session was far behind."""
        return self._queue.dropped

    async def serve(self) -> None:
        """Relay until closed; after the session ended, the next datagram reopens it."""
        pending: tuple[bytes, str] | None = None
        while not self._closing:
            if self._stream is None:
                if (pending := await self._queue.get()) is None:
                    return
                try:
                    self._stream = await self._opener.open_stream(pb.PROTOCOL_UDP, self.remote_port)
                except RouterError as err:
                    self._report(err)
                    await asyncio.sleep(REOPEN_PAUSE)
                    continue
            failure = await self._relay(self._stream, pending)
            pending = None
            self._stream = None
            if failure is not None and not self._closing:
                self._report(failure)
                await asyncio.sleep(REOPEN_PAUSE)

    async def close(self, serving: asyncio.Task[None] | None) -> None:
        """Half-close the session and let it end (bounded), then close the socket."""
        self._closing = True
        stream = self._stream
        if stream is not None and serving is not None:
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
                async with asyncio.timeout(CLOSE_GRACE):
                    await stream.send(half_close_frame())
                    await stream.close()
                    await asyncio.wait({serving})
        if serving is not None:
            serving.cancel()
            await asyncio.gather(serving, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()

    def _report(self, err: RouterError) -> None:
        self._reporter.connection_error("udp", host_port(*self.address), self.remote_port, err)

    async def _relay(self, stream: SessionStream, pending: tuple[bytes, str] | None) -> RouterError | None:
        sender = asyncio.create_task(self._send(stream, pending))
        failure: RouterError | None = None
        try:
            while (frame := await stream.recv()) is not None:
                kind = frame.WhichOneof("kind")
                if kind == "datagram":
                    self._reply(frame.datagram)
                elif kind == "error" and failure is None:
                    failure = from_status_number(frame.error.code, frame.error.message)
        except grpc.aio.AioRpcError as err:
            failure = failure or rpc_error(err)
        except RouterError as err:
            failure = failure or err
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        return failure

    def _reply(self, datagram: pb.Datagram) -> None:
        if self._transport is None:
            return
        try:
            send_datagram(self._transport, datagram.payload, parse_peer(datagram.peer))
        except (ValueError, OSError) as err:
            log.debug("udp reply to %r: %s", datagram.peer, err)

    async def _send(self, stream: SessionStream, pending: tuple[bytes, str] | None) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            if pending is not None:
                await stream.send(pb.Frame(datagram=pb.Datagram(payload=pending[0], peer=pending[1])))
            while (item := await self._queue.get()) is not None:
                data, peer = item
                await stream.send(pb.Frame(datagram=pb.Datagram(payload=data, peer=peer)))
