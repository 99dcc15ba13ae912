"""StdinReader on real pipes: plain and framed chunks carry every byte, in order, then b"" at the end."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest

from osmo_router.client.stdio import StdinReader
from osmo_router.wire.codec import decode_data_message
from osmo_router.wire.protocol import pb

pytestmark = pytest.mark.asyncio


def _feed(fd: int, pieces: list[bytes]) -> threading.Thread:
    def run() -> None:
        for piece in pieces:
            os.write(fd, piece)
        os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def _read_all(reader: StdinReader) -> list[bytes]:
    chunks = []
    while chunk := await asyncio.wait_for(reader.read(), 30):
        chunks.append(chunk)
    return chunks


@pytest.mark.parametrize("framed", [False, True])
async def test_every_byte_arrives_in_order(framed: bool) -> None:
    read_end, write_end = os.pipe()
    pieces = [b"hello", os.urandom(200_000), b"x", os.urandom(3 * 1024 * 1024 + 5)]
    feeder = _feed(write_end, pieces)
    reader = StdinReader(read_end, chunk_size=1024 * 1024, linger=0.001, framed=framed)
    chunks = await _read_all(reader)
    feeder.join(10)
    if framed:
        payloads = [decode_data_message(chunk) for chunk in chunks]
        assert all(p is not None for p in payloads)
        # protobuf itself agrees with the hand-made layout
        assert pb.ExecRequest.FromString(chunks[0]).frame.data == bytes(payloads[0])  # type: ignore[arg-type]
        data = b"".join(bytes(p) for p in payloads if p is not None)
    else:
        data = b"".join(chunks)
    assert data == b"".join(pieces)
    assert max(len(c) for c in chunks) <= 1024 * 1024 + 16
    os.close(read_end)


async def test_framed_small_read_is_one_message_then_the_end() -> None:
    read_end, write_end = os.pipe()
    reader = StdinReader(read_end, chunk_size=1024 * 1024, linger=0.5, framed=True)
    os.write(write_end, b"ping")
    chunk = await asyncio.wait_for(reader.read(), 5)
    assert decode_data_message(chunk) == b"ping"
    os.close(write_end)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    os.close(read_end)


async def test_framed_reads_from_a_socket_carry_every_byte_in_order() -> None:
    """rsync's stdin is a socketpair: the MSG_WAITALL + receive-timeout path, like rsync's 32 KiB writes."""
    ours, theirs = socket.socketpair()
    pieces = [b"hello", *(os.urandom(32 * 1024) for _ in range(64)), b"tail"]

    def send_rest() -> None:
        for piece in pieces[1:]:
            theirs.sendall(piece)
        theirs.close()

    sender = threading.Thread(target=send_rest, daemon=True)
    reader = StdinReader(ours.fileno(), chunk_size=1024 * 1024, linger=0.001, framed=True)
    theirs.sendall(pieces[0])
    first = await asyncio.wait_for(reader.read(), 5)  # before the burst: a small message goes at once
    assert decode_data_message(first) == b"hello"
    sender.start()
    chunks = await _read_all(reader)
    sender.join(10)
    payloads = [decode_data_message(chunk) for chunk in chunks]
    assert b"".join(bytes(p) for p in payloads if p is not None) == b"".join(pieces[1:])
    assert all(p is not None for p in payloads)
    ours.close()
