"""HTTP/2 connections in both roles over a loopback socket: messages, windows, a stalled reader, resets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

from osmo_router.h2.connection import ConnectionClosed, H2Config, StreamReset
from osmo_router.h2.grpc import status_of, status_trailers
from tests.h2_pair import REQUEST, Pair, connected_pair


@pytest_asyncio.fixture
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    async with connected_pair(getattr(request, "param", H2Config(stream_window=256 * 1024))) as connected:
        yield connected


def _signal(obj: object, name: str) -> asyncio.Event:
    """An event set after every call of obj.name (wraps the method)."""
    event = asyncio.Event()
    original = getattr(obj, name)

    def wrapped(*args: object) -> object:
        result = original(*args)
        event.set()
        return result

    setattr(obj, name, wrapped)
    return event


async def _until(event: asyncio.Event, condition: Callable[[], bool]) -> None:
    while not condition():
        await event.wait()
        event.clear()


@pytest.mark.asyncio
async def test_messages_both_ways_with_trailers(pair: Pair) -> None:
    sizes = [0, 1, 70_000, 3 * 1024 * 1024]  # the last is larger than the 256 KiB window
    async with asyncio.timeout(10):
        stream = await pair.client.open_stream(REQUEST)
        served = await pair.streams.get()
        assert dict(served.headers or [])[":path"] == "/t.S/M"

        async def echo() -> None:
            served.send_headers([(":status", "200"), ("content-type", "application/grpc")])
            while (message := await served.read()) is not None:
                await served.write(message[::-1])
            served.end(status_trailers(0))

        task = asyncio.create_task(echo())
        for size in sizes:
            await stream.write(bytes(range(256)) * (size // 256) + b"z" * (size % 256))
        stream.end()
        got = []
        while (message := await stream.read()) is not None:
            got.append(message)
        await task
    assert [len(m) for m in got] == sizes
    assert got[2] == (bytes(range(256)) * (70_000 // 256) + b"z" * (70_000 % 256))[::-1]
    assert status_of(stream.trailers) == (0, "")
    assert not pair.client.streams  # closed on both sides: forgotten


@pytest.mark.asyncio
async def test_a_stalled_reader_holds_no_more_than_its_window(pair: Pair) -> None:
    window, message = 256 * 1024, b"m" * 16 * 1024
    async with asyncio.timeout(10):
        stalled = await pair.client.open_stream(REQUEST)
        served = await pair.streams.get()

        async def flood() -> int:
            for _ in range(200):  # 3.2 MiB: far beyond the window
                await stalled.write(message)
            return 200

        received = _signal(served, "_wake_reader")
        writer = asyncio.create_task(flood())
        await _until(received, lambda: served._queued >= window - len(message) - 5)
        # The server's application reads nothing: what it holds is what the window let in (a
        # message that began inside the window may complete past it).
        held = served._queued
        assert window - len(message) - 5 <= held <= window + len(message) + 5
        assert not writer.done()

        # The connection window was given back on receipt: another stream still flows.
        other = await pair.client.open_stream(REQUEST)
        other_served = await pair.streams.get()
        await other.write(b"x" * 100_000)
        assert await other_served.read() == b"x" * 100_000

        # Reading releases the writer, message by message.
        count = 0
        while count < 200:
            assert await served.read() == message
            count += 1
        assert await writer == 200


@pytest.mark.asyncio
async def test_a_reset_wakes_the_other_side(pair: Pair) -> None:
    async with asyncio.timeout(5):
        stream = await pair.client.open_stream(REQUEST)
        served = await pair.streams.get()
        gone = asyncio.Event()
        served.add_close_callback(lambda _f: gone.set())
        reader = asyncio.create_task(served.read())
        stream.reset()
        await gone.wait()
        with pytest.raises(StreamReset) as err:
            await reader
        assert err.value.code == 8  # CANCEL
        assert not pair.servers[0].streams


@pytest.mark.asyncio
async def test_connection_lost_resets_every_stream(pair: Pair) -> None:
    async with asyncio.timeout(5):
        stream = await pair.client.open_stream(REQUEST)
        served = await pair.streams.get()
        pair.client.abort()
        with pytest.raises(StreamReset):
            await served.read()
        with pytest.raises(StreamReset):
            await stream.read()


@pytest.mark.asyncio
@pytest.mark.parametrize("pair", [H2Config(max_message_size=1000)], indirect=True)
async def test_a_message_over_the_limit_is_resource_exhausted(pair: Pair) -> None:
    async with asyncio.timeout(5):
        stream = await pair.client.open_stream(REQUEST)
        await pair.streams.get()
        await stream.write(b"x" * 1001)
        # Trailers-only RESOURCE_EXHAUSTED, then RST_STREAM NO_ERROR: the client keeps the complete
        # response readable (RFC 9113 8.1) and reads its end instead of a reset.
        assert await stream.read() is None
        assert stream.trailers is not None and stream.closed_out
        assert status_of(stream.headers) == (8, "received message larger than max (1001 vs. 1000)")


@pytest.mark.asyncio
@pytest.mark.parametrize("pair", [H2Config(keepalive_time=0.05, keepalive_timeout=1.0)], indirect=True)
async def test_keepalive_pings_are_acked_and_the_connection_stays(pair: Pair) -> None:
    acked = _signal(pair.client._timers, "ping_acked")
    async with asyncio.timeout(5):
        for _ in range(3):
            await acked.wait()
            acked.clear()
    assert not pair.client.closed


@pytest.mark.asyncio
@pytest.mark.parametrize("pair", [H2Config(max_peer_resets_per_second=10)], indirect=True)
async def test_a_rapid_reset_flood_ends_the_connection(pair: Pair) -> None:
    """Streams opened and reset faster than the limit (100 allowed at once here): GOAWAY ENHANCE_YOUR_CALM."""
    async with asyncio.timeout(10):
        for _ in range(150):
            if pair.client.closed:
                break
            try:
                stream = await pair.client.open_stream(REQUEST)
            except ConnectionClosed:
                break
            stream.reset()
        await pair.client.wait_closed()
    assert pair.client.closed
    assert pair.streams.qsize() <= 110  # the server stopped taking streams near the limit


@pytest.mark.asyncio
async def test_try_write_sends_at_once_only_while_nothing_stands_in_the_way(pair: Pair) -> None:
    window = 256 * 1024
    async with asyncio.timeout(10):
        stream = await pair.client.open_stream(REQUEST)
        served = await pair.streams.get()
        assert not served.try_write(b"early")  # no response headers yet: the slow path sends them
        served.send_headers([(":status", "200"), ("content-type", "application/grpc")])
        assert served.try_write(b"one") and served.try_write(b"")
        assert await stream.read() == b"one" and await stream.read() == b""
        # The client reads nothing more: fill its window, then try_write must refuse (never queue).
        big = b"b" * (window // 4)
        sent = 0
        while served.try_write(big):
            sent += 1
        assert sent == 3 and served.unsent == 0  # 4 would overrun the window with the prefixes
        writer = asyncio.create_task(served.write(big))  # the slow path queues and waits
        await asyncio.sleep(0)
        assert served.unsent > 0 and not served.try_write(b"x")  # nothing jumps the queue
        for _ in range(4):
            assert await stream.read() == big
        await writer
        assert served.try_write(b"after")
        assert await stream.read() == b"after"
        served.end(status_trailers(0))
        assert not served.try_write(b"late")
        assert await stream.read() is None


@pytest.mark.asyncio
@pytest.mark.parametrize("pair", [H2Config(stream_window=64 << 20, connection_window=64 << 20)], indirect=True)
async def test_a_writer_held_by_a_paused_transport_wakes_when_the_connection_is_lost(pair: Pair) -> None:
    # A router that drains ends a call (trailers, then RST_STREAM NO_ERROR: stop sending) while the
    # client's transport is paused behind data it no longer reads, then exits. The writer of that
    # call, its stream over and forgotten by the connection, must not wait for a transport that is
    # gone: a resumed session's acknowledger did, holding the session's write lock (the resume stalled).
    async with asyncio.timeout(10):
        stream = await pair.client.open_stream(REQUEST)
        served = await pair.streams.get()
        server = pair.servers[0]
        assert server.transport is not None
        server.transport.pause_reading()  # the router reads no more
        paused = _signal(pair.client, "pause_writing")
        writer = asyncio.ensure_future(stream.write(b"x" * (32 << 20)))  # more than the socket buffers take
        await _until(paused, lambda: pair.client.write_paused)
        served.send_headers(status_trailers(14, "router draining", headers=True), end_stream=True)
        served.reset(0)  # NO_ERROR: the response is complete
        await stream.wait_closed()
        assert stream.reset_code is None and stream.closed_out and pair.client.write_paused
        assert not writer.done()
        server.abort()
        await pair.client.wait_closed()
        await writer  # returns: what was left unsent was dropped, as the server asked


# -- a stream's listener (Stream.set_listener, issue 18): messages taken as they arrive, in order,
# their window given back as if read, the reader woken only for what is left to it.

RESPONSE = [(":status", "200"), ("content-type", "application/grpc")]


@pytest.mark.asyncio
async def test_a_listener_takes_more_than_the_window_and_the_reader_is_never_woken(pair: Pair) -> None:
    # 64 messages of 32 KiB through a 256 KiB window: only the window given back for what the
    # listener took lets the sender finish.
    messages = [bytes([i]) * 32 * 1024 for i in range(64)]
    taken: list[bytes] = []
    arrived = asyncio.Event()

    def listener(message: bytes) -> bool:
        taken.append(message)
        arrived.set()
        return True

    async with asyncio.timeout(10):
        stream = await pair.client.open_stream(REQUEST)
        served = await pair.streams.get()
        served.set_listener(listener)
        reader = asyncio.create_task(served.read())
        for message in messages:
            await stream.write(message)
        while len(taken) < len(messages):
            await arrived.wait()
            arrived.clear()
        assert taken == messages
        assert not reader.done()  # nothing was left for it: never woken with nothing to read
        stream.end()
        assert await reader is None  # the end still reaches the reader
        served.send_headers(RESPONSE)
        served.end(status_trailers(0))


@pytest.mark.asyncio
async def test_a_declined_message_and_everything_behind_it_go_to_read_in_order(pair: Pair) -> None:
    taken: list[bytes] = []
    declined: list[bytes] = []

    def listener(message: bytes) -> bool:
        if message == b"two":
            declined.append(message)
            return False
        taken.append(message)
        return True

    async with asyncio.timeout(10):
        stream = await pair.client.open_stream(REQUEST)
        served = await pair.streams.get()
        served.set_listener(listener)
        await stream.write(b"one")
        await stream.write(b"two")
        await stream.write(b"three")  # the listener would take it, but "two" waits before it
        assert await served.read() == b"two"
        assert await served.read() == b"three"
        assert taken == [b"one"] and declined == [b"two"]
        await stream.write(b"four")  # nothing queued any more: the listener again
        stream.end()
        assert await served.read() is None
        assert taken == [b"one", b"four"]
        served.send_headers(RESPONSE)
        served.end(status_trailers(0))
