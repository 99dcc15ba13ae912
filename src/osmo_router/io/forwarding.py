"""Port-forward pieces both sides share: peer addresses as text, socket shutdown, stream draining.

A forwarded TCP connection is one session; a forwarded UDP port is one session carrying Datagram
frames whose `peer` names the local sender. A TCP PortForwardInit with `remote_port` 0 is a *watch*:
the agent holds it open until the client half-closes it, so the client learns at once when the
agent or the router goes away (the stream breaks) without polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any, Final

import grpc

from osmo_router.transport import SessionStream
from osmo_router.wire.errors import RouterError
from osmo_router.wire.protocol import CLOSE_GRACE

#: remote_port of a watch session (no connection is made; see the module docstring).
WATCH_PORT: Final = 0
#: How long an idle UDP peer mapping lives.
UDP_IDLE_TIMEOUT: Final = 60.0
#: Datagrams queued per direction before new ones are dropped (UDP may drop; memory stays bounded).
UDP_QUEUE_DEPTH: Final = 1024
#: ...and bytes (io/datagram_queue.py): one forward's queue, a user's queues on one agent, all of them.
UDP_QUEUE_BYTES: Final = 4 * 1024 * 1024
UDP_USER_BYTES: Final = 16 * 1024 * 1024
UDP_TOTAL_BYTES: Final = 64 * 1024 * 1024


def format_peer(address: Any) -> str:
    """A socket address as text: "127.0.0.1:5353" or "[::1]:5353"."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def os_errors_named(prefix: str) -> Iterator[None]:
    """An OSError inside reads `prefix: what went wrong` ("Address already in use" alone names no address)."""
    try:
        yield
    except OSError as err:
        raise OSError(f"{prefix}: {err.strerror or err}") from err


def parse_peer(text: str) -> tuple[str, int]:
    """The (host, port) of a peer written by `format_peer`; ValueError if it is not one."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"not a peer address: {text!r}")
    return host.strip("[]"), int(port)


def send_datagram(transport: asyncio.DatagramTransport, payload: bytes, address: Any = None) -> None:
    """`transport.sendto(payload, address)`, an empty datagram included: asyncio's and uvloop's
    transports drop those silently, and a zero-length datagram is a datagram (a keepalive, a probe)."""
    if payload:
        transport.sendto(payload, address)
        return
    fd = transport.get_extra_info("socket").fileno()
    with socket.socket(fileno=os.dup(fd)) as sock:  # the same socket: its type and family are asked
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError, InterruptedError):  # a full buffer drops it, as UDP may
            if address is None:
                sock.send(b"")
            else:
                sock.sendto(b"", address)


def shutdown_quietly(sock: socket.socket, how: int) -> None:
    """shutdown(2) that ignores a socket that is already closed or disconnected."""
    with contextlib.suppress(OSError):
        sock.shutdown(how)


def reset_socket(sock: socket.socket) -> None:
    """Close a TCP socket with a reset (RST) instead of a FIN: SO_LINGER {on, 0 s}, then close.

    A forwarded connection whose session broke must not look finished: a FIN reads as a clean
    end-of-stream (a short file, success), a reset as ECONNRESET. Data still queued in the socket
    is discarded, as it would be on any reset. Never shut the socket down first: that sends a FIN.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def drain(stream: SessionStream, timeout: float = CLOSE_GRACE) -> None:
    """Read (and drop) frames until the far side ends the call, at most `timeout` seconds.

    Our side has sent its last frame; reading on lets the call finish normally. Abandoning a
    read would cancel the RPC, and frames still in flight could be lost. A resumable stream is not
    read: its own reader keeps the call, and it ends only once the handler returned (agent/held.py).
    """
    if is_resumable(stream):
        return
    with contextlib.suppress(TimeoutError, grpc.aio.AioRpcError, RouterError, asyncio.InvalidStateError):
        async with asyncio.timeout(timeout):
            while await stream.recv() is not None:
                pass


def is_resumable(stream: SessionStream) -> bool:
    """True for a resumable session stream (resume/stream.py): it never ends while its handler runs."""
    from osmo_router.resume.stream import ResumableStream

    return isinstance(stream, ResumableStream)


def retrieve(task: asyncio.Task[Any]) -> None:
    """Done-callback that marks a task's exception as seen (it was handled or does not matter)."""
    if not task.cancelled():
        task.exception()
