"""A native server stream counted in byte budgets (Stream.use_budgets, issue 14): it grows its window
only while its budgets have room, always keeps a small one, and gives its count back when it ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
import pytest_asyncio

from osmo_router.h2.connection import Connection, H2Config, Stream
from osmo_router.h2.stream import CREDIT_FLOOR
from osmo_router.router.core.budget import ByteBudget

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/t.S/M"), (":authority", "x"), ("te", "trailers")]
WINDOW = 256 * 1024
MESSAGE = 32 * 1024
FRAMED = MESSAGE + 5


@dataclass
class Pair:
    client: Connection
    streams: asyncio.Queue[Stream]
    servers: list[Connection]
    arrived: asyncio.Event  # set after every read of a server connection


@pytest_asyncio.fixture
async def pair() -> AsyncIterator[Pair]:
    server_config = H2Config(stream_window=WINDOW, initial_stream_window=CREDIT_FLOOR)
    loop = asyncio.get_running_loop()
    streams: asyncio.Queue[Stream] = asyncio.Queue()
    servers: list[Connection] = []
    arrived = asyncio.Event()

    def accept() -> Connection:
        conn = Connection("server", server_config, on_stream=streams.put_nowait)
        original = conn.buffer_updated  # (a BufferedProtocol: every read ends here)

        def buffer_updated(nbytes: int) -> None:
            original(nbytes)
            arrived.set()

        conn.buffer_updated = buffer_updated  # type: ignore[method-assign]
        servers.append(conn)
        return conn

    server = await loop.create_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(lambda: Connection("client", H2Config()), "127.0.0.1", port)
    async with asyncio.timeout(5):
        await client.ready()
    yield Pair(client, streams, servers, arrived)
    client.close()
    server.close()
    await server.wait_closed()


async def _until(event: asyncio.Event, condition: Callable[[], bool]) -> None:
    while not condition():
        await event.wait()
        event.clear()


def _held(stream: Stream) -> int:
    """What the stream holds unread (complete messages and a partial one)."""
    return stream.exposure - max(0, stream._recv_left)


async def _open_and_push(pair: Pair, count: int) -> tuple[Stream, Stream]:
    """A stream whose client queues `count` messages at once; the server's side of it."""
    stream = await pair.client.open_stream(REQUEST)
    for _ in range(count):
        stream.write_nowait(b"x" * MESSAGE)
    return stream, await pair.streams.get()


@pytest.mark.asyncio
async def test_a_stream_starts_small_and_grows_to_its_window_while_its_budgets_have_room(pair: Pair) -> None:
    user, total = ByteBudget(4 * WINDOW), ByteBudget(16 * WINDOW)
    async with asyncio.timeout(10):
        _, served = await _open_and_push(pair, 16)
        # Not yet counted: the initial window is all the client may send.
        await _until(pair.arrived, lambda: served._recv_left <= 0)
        assert _held(served) <= CREDIT_FLOOR + FRAMED  # (the message arriving across its edge)
        served.use_budgets((user, total))
        await _until(pair.arrived, lambda: served._recv_left <= 0 and _held(served) >= WINDOW)
        assert WINDOW <= _held(served) <= WINDOW + FRAMED
        # Everything the stream holds or may still receive is counted, in both budgets.
        assert user.held == total.held == served.exposure
        served.reset()
        await served.wait_closed()
        assert user.held == total.held == 0


@pytest.mark.asyncio
async def test_a_full_budget_keeps_the_stream_at_its_floor_until_room_comes(pair: Pair) -> None:
    user = ByteBudget(2 * WINDOW)
    assert user.try_take(2 * WINDOW)  # another session's queue holds all of it
    async with asyncio.timeout(10):
        _, served = await _open_and_push(pair, 16)
        served.use_budgets((user,))
        messages = 0
        # The reader takes what arrives: the stream still moves, a floor's worth at a time.
        while messages < 4:
            if served.has_message():
                assert await served.read() is not None
                messages += 1
                continue
            await _until(pair.arrived, served.has_message)
        await _until(pair.arrived, lambda: served._recv_left <= 0)
        assert served.exposure <= CREDIT_FLOOR + FRAMED
        # Room comes back: at its next read (or DATA frame) the stream grows to its full window.
        user.give(2 * WINDOW)
        assert await served.read() is not None
        await _until(pair.arrived, lambda: served._recv_left <= 0 and _held(served) >= WINDOW)
        assert user.held == served.exposure <= WINDOW + FRAMED


@pytest.mark.asyncio
async def test_without_budgets_a_stream_keeps_its_initial_window(pair: Pair) -> None:
    async with asyncio.timeout(10):
        _, served = await _open_and_push(pair, 16)
        for _ in range(8):
            await _until(pair.arrived, served.has_message)
            assert await served.read() is not None
        await _until(pair.arrived, lambda: served._recv_left <= 0)
        assert _held(served) <= CREDIT_FLOOR + FRAMED  # (the message arriving across its edge)


@pytest.mark.asyncio
async def test_a_relayed_stream_without_budgets_takes_up_its_full_window_uncounted(pair: Pair) -> None:
    async with asyncio.timeout(10):
        _, served = await _open_and_push(pair, 16)
        served.use_budgets(())  # a session relayed for another replica: no budgets of its own here
        await _until(pair.arrived, lambda: served._recv_left <= 0 and _held(served) >= WINDOW)
        assert WINDOW <= _held(served) <= WINDOW + FRAMED


@pytest.mark.asyncio
async def test_a_stream_that_carries_little_does_not_take_up_the_connections_grown_window(pair: Pair) -> None:
    """Issue 18: a connection's window grows for its busiest stream (h2/bdp.py); a stream of small
    messages (resume's acks) that took it up held the grown window open in its user's budget, and
    eight of those beside eight bulk streams filled it: the bulk streams fell to CREDIT_FLOOR grants."""
    user = ByteBudget(64 * WINDOW)
    async with asyncio.timeout(10):
        stream = await pair.client.open_stream(REQUEST)
        served = await pair.streams.get()
        pair.servers[0]._grow_windows(4 * WINDOW)  # what the BDP estimator does for a bulk stream beside it
        # An opening message (a session's init) in the initial window: no reason to grow either.
        stream.write_nowait(b"i" * (CREDIT_FLOOR // 4))
        await _until(pair.arrived, served.has_message)
        served.use_budgets((user,))
        assert await served.read() == b"i" * (CREDIT_FLOOR // 4)
        for _ in range(8):
            stream.write_nowait(b"ack" * 5)
            await _until(pair.arrived, served.has_message)
            assert await served.read() == b"ack" * 5
        assert served._recv_window == WINDOW
        assert user.held == served.exposure <= WINDOW


@pytest.mark.asyncio
async def test_a_bulk_stream_takes_up_the_grown_window_at_once(pair: Pair) -> None:
    user = ByteBudget(64 * WINDOW)
    async with asyncio.timeout(10):
        _, served = await _open_and_push(pair, 8 * WINDOW // MESSAGE)
        pair.servers[0]._grow_windows(4 * WINDOW)
        served.use_budgets((user,))
        taken = 0
        while taken < 2:
            await _until(pair.arrived, served.has_message)
            assert await served.read() is not None
            taken += 1
        # Past an eighth of its window received (GROW_SHIFT), the stream's window is the connection's,
        # and its peer fills it.
        assert served._recv_window == 4 * WINDOW
        await _until(pair.arrived, lambda: served._recv_left <= 0 and _held(served) >= 3 * WINDOW - FRAMED)
        assert max(user.held, served.exposure) <= 4 * WINDOW + FRAMED
