"""Forwarded TCP on the client: each accepted connection gets its own PortForward stream.

All streams share the process's one gRPC channel (one HTTP/2 connection), so a new connection
costs a stream, not a TLS handshake; HTTP/2 flow control is per stream, so a stalled connection
holds back only itself.

A local connection ends the way its session ended (issue 15). Only a clean end, the agent's
half-close and then the call finishing without error, closes it with a FIN (half-close first, as
the agent's half-close arrives). Every other end aborts it with a TCP reset (`reset_socket`): the
call failed (router or agent gone, flow-control timeout, the router's TTL), the agent sent an Error
frame (the target refused or reset the connection, `--allow-ports`), the session could not be
started, or the forward shut down with the connection in flight. An application that reads to
end-of-stream then gets ECONNRESET, never a short file that looks complete.

Each connection is a resumable session (issue 17): a break under it (router restarted, network
cut) is repaired with every byte in flight sent again, and the application does not notice. Only
a session that could not be resumed (its grace passed, the agent restarted) ends in a reset.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable

import grpc

from osmo_router.client.forward_events import Reporter, SessionOpener, host_port
from osmo_router.client.resume import give_up
from osmo_router.client.session import rpc_error
from osmo_router.io.forwarding import reset_socket, shutdown_quietly
from osmo_router.io.socket_pumps import BULK_READ, DirectSender, SocketReader
from osmo_router.transport import SessionStream
from osmo_router.wire.errors import RouterError, from_status_number
from osmo_router.wire.protocol import CLOSE_GRACE, half_close_frame, pb

log = logging.getLogger(__name__)

#: Listen backlog: bursts of many connections at once must not be refused.
BACKLOG = 4096


def listen_tcp(address: str, port: int) -> socket.socket:
    """A non-blocking listening socket on address:port (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class TcpListener:
    """Accepts local connections on one socket and forwards each to the remote port."""

    def __init__(
        self,
        sock: socket.socket,
        remote_port: int,
        opener: SessionOpener,
        reporter: Reporter,
        on_error: Callable[[RouterError], None] | None = None,
    ) -> None:
        """`on_error(err)`: told of every connection that failed (after the reporter), to judge the forward."""
        self.sock = sock
        self.remote_port = remote_port
        self._opener = opener
        self._reporter = reporter
        self._on_error = on_error
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> tuple[str, int]:
        """The bound (address, port)."""
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    async def serve(self) -> None:
        """Accept until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(self.sock)
            except OSError as err:
                if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: leave the connection in the backlog and let others finish first.
                    log.warning("accept on %s: %s", host_port(*self.address), err)
                    await asyncio.sleep(0.1)
                    continue
                raise
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._handle(conn, host_port(peer[0], peer[1])))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def close(self) -> None:
        """Stop accepting and drop the connections in flight."""
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        self.sock.close()

    async def _handle(self, conn: socket.socket, peer: str) -> None:
        def report(err: RouterError) -> None:
            self._reporter.connection_error("tcp", peer, self.remote_port, err)
            if self._on_error is not None:
                self._on_error(err)

        clean = False
        stream: SessionStream | None = None
        try:
            try:
                stream = await self._opener.start_stream(pb.PROTOCOL_TCP, self.remote_port)
            except RouterError as err:
                report(err)
                return
            clean = await ConnectionRelay(conn, stream, report, self._opener.wait_ready).run()
        finally:
            # Cancelled (the forward is shutting down) or failed: the connection did not end, it broke.
            if clean:
                conn.close()
            else:
                reset_socket(conn)
                if stream is not None:
                    await give_up(stream, "the forwarded connection was closed on the client's side")


class ConnectionRelay:
    """One local connection <-> its session stream; half-close carried both ways.

    `run` says whether the session ended cleanly; the caller closes the connection accordingly
    (FIN if clean, reset otherwise: see the module docstring). Nothing here shuts the local socket's
    sending side down except the agent's half-close: a FIN sent on a failure would be read as the end
    of the data before the reset could say otherwise.
    """

    def __init__(
        self,
        conn: socket.socket,
        stream: SessionStream,
        report: Callable[[RouterError], None],
        wait_ready: Callable[[SessionStream], Awaitable[None]],
    ) -> None:
        self.conn = conn
        self.stream = stream
        self.report = report
        self.wait_ready = wait_ready
        self.loop = asyncio.get_running_loop()
        self.aborted = False
        self.failed = False
        #: The longest time the local application took to take one frame (see osmo_router.client.stall).
        self.longest_delivery = 0.0
        #: Sends the agent's data frames as they arrive, while this relay keeps up (issue 18).
        self.direct = DirectSender(conn, self._abort_on)

    async def run(self) -> bool:
        """Relay until the session ends; True if it ended cleanly. A failure is reported (once) as soon as known."""
        upstream = asyncio.create_task(self._local_to_remote())
        clean = False
        try:
            clean = await self._remote_to_local()
            if clean:
                # Wake a pending local read with EOF so the upstream pump ends on its own (after a
                # clean end it has normally sent its half-close already).
                shutdown_quietly(self.conn, socket.SHUT_RDWR)
                await asyncio.wait({upstream}, timeout=CLOSE_GRACE)
        finally:
            # A broken session, a pump stuck past the grace, or the forward shutting down: the pump
            # is cancelled (its local read or its write to a call that is over), never woken by a shutdown.
            upstream.cancel()
            await self.direct.close()
            await asyncio.gather(upstream, return_exceptions=True)
        return clean and not self.aborted

    def _fail(self, err: RouterError) -> None:
        """Report the failure (once); the connection is reset when the session's end follows."""
        if not self.failed and not self.aborted:
            self.failed = True
            self.direct.enabled = False
            self.report(err)

    async def _abort_on(self, _err: OSError) -> None:
        await self._abort()

    async def _abort(self) -> None:
        """The local side broke (reset): end the session, as a reset would."""
        if not self.aborted:
            self.aborted = True
            await give_up(self.stream, "the local application reset the connection")

    async def _local_to_remote(self) -> None:
        reader = SocketReader(self.conn)
        try:
            await reader.send_all(self.stream, BULK_READ)
            await self.stream.send(half_close_frame())
            await self.stream.close()
        except OSError:
            await self._abort()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the session is over; the downstream pump reports why
        finally:
            reader.close()

    async def _remote_to_local(self) -> bool:
        """Deliver the agent's frames; True if the stream ended cleanly (no error, no Error frame)."""
        try:
            # The local side's bytes are already on their way: the router holds them until the
            # agent joins, so a new connection costs no extra round trip.
            await self.wait_ready(self.stream)
            with self.direct.serving(self.stream):
                while (frame := await self.stream.recv()) is not None:
                    await self.direct.flushed()
                    kind = frame.WhichOneof("kind")
                    if kind == "data" and not self.failed:
                        started = time.monotonic()
                        try:
                            await self.loop.sock_sendall(self.conn, frame.data)
                        except OSError:
                            await self._abort()
                        self.longest_delivery = max(self.longest_delivery, time.monotonic() - started)
                    elif kind == "half_close" and not self.failed:
                        shutdown_quietly(self.conn, socket.SHUT_WR)
                    elif kind == "error":
                        self._fail(from_status_number(frame.error.code, frame.error.message))
                await self.direct.flushed()
        except grpc.aio.AioRpcError as err:
            self._fail(rpc_error(err, stalled=max(self.longest_delivery, self.direct.longest)))
            return False
        except RouterError as err:
            self._fail(err)
            return False
        return not self.failed
