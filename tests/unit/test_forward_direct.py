"""Forwarded bytes without waking a pump (issue 18): SocketReader sending from its socket's readiness
callback, and DirectSender writing received frames to a socket; both keep order and backpressure."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from osmo_router.io.socket_pumps import DirectSender, SocketReader
from osmo_router.wire.codec import DataFrame, decode_data_message


class Stream:
    """A raw session stream that sends at once while `open`, else through its (awaited) slow path."""

    raw = True

    def __init__(self) -> None:
        self.open = True
        self.direct: list[bytes] = []
        self.slow: list[bytes] = []
        self.sent = asyncio.Event()

    def try_send_data_message(self, message: bytes, units: int = -1) -> bool:
        if not self.open:
            return False
        payload = bytes(decode_data_message(message) or b"")
        assert units == len(payload)  # the reader says what it read: resume numbers by it
        self.direct.append(payload)
        self.sent.set()
        return True

    async def send_data_message(self, message: bytes) -> None:
        self.slow.append(bytes(decode_data_message(message) or b""))
        self.sent.set()


async def _until(event: asyncio.Event, condition: object) -> None:
    while not condition():  # type: ignore[operator]
        await event.wait()
        event.clear()


@pytest.mark.asyncio
async def test_the_reader_sends_from_the_readiness_callback_and_hands_the_pump_what_must_wait() -> None:
    left, right = socket.socketpair()
    right.setblocking(False)
    reader = SocketReader(right)
    stream = Stream()
    pump = asyncio.create_task(reader.send_all(stream, 1 << 20))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(5):
            for count, piece in enumerate((b"a", b"bb", b"ccc"), 1):
                left.send(piece)
                await _until(stream.sent, lambda count=count: len(stream.direct) + len(stream.slow) == count)
            assert stream.direct == [b"a", b"bb", b"ccc"] and not stream.slow
            stream.open = False  # the stream would have to wait: the pump sends it, in order
            left.send(b"dddd")
            await _until(stream.sent, lambda: stream.slow == [b"dddd"])
            stream.open = True
            left.send(b"eeeee")
            await _until(stream.sent, lambda: stream.direct[-1:] == [b"eeeee"])
            assert stream.slow == [b"dddd"] and stream.direct == [b"a", b"bb", b"ccc", b"eeeee"]
            left.close()
            await pump  # EOF reached the pump: send_all returns
    finally:
        pump.cancel()
        reader.close()
        right.close()


@pytest.mark.asyncio
async def test_a_reset_read_in_the_callback_is_raised_by_the_pump() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        sending = socket.create_connection(server.getsockname())
        receiving, _ = server.accept()
    receiving.setblocking(False)
    reader = SocketReader(receiving)
    stream = Stream()
    pump = asyncio.create_task(reader.send_all(stream, 1 << 20))  # type: ignore[arg-type]
    try:
        async with asyncio.timeout(5):
            sending.send(b"x")
            await _until(stream.sent, lambda: stream.direct == [b"x"])
            sending.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sending.close()  # a reset: read in the callback, and the pump must see it, not an EOF
            with pytest.raises(ConnectionResetError):
                await pump
    finally:
        pump.cancel()
        reader.close()
        receiving.close()


@pytest.mark.asyncio
async def test_direct_sender_sends_the_rest_of_a_full_socket_in_order_and_declines_meanwhile() -> None:
    left, right = socket.socketpair()
    left.setblocking(False)
    right.setblocking(False)
    right.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    errors: list[OSError] = []

    async def on_error(err: OSError) -> None:
        errors.append(err)

    sender = DirectSender(left, on_error)
    big = bytes(range(256)) * 4096  # 1 MiB: far more than the socket takes at once
    try:
        async with asyncio.timeout(10):
            assert sender.offer(DataFrame(big))  # taken: part sent, the rest by a task
            assert not sender.offer(DataFrame(b"after"))  # busy: the pump gets it (and waits in flushed)
            got = bytearray()
            loop = asyncio.get_running_loop()
            flushed = asyncio.create_task(sender.flushed())
            while len(got) < len(big):
                got += await loop.sock_recv(right, 65536)
            await flushed
            assert bytes(got) == big
            assert sender.offer(DataFrame(b"after"))  # free again
            assert await loop.sock_recv(right, 16) == b"after"
            assert not errors
            sender.enabled = False
            assert not sender.offer(DataFrame(b"x"))
    finally:
        await sender.close()
        left.close()
        right.close()
