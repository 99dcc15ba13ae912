"""How a receiver's WINDOW_UPDATEs go out over a loopback socket: few writes of their own (issue 18).

Every separate write is a system call with loopback TCP work in the writer and a wake-up and a read in
the peer. A bulk transfer's connection-level update rides on a stream's, and the updates of one turn
of the event loop go out with the next frame the connection writes (a resumable stream's
acknowledgement for the same message) or together at the end of the turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from osmo_router.h2 import frames as fr
from osmo_router.h2.connection import Connection, H2Config
from tests.h2_pair import REQUEST, Pair, connected_pair

MIB = 1024 * 1024
#: A 2 MiB stream window that does not grow (no BDP pings, which would take the updates along) and an
#: 8 MiB connection window: given back alone at a quarter (2 MiB), riding on a stream's from 512 KiB.
CONFIG = H2Config(stream_window=2 * MIB, max_stream_window=2 * MIB, connection_window=8 * MIB)


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[Pair]:
    async with connected_pair(CONFIG) as connected:
        yield connected


def record_writes(conn: Connection) -> list[list[fr.Frame]]:
    """From now on, the frames of every `transport.write` the connection makes, one list per write (its
    control frames and small messages all go there; bulk DATA goes by writev, not recorded)."""
    writes: list[list[fr.Frame]] = []
    transport = conn.transport
    assert transport is not None
    original = transport.write

    def write(data: bytes | bytearray | memoryview) -> None:
        writes.append(list(fr.FrameParser(16 * MIB).feed(bytes(data))))
        original(data)

    transport.write = write  # type: ignore[method-assign]
    return writes


def updates(frames: list[fr.Frame], stream_id: int) -> int:
    """The window the WINDOW_UPDATEs among `frames` give on `stream_id` (0: the connection)."""
    return sum(
        int.from_bytes(f.payload, "big") for f in frames if f.kind == fr.WINDOW_UPDATE and f.stream_id == stream_id
    )


@pytest.mark.asyncio
async def test_the_connection_window_rides_on_the_stream_updates_of_a_bulk_transfer(pair: Pair) -> None:
    count, body = 24, b"b" * (MIB - 16)  # one DATA frame per message
    async with asyncio.timeout(20):
        stream = await pair.client.open_stream(REQUEST)
        served = await pair.streams.get()
        writes = record_writes(pair.servers[0])

        async def send() -> None:
            for _ in range(count):
                await stream.write(body)

        sender = asyncio.create_task(send())
        for _ in range(count):
            assert await served.read() == body
        await sender
        await asyncio.sleep(0)  # the turn ends: what it deferred is written
    with_updates = [w for w in writes if any(f.kind == fr.WINDOW_UPDATE for f in w)]
    written = [f for w in writes for f in w]
    flow = count * (len(body) + 5)
    # Everything read was given back, the stream's within a quarter window, the connection's within
    # a quarter of its own (else the sender would have stalled: the 24 MiB passed an 8 MiB window).
    assert 0 <= flow - updates(written, served.id) < CONFIG.stream_window // 4
    assert 0 <= flow - updates(written, 0) < CONFIG.connection_window // 4
    # ...and the connection's never in a write of its own (before: one per 2 MiB, 12 of them).
    alone = [w for w in with_updates if all(f.kind == fr.WINDOW_UPDATE and f.stream_id == 0 for f in w)]
    assert alone == []
    assert len(with_updates) <= count  # at most one write per message read


@pytest.mark.asyncio
async def test_a_reply_written_in_the_same_turn_carries_the_window_update(pair: Pair) -> None:
    # A resumable stream's receiver acknowledges from a task it starts for a message (resume/acks.py): the
    # window update given back for that message goes in the acknowledgement's write, not one of its own.
    count, body = 16, b"m" * (512 * 1024)  # every message read is a quarter window to give back
    async with asyncio.timeout(20):
        stream = await pair.client.open_stream(REQUEST)
        served = await pair.streams.get()
        served.send_headers([(":status", "200"), ("content-type", "application/grpc")])
        loop = asyncio.get_running_loop()
        acked: list[bool] = []

        def ack() -> None:
            acked.append(served.try_write(b"ack"))

        def listener(message: bytes) -> bool:
            loop.call_soon(ack)  # (as Acknowledger.now's task: it runs in the next turn)
            return True

        served.set_listener(listener)
        writes = record_writes(pair.servers[0])
        for _ in range(count):
            await stream.write(body)
        for _ in range(count):
            assert await stream.read() == b"ack"
    assert acked == [True] * count
    with_updates = [w for w in writes if any(f.kind == fr.WINDOW_UPDATE for f in w)]
    assert updates([f for w in writes for f in w], served.id) >= count * (len(body) + 5) - CONFIG.stream_window // 4
    # Before: each update a write of its own, the acknowledgement another.
    assert with_updates and all(any(f.kind == fr.DATA for f in w) for w in with_updates)
    assert len(writes) == count
