"""Port-forward sessions on the agent: one TCP connection, one UDP port, or a watch.

Targets are the container's own loopback only; `--allow-ports` narrows which ports. Every refusal
is an Error frame (then a half-close), so the client can say exactly what went wrong.

The connection to a target ends the way the session did (issue 15): with a FIN only after a clean
end (the target's EOF relayed, and the client's half-close received), with a TCP reset
(`reset_socket`) otherwise: the session broke (client, router or connection gone, a status instead
of the client's half-close), or the target itself reset the connection. A server in the container
that is still sending or reading then gets ECONNRESET instead of an orderly close it would take
for "the client read everything".

A session whose init says `close_at_client_eof` (the router sets it for OSMO's CLI on its WebSocket
port) ends at the client's half-close, whatever the target does (`TcpRelay._close_at_client_eof`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import ipaddress
import logging
import socket
import sys
import termios

import grpc

from osmo_router.agent.config import AgentConfig
from osmo_router.agent.forward_udp import UdpRelay, agent_budget
from osmo_router.io.forwarding import (
    WATCH_PORT,
    drain,
    is_resumable,
    reset_socket,
    retrieve,
    shutdown_quietly,
)
from osmo_router.io.socket_pumps import BULK_READ, DirectSender, SocketReader
from osmo_router.transport import SessionStream
from osmo_router.wire.errors import RouterError
from osmo_router.wire.protocol import half_close_frame, pb

log = logging.getLogger(__name__)

#: How long connecting to a target may take.
CONNECT_TIMEOUT = 10.0
#: With `close_at_client_eof`: how long the target may take to accept the client's last bytes before
#: its connection is closed anyway (the kernel then goes on delivering them, as after any close).
EOF_DELIVERY_GRACE = 10.0
#: Most bytes of the target's read and dropped in one go while the client's last bytes are delivered.
EOF_DISCARD_BYTES = 4 * 1024 * 1024


@functools.lru_cache(maxsize=16)
def parse_port_ranges(entries: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """Port ranges from `--allow-ports` entries ("8080", "8000-9000", "80,443"); ValueError if invalid."""
    ranges: list[tuple[int, int]] = []
    for entry in entries:
        for part in filter(None, (p.strip() for p in entry.split(","))):
            low, dash, high = part.partition("-")
            try:
                first, last = int(low), int(high if dash else low)
            except ValueError:
                raise ValueError(f"--allow-ports: {part!r} is not a port or a range like 8000-9000") from None
            if not 1 <= first <= last <= 65535:
                raise ValueError(f"--allow-ports: {part!r} is not within 1-65535 (low-high)")
            ranges.append((first, last))
    return tuple(ranges)


def port_allowed(port: int, allow_ports: tuple[str, ...]) -> bool:
    """True when no `--allow-ports` were given, or `port` is in one of them."""
    if not allow_ports:
        return True
    return any(low <= port <= high for low, high in parse_port_ranges(allow_ports))


def target_hosts(remote_host: str) -> list[str] | None:
    """Loopback addresses to try for a requested host; None if the host is not the container's loopback."""
    if remote_host in ("", "localhost"):
        # IPv4 first, then IPv6, like kubectl: a server may listen on only one of them.
        return ["127.0.0.1", "::1"]
    try:
        address = ipaddress.ip_address(remote_host.strip("[]"))
    except ValueError:
        return None
    return [str(address)] if address.is_loopback else None


async def serve_port_forward(stream: SessionStream, open_msg: pb.SessionOpen, config: AgentConfig) -> None:
    """Serve one port-forward session (a TCP connection, a UDP port or a watch) to its end."""
    init = open_msg.port_forward
    port = init.remote_port
    # The gRPC agent checked this before holding the session (agent.py); the WebSocket backend
    # (ws_backend.py) calls this handler directly, so it is checked here too.
    if (refusal := forward_refusal(init, config)) is not None:
        await refuse(stream, *refusal)
        return
    if init.protocol != pb.PROTOCOL_UDP and port == WATCH_PORT:
        await _serve_watch(stream)
        return
    hosts = target_hosts(init.remote_host) or []
    if init.protocol == pb.PROTOCOL_UDP:
        budget = agent_budget(config.max_udp_sockets)
        relay = UdpRelay(
            stream, hosts, port, max_sockets=config.max_udp_sockets_per_session, budget=budget, user=open_msg.user
        )
        await relay.run()
    else:
        await _serve_tcp(stream, hosts, port, close_at_client_eof=init.close_at_client_eof)


def forward_refusal(init: pb.PortForwardInit, config: AgentConfig) -> tuple[grpc.StatusCode, str] | None:
    """Why this port-forward session cannot be served (a status code and message), or None.

    The agent checks it before it holds the session (agent.py), so a refused one never says it
    resumes: a port-forward command, which waits for that word on its watch, then stops before
    listening instead of printing "Forwarding from" first. A watch's ports are checked as each
    connection to them would be.
    """
    if init.protocol != pb.PROTOCOL_UDP and init.remote_port == WATCH_PORT:
        for watched in init.watched_ports:
            if (refusal := _port_refusal(watched, config)) is not None:
                return refusal
        return None
    if init.protocol not in (pb.PROTOCOL_TCP, pb.PROTOCOL_UDP):
        return grpc.StatusCode.INVALID_ARGUMENT, "protocol must be tcp or udp"
    if (refusal := _port_refusal(init.remote_port, config)) is not None:
        return refusal
    if target_hosts(init.remote_host) is None:
        message = f"{init.remote_host!r} is not the container's loopback; only loopback ports can be forwarded"
        return grpc.StatusCode.PERMISSION_DENIED, message
    return None


def _port_refusal(port: int, config: AgentConfig) -> tuple[grpc.StatusCode, str] | None:
    """Why a remote port cannot be forwarded to (a status code and message), or None."""
    if not 1 <= port <= 65535:
        return grpc.StatusCode.INVALID_ARGUMENT, f"remote port {port} is not within 1-65535"
    if not port_allowed(port, config.allow_ports):
        return (
            grpc.StatusCode.PERMISSION_DENIED,
            f"port {port} is not allowed (--allow-ports {','.join(config.allow_ports)})",
        )
    return None


async def refuse(stream: SessionStream, code: grpc.StatusCode, message: str) -> None:
    """Report an error, half-close, end our side and let the call finish."""
    log.info("port-forward refused: %s", message)
    await stream.send_error(code, message)
    await stream.send(half_close_frame())
    await stream.close()
    await drain(stream)


async def _serve_watch(stream: SessionStream) -> None:
    """Hold the session open until the client half-closes it; its breaking tells the client we are gone."""
    while (frame := await stream.recv()) is not None:
        if frame.WhichOneof("kind") == "half_close":
            await stream.send(half_close_frame())
            await stream.close()
            await drain(stream)
            return


async def _connect(hosts: list[str], port: int) -> socket.socket:
    """A connected non-blocking socket to the first host that accepts; raises the last OSError."""
    loop = asyncio.get_running_loop()
    last: OSError = ConnectionRefusedError(errno.ECONNREFUSED, "connection refused")
    for host in hosts:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.sock_connect(sock, (host, port))
        except TimeoutError:
            sock.close()
            raise
        except OSError as err:
            sock.close()
            last = err
            continue
        except BaseException:
            sock.close()
            raise
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise last


async def _serve_tcp(stream: SessionStream, hosts: list[str], port: int, *, close_at_client_eof: bool) -> None:
    where = f"port {port} in the container"
    try:
        sock = await _connect(hosts, port)
    except TimeoutError:
        await refuse(stream, grpc.StatusCode.DEADLINE_EXCEEDED, f"connecting to {where} timed out")
        return
    except OSError as err:
        reason = "connection refused" if isinstance(err, ConnectionRefusedError) else err.strerror or str(err)
        await refuse(stream, grpc.StatusCode.UNAVAILABLE, f"{reason} by {where}")
        return
    clean = False
    try:
        clean = await TcpRelay(stream, sock, where, close_at_client_eof=close_at_client_eof).run()
    finally:
        if clean:
            sock.close()
        else:
            reset_socket(sock)


class TcpRelay:
    """One forwarded TCP connection: target socket <-> session stream, each direction closing on its own.

    `run` says whether it ended cleanly; the caller closes the target socket with a FIN if so, with
    a reset otherwise (see the module docstring). With `close_at_client_eof` the client's half-close
    ends the connection (see `_close_at_client_eof`).
    """

    def __init__(
        self, stream: SessionStream, sock: socket.socket, where: str, *, close_at_client_eof: bool = False
    ) -> None:
        self.stream = stream
        self.close_at_client_eof = close_at_client_eof
        #: Set at the client's half-close when it ends the connection (`close_at_client_eof`).
        self._client_eof_closes = asyncio.Event()
        self.sock = sock
        self.where = where
        self.loop = asyncio.get_running_loop()
        #: The client's direction is over: it half-closed, or its data can no longer be delivered.
        self.client_done = asyncio.Event()
        #: The client half-closed its direction (the one clean way for client_done to be set).
        self.client_half_closed = False
        #: The target's direction ended with its EOF, relayed with our half-close.
        self.target_eof = False
        self._error_sent = False
        #: Sends the client's data frames to the target as they arrive, while the reader keeps up (issue 18).
        self.direct = DirectSender(sock, self._target_broke)

    async def run(self) -> bool:
        """Relay until both directions are closed (or the session broke); True if both closed cleanly."""
        # The stream reader is never cancelled (a cancelled read cancels the RPC); it ends by itself.
        reader = asyncio.create_task(self._from_client())
        reader.add_done_callback(retrieve)
        target = asyncio.create_task(self._from_target())
        client_done = asyncio.create_task(self.client_done.wait())
        eof_closes = asyncio.create_task(self._client_eof_closes.wait())
        try:
            await asyncio.wait({target, reader, eof_closes}, return_when=asyncio.FIRST_COMPLETED)
            if self._client_eof_closes.is_set() and not target.done():
                return await self._close_at_client_eof(target, reader)
            if not target.done():
                return False  # the session ended first: the client went away or the session failed
            await asyncio.wait({client_done, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not self.client_done.is_set():
                return False
            await self._end_call(reader)
            # Both directions are over at the socket level: what happens to the call now changes
            # nothing the target could still be told.
            return self.target_eof and self.client_half_closed and not self._error_sent
        finally:
            for task in (target, client_done, eof_closes):
                task.cancel()
            await asyncio.gather(target, client_done, eof_closes, return_exceptions=True)
            await self.direct.close()

    async def _end_call(self, reader: asyncio.Task[None]) -> None:
        """End our side of the call and let the router end its side (the stream reader sees it)."""
        await self.stream.close()
        if is_resumable(self.stream):
            # Its reader keeps the call, which ends only after the handler (agent/held.py).
            reader.cancel()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await asyncio.shield(reader)

    async def _close_at_client_eof(self, target: asyncio.Task[None], reader: asyncio.Task[None]) -> bool:
        """The client's half-close ends the connection (`close_at_client_eof`), as OSMO's system did.

        OSMO's CLI has no half-close: at its local EOF it closes the connection's WebSocket and reads
        nothing more (port_forward.py run_tcp_with_sock); OSMO's router then closed the backend
        (router.py run_connect_client, once copy_data had relayed every message), and osmo-ctrl closed
        its connection to the target right after writing the last message to it (ctrl.go
        portforwardConnectTCP: `<-closeConn`, then its deferred `localConn.Close()`). So here, once
        everything before the half-close is written (the pump writes in order, and the target's write
        side is already shut down behind it): the target's bytes are no longer relayed (nobody reads
        them), the client's last bytes get up to EOF_DELIVERY_GRACE s to reach the target, and the
        connection is closed with a FIN whether or not the target closes (True: a clean end).
        Waiting for delivery is a bound OSMO did not have: closing a socket that holds unread bytes
        of the target sends a reset, which would drop what the target had not yet taken.
        """
        target.cancel()
        await asyncio.gather(target, return_exceptions=True)
        await self._delivered()
        with contextlib.suppress(grpc.aio.AioRpcError, RouterError, asyncio.InvalidStateError):
            await self.stream.send(half_close_frame())
            await self._end_call(reader)
        _discard_input(self.sock)  # (unread bytes would turn the close into a reset)
        return not self._error_sent

    async def _delivered(self) -> None:
        """Until the target's TCP acknowledged every byte and the FIN (at most EOF_DELIVERY_GRACE s).

        The kernel has no event for that: the send queue is polled, first after 1 ms, then less
        often (on loopback a target that reads empties it at once). What the target sends meanwhile
        is dropped.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + EOF_DELIVERY_GRACE
        delay = 0.001
        while True:
            _discard_input(self.sock)
            if _unsent(self.sock) == 0 or loop.time() >= deadline:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _report(self, message: str) -> None:
        if not self._error_sent:
            self._error_sent = True
            log.info("port-forward: %s", message)
            await self.stream.send_error(grpc.StatusCode.UNAVAILABLE, message)

    async def _from_target(self) -> None:
        """Target bytes to data frames; a half-close at the target's EOF (after an Error on a reset)."""
        reader = SocketReader(self.sock)
        try:
            try:
                await reader.send_all(self.stream, BULK_READ)
                self.target_eof = True
            except OSError as err:
                await self._report(f"{self.where} reset the connection ({err.strerror or err})")
                self.client_done.set()
            finally:
                reader.close()
            await self.stream.send(half_close_frame())
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the session is gone; the reader sees it too

    async def _target_broke(self, err: OSError) -> None:
        """Sending to the target failed: the client's direction is over (its data cannot be delivered)."""
        self.direct.enabled = False
        await self._report(f"{self.where} reset the connection ({err.strerror or err})")
        self.client_done.set()

    async def _from_client(self) -> None:
        """Data frames to the target; the client's half-close shuts the target's write side."""
        try:
            with self.direct.serving(self.stream):
                while (frame := await self.stream.recv()) is not None:
                    await self.direct.flushed()
                    kind = frame.WhichOneof("kind")
                    if kind == "data" and self.direct.enabled:
                        try:
                            await self.loop.sock_sendall(self.sock, frame.data)
                        except OSError as err:
                            await self._target_broke(err)
                    elif kind == "half_close" and not self.client_done.is_set():
                        self.direct.enabled = False
                        self.client_half_closed = True
                        shutdown_quietly(self.sock, socket.SHUT_WR)
                        self.client_done.set()
                        if self.close_at_client_eof:
                            self._client_eof_closes.set()
                    elif kind == "error":
                        # The client's side broke (its application reset the connection): reset the target.
                        log.info("port-forward to %s: the client ended it: %s", self.where, frame.error.message)
                        return
        except (grpc.aio.AioRpcError, RouterError, asyncio.InvalidStateError) as err:
            log.info("port-forward session to %s broke: %s", self.where, err)


def _unsent(sock: socket.socket) -> int:
    """Bytes (and the FIN) the target's TCP has not acknowledged yet (SIOCOUTQ); 0 where unknown."""
    count = bytearray(4)
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, count)  # TIOCOUTQ is SIOCOUTQ on Linux
    except (OSError, ValueError):
        return 0
    return int.from_bytes(count, sys.byteorder, signed=True)


def _discard_input(sock: socket.socket) -> None:
    """Read and drop what the target sent (at most EOF_DISCARD_BYTES), without waiting."""
    dropped = 0
    with contextlib.suppress(OSError):
        while dropped < EOF_DISCARD_BYTES and (chunk := sock.recv(65536)):
            dropped += len(chunk)
