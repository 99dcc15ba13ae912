"""SocketReader.recv_data_message: a socket's bytes as data-frame messages read in place (issue 18)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import pytest

from osmo_router.h2.config import H2Config
from osmo_router.io.send_buffer import LOCAL_SNDBUF, send_buffer_cap
from osmo_router.io.socket_pumps import BULK_READ, LOCAL_RCVBUF, SocketReader
from osmo_router.wire.codec import decode_data_message, encode_data_message, payload_fitting


@pytest.mark.asyncio
async def test_messages_are_exactly_the_encoded_payloads_at_every_size() -> None:
    # Sizes across every header length (one- to three-byte varints), and past the read size.
    sizes = [1, 127, 128, 16_379, 16_384, 200_000, 3 << 20]
    payloads = [os.urandom(size) for size in sizes]
    with socket.create_server(("127.0.0.1", 0)) as server:
        sending = socket.create_connection(server.getsockname())
        receiving, _ = server.accept()
    receiving.setblocking(False)
    reader = SocketReader(receiving)
    try:
        async with asyncio.timeout(20):
            for payload in payloads:
                sending.sendall(payload)
                got = bytearray()
                while len(got) < len(payload):
                    message = await reader.recv_data_message(1 << 20)
                    assert isinstance(message, bytes)
                    piece = decode_data_message(message)
                    assert piece is not None and 0 < len(piece) <= 1 << 20
                    assert message == encode_data_message(bytes(piece))
                    got += piece
                assert got == payload
            sending.close()
            assert await reader.recv_data_message(1 << 20) == b""
    finally:
        reader.close()
        receiving.close()


@pytest.mark.asyncio
async def test_without_fionread_the_message_is_encoded_from_a_plain_read() -> None:
    left, right = socket.socketpair()
    right.setblocking(False)
    reader = SocketReader(right)
    reader._fionread = False  # as after an ioctl the socket refused
    try:
        async with asyncio.timeout(5):
            left.send(b"abc")
            assert await reader.recv_data_message(1024) == encode_data_message(b"abc")
            left.close()
            assert await reader.recv_data_message(1024) == b""
    finally:
        reader.close()
        right.close()


@pytest.mark.asyncio
async def test_the_local_socket_queues_at_most_about_a_message_after_a_bulk_transfer() -> None:
    # TCP autotuning grows a fast reader's receive buffer to several MiB (up to tcp_rmem's maximum),
    # and a fast local sender fills it: cache-cold bytes by the time the pump copies them out.
    total = 48 << 20
    with socket.create_server(("127.0.0.1", 0)) as server:
        sending = socket.create_connection(server.getsockname())
        receiving, _ = server.accept()
    receiving.setblocking(False)
    reader = SocketReader(receiving)
    loop = asyncio.get_running_loop()
    chunk = bytes(128 << 10)

    def send_all() -> None:
        for _ in range(total // len(chunk)):
            sending.sendall(chunk)
        sending.shutdown(socket.SHUT_WR)

    try:
        async with asyncio.timeout(60):
            sent = loop.run_in_executor(None, send_all)
            got = 0
            while message := await reader.recv_data_message(BULK_READ):
                piece = decode_data_message(message)
                assert piece is not None
                got += len(piece)
            await sent
        assert got == total
        # Linux reports twice what was asked (its bookkeeping share); autotuning would have grown it.
        assert receiving.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) <= 2 * LOCAL_RCVBUF
    finally:
        reader.close()
        receiving.close()
        sending.close()


@pytest.mark.skipif((send_buffer_cap() or 0) < LOCAL_SNDBUF, reason="net.core.wmem_max is below LOCAL_SNDBUF here")
@pytest.mark.asyncio
async def test_the_local_socket_on_a_short_link_gets_a_bounded_send_buffer() -> None:
    # What the pump writes to the application waits in at most about LOCAL_SNDBUF (io/send_buffer.py);
    # autotuning would let 4 MiB wait, and a long link would keep it (test_send_buffer.py).
    with socket.create_server(("127.0.0.1", 0)) as server:
        with socket.create_connection(server.getsockname()) as dialled:
            accepted, _ = server.accept()
            accepted.setblocking(False)
            reader = SocketReader(accepted)
            try:
                assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * LOCAL_SNDBUF
                assert dialled.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) > 2 * LOCAL_SNDBUF  # untouched
            finally:
                reader.close()
                accepted.close()


def test_payload_fitting_is_the_largest_payload_whose_message_fits_the_frame() -> None:
    for frame_size in (16_384, 100_000, 1 << 20, (1 << 24) - 1):
        payload = payload_fitting(frame_size)
        assert 5 + len(encode_data_message(bytes(payload))) <= frame_size
        assert 5 + len(encode_data_message(bytes(payload + 1))) > frame_size


def test_a_full_bulk_read_is_one_http2_frame() -> None:
    # A read of BULK_CHUNK_SIZE made a message 13 bytes over our 1 MiB SETTINGS_MAX_FRAME_SIZE: every
    # bulk message went as a full frame and a 13-byte one (a second write and read in each process).
    assert 5 + len(encode_data_message(bytes(BULK_READ))) == H2Config().max_frame_size


class _TakingStream:
    """A raw session stream that takes every message at once, noting the event loop's turn for each."""

    raw = True

    def __init__(self) -> None:
        self.turns: list[int] = []
        self.turn = 0
        self.received = bytearray()

    def try_send_data_message(self, message: bytes, units: int = -1) -> bool:
        piece = decode_data_message(message)
        assert piece is not None
        assert units == len(piece)  # the reader says what it read: resume numbers by it
        self.received += piece
        self.turns.append(self.turn)
        return True

    async def send_data_message(self, message: bytes) -> None:
        raise AssertionError("every message is taken at once")


@pytest.mark.asyncio
async def test_a_pump_lets_the_loop_run_between_full_messages_sent_at_once() -> None:
    # A socket holding more than a message, and a stream taking each at once: the pump would read
    # and send all of it in one turn of the event loop, starving everything else on it.
    left, right = socket.socketpair()
    left.setblocking(False)
    sent = bytearray()
    with contextlib.suppress(BlockingIOError):
        while True:
            chunk = os.urandom(4096)
            sent += chunk[: left.send(chunk)]
    left.close()
    assert len(sent) >= 8 * 4096
    right.setblocking(False)
    reader = SocketReader(right)
    stream = _TakingStream()

    async def count_turns() -> None:
        while True:
            stream.turn += 1
            await asyncio.sleep(0)

    counting = asyncio.create_task(count_turns())
    try:
        async with asyncio.timeout(10):
            await reader.send_all(stream, 4096)  # type: ignore[arg-type]
        assert stream.received == sent
        assert len(set(stream.turns)) > len(stream.turns) // 2  # one full message per turn, about
    finally:
        counting.cancel()
        reader.close()
        right.close()
