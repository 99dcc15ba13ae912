"""Deterministic guards of a forwarded connection's round-trip latency (issue 18), no timing.

A 1-byte request/response through `port-forward` (redis GET, a keystroke) waits on every hop:
both forwarded sockets must send small writes at once (TCP_NODELAY, no Nagle delay behind an
unacknowledged segment), and a resumable stream must hand a frame to its waiting handler before
it asks gRPC for the next one.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpc
import pytest

from osmo_router.agent.forward import _connect
from osmo_router.client.forward_tcp import TcpListener, listen_tcp
from osmo_router.io.socket_pumps import SocketReader
from osmo_router.resume.stream import ResumableStream
from osmo_router.wire.protocol import pb


def nodelay(sock: socket.socket) -> bool:
    """True if TCP_NODELAY is set on `sock`."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.asyncio
async def test_the_agent_connects_to_its_target_with_nodelay() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock = await _connect(["127.0.0.1"], server.getsockname()[1])
        try:
            assert nodelay(sock)
        finally:
            sock.close()


class Recording(TcpListener):
    """A listener that records each accepted connection instead of forwarding it."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock, 1, opener=None, reporter=None)  # type: ignore[arg-type]  # never used
        self.accepted: asyncio.Queue[socket.socket] = asyncio.Queue()

    async def _handle(self, conn: socket.socket, peer: str) -> None:
        self.accepted.put_nowait(conn)


@pytest.mark.asyncio
async def test_the_client_accepts_local_connections_with_nodelay() -> None:
    listener = Recording(listen_tcp("127.0.0.1", 0))
    serving = asyncio.create_task(listener.serve())
    try:
        with socket.create_connection(listener.address, timeout=5):
            async with asyncio.timeout(5):
                conn = await listener.accepted.get()
            try:
                assert nodelay(conn)
            finally:
                conn.close()
    finally:
        serving.cancel()
        await listener.close()


class Scripted:
    """A stream under a ResumableStream: hands out the frames a test queues, logging each read it starts."""

    raw = False

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.frames: asyncio.Queue[pb.Frame] = asyncio.Queue()
        self.reading = asyncio.Event()

    async def recv(self) -> pb.Frame | None:
        self.log.append("read")
        self.reading.set()
        return await self.frames.get()

    async def send(self, frame: pb.Frame) -> None:
        return None

    async def send_data(self, payload: bytes) -> None:
        return None

    async def send_data_message(self, message: bytes) -> None:
        return None

    async def send_error(self, code: grpc.StatusCode, message: str) -> None:
        return None

    async def close(self) -> None:
        return None

    def abort(self) -> None:
        return None


@pytest.mark.asyncio
async def test_a_waiting_handler_gets_its_frame_before_the_next_read_starts() -> None:
    log: list[str] = []
    inner = Scripted(log)
    stream = ResumableStream(inner)
    stream.acking = False
    stream.start()
    try:

        async def handler() -> None:
            for _ in range(3):
                frame = await stream.recv()
                assert frame is not None
                log.append(f"delivered {frame.data.decode()}")

        handling = asyncio.create_task(handler())
        for n in range(3):
            async with asyncio.timeout(5):
                await inner.reading.wait()  # the reader waits on the stream, the handler on the reader
            inner.reading.clear()
            inner.frames.put_nowait(pb.Frame(data=str(n).encode()))
        async with asyncio.timeout(5):
            await handling
        assert log[:6] == ["read", "delivered 0", "read", "delivered 1", "read", "delivered 2"]
    finally:
        stream.abort()


@pytest.mark.asyncio
async def test_a_socket_reader_stays_registered_across_reads_and_leaves_none_behind() -> None:
    loop = asyncio.get_running_loop()
    added: list[int] = []
    add_reader = loop.add_reader

    def counting(fd: int, callback: Any, *args: Any) -> None:
        added.append(fd)
        add_reader(fd, callback, *args)

    ours, peer = socket.socketpair()
    ours.setblocking(False)
    reader = SocketReader(ours)
    loop.add_reader = counting  # type: ignore[method-assign,assignment]
    try:
        for n in range(5):  # a ping-pong: each read waits for data that is not there yet
            reading = asyncio.create_task(reader.recv(64))
            await asyncio.sleep(0)  # let it find nothing and wait
            assert not reading.done()
            peer.sendall(b"%d" % n)
            async with asyncio.timeout(5):
                assert await reading == b"%d" % n
        peer.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(5):
            assert await reader.recv(64) == b""
        assert added == [ours.fileno()]  # registered once, not once per read
    finally:
        loop.add_reader = add_reader  # type: ignore[method-assign]
        reader.close()
        assert not loop.remove_reader(ours.fileno())  # nothing left watching the socket
        ours.close()
        peer.close()


class CountingSocket(socket.socket):
    """A socket that counts its recv calls (and those that found nothing)."""

    calls = 0
    empty = 0

    def recv(self, size: int, flags: int = 0) -> bytes:
        self.calls += 1
        try:
            return super().recv(size, flags)
        except BlockingIOError:
            self.empty += 1
            raise


async def _short_reads() -> tuple[int, int]:
    """A ping-pong of short reads, then a long one and EOF through a SocketReader: its (recv calls, empty ones)."""
    first, peer = socket.socketpair()
    ours = CountingSocket(fileno=first.detach())
    ours.setblocking(False)
    reader = SocketReader(ours)
    try:
        for n in range(5):  # a ping-pong: each answer is shorter than asked, and the next is not there yet
            reading = asyncio.create_task(reader.recv(64))
            await asyncio.sleep(0)
            assert not reading.done()
            peer.sendall(b"%d" % n)
            async with asyncio.timeout(5):
                assert await reading == b"%d" % n
        counts = ours.calls, ours.empty
        peer.sendall(b"y" * 100)  # a full read leaves more behind: the next read takes it at once
        async with asyncio.timeout(5):
            assert await reader.recv(64) == b"y" * 64
            assert await reader.recv(64) == b"y" * 36
        peer.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(5):
            assert await reader.recv(64) == b""
        return counts
    finally:
        reader.close()
        ours.close()
        peer.close()


def test_a_socket_reader_after_a_short_read_waits_for_readiness_instead_of_a_failing_recv() -> None:
    import uvloop

    # On uvloop (the CLI's and the agent's loop) only the first read of the ping-pong found nothing:
    # after a short read the reader waited for readiness instead of trying a recv that would fail.
    assert uvloop.run(_short_reads()) == (6, 1)
    # The standard loop reports readiness once more after the read (a stale event): a read is tried then.
    calls, empty = asyncio.run(_short_reads())
    assert calls - empty == 5
