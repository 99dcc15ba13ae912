"""A stream's passthrough (Stream.set_passthrough, issue 18): a DATA payload that is exactly one whole
uncompressed message, arriving alone, goes on as received (prefix included, no parsing or copy);
anything else takes the usual path, in order, and the window goes back as if read."""

from __future__ import annotations

import asyncio

import pytest

from osmo_router.h2 import frames as fr
from osmo_router.h2.connection import H2Config
from osmo_router.h2.grpc import status_trailers
from osmo_router.h2.stream import Stream
from osmo_router.router.core.budget import ByteBudget
from tests.h2_pair import REQUEST, Pair
from tests.unit.test_h2_flow import RESPONSE, pair

__all__ = ["pair"]  # the fixture, imported for these tests


def framed(message: bytes, compressed: bool = False) -> bytes:
    return bytes([int(compressed)]) + len(message).to_bytes(4, "big") + message


class Arrivals:
    """What a served stream received, in order, and by which path: ("passed" | "read", framed message)."""

    def __init__(self, served: Stream, take: bool = True) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._event = asyncio.Event()
        self._take = take
        served.set_passthrough(self._passthrough)
        self._reader = asyncio.create_task(self._read_all(served))

    def _passthrough(self, payload: memoryview) -> bool:
        if not self._take or payload.tobytes() == framed(b"declined"):
            return False
        self.items.append(("passed", payload.tobytes()))  # (the view is valid only during the call)
        self._event.set()
        return True

    async def _read_all(self, served: Stream) -> None:
        while (message := await served.read()) is not None:
            self.items.append(("read", framed(message)))
            self._event.set()

    async def until(self, count: int) -> None:
        while len(self.items) < count:
            await self._event.wait()
            self._event.clear()

    def passed(self) -> int:
        return sum(path == "passed" for path, _ in self.items)

    async def ended(self) -> None:
        await self._reader


async def served_pair(pair: Pair) -> tuple[Stream, Stream]:
    stream = await pair.client.open_stream(REQUEST)
    return stream, await pair.streams.get()


async def finish(stream: Stream, served: Stream, arrivals: Arrivals) -> None:
    stream.end()
    await arrivals.ended()
    served.send_headers(RESPONSE)
    served.end(status_trailers(0))


#: No window growth, so no BDP pings whose acks would share a read with the data.
NO_BDP = H2Config(stream_window=256 * 1024, max_stream_window=256 * 1024)


@pytest.mark.parametrize("pair", [NO_BDP], indirect=True)
@pytest.mark.asyncio
async def test_whole_messages_pass_as_received_beyond_the_window(pair: Pair) -> None:
    # 64 messages of 8 KiB (one DATA frame each) through a 256 KiB window, one at a time: every one
    # passes, and the sender finishes only because their window went back as they passed.
    messages = [bytes([i]) * 8 * 1024 for i in range(64)]
    async with asyncio.timeout(10):
        stream, served = await served_pair(pair)
        arrivals = Arrivals(served)
        for count, message in enumerate(messages, 1):
            await stream.write(message)
            await arrivals.until(count)
        assert arrivals.items == [("passed", framed(m)) for m in messages]
        await finish(stream, served, arrivals)


@pytest.mark.parametrize("pair", [NO_BDP], indirect=True)
@pytest.mark.asyncio
async def test_the_budgets_count_a_passing_streams_exposure_after_every_message(pair: Pair) -> None:
    # pass_through counts the stream's exposure in its budgets itself between window updates (issue 18):
    # after every passed message, with or without an update sent for it, they count exactly what the
    # stream may still be made to hold.
    user, total = ByteBudget(64 << 20), ByteBudget(1 << 30)
    async with asyncio.timeout(10):
        stream, served = await served_pair(pair)
        served.use_budgets((user, total))
        arrivals = Arrivals(served)
        counted = []
        for count in range(1, 65):
            await stream.write(bytes(8 * 1024))
            await arrivals.until(count)
            counted.append((user.held, total.held, served.exposure))
        assert arrivals.passed() == 64
        assert all(u == t == exposure for u, t, exposure in counted), counted
        assert len({exposure for _, _, exposure in counted}) > 1  # it went down between updates
        await finish(stream, served, arrivals)


@pytest.mark.asyncio
async def test_what_is_not_one_whole_plain_message_takes_the_usual_path_in_order(pair: Pair) -> None:
    async with asyncio.timeout(10):
        stream, served = await served_pair(pair)
        arrivals = Arrivals(served)
        raw = pair.client.transport
        assert raw is not None
        # Two messages in one DATA frame, a compressed one, one split over two frames, one declined.
        split = framed(b"split in two")
        raw.write(fr.encode(fr.DATA, 0, stream.id, framed(b"two") + framed(b"in one")))
        raw.write(fr.encode(fr.DATA, 0, stream.id, framed(b"squeezed", compressed=True)))
        raw.write(fr.encode(fr.DATA, 0, stream.id, split[:7]))
        raw.write(fr.encode(fr.DATA, 0, stream.id, split[7:]))
        raw.write(fr.encode(fr.DATA, 0, stream.id, framed(b"declined")))
        await arrivals.until(5)
        expected = [framed(b"two"), framed(b"in one"), framed(b"squeezed"), split, framed(b"declined")]
        assert arrivals.items == [("read", content) for content in expected]
        assert served.compressed_received
        # Nothing queued any more: whole plain messages pass again.
        for count in range(6, 16):
            await stream.write(b"alone")
            await arrivals.until(count)
        assert arrivals.passed() > 0, arrivals.items
        await finish(stream, served, arrivals)


@pytest.mark.asyncio
async def test_a_declining_passthrough_leaves_every_message_to_read(pair: Pair) -> None:
    async with asyncio.timeout(10):
        stream, served = await served_pair(pair)
        arrivals = Arrivals(served, take=False)
        for count in range(1, 11):
            await stream.write(b"m%d" % count)
            await arrivals.until(count)
        assert arrivals.items == [("read", framed(b"m%d" % n)) for n in range(1, 11)]
        await finish(stream, served, arrivals)


class _HoldingTransport:
    """A transport that keeps what it is given by reference until it sends it later, as uvloop's does
    (and Python 3.12's) whenever the socket does not take a write at once (a busy peer): records each
    piece as held and as it was when written."""

    def __init__(self, real: asyncio.Transport) -> None:
        self._real = real
        self.held: list[tuple[bytes | bytearray | memoryview, bytes]] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.held.append((data, bytes(data)))
        self._real.write(data)

    def writelines(self, pieces: list[bytes | bytearray | memoryview]) -> None:
        for piece in pieces:
            self.write(piece)

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


@pytest.mark.parametrize("pair", [NO_BDP], indirect=True)
@pytest.mark.asyncio
async def test_a_passed_message_stays_intact_in_a_transport_that_sends_it_later(pair: Pair) -> None:
    # The passthrough's payload is a view of the connection's read buffer, valid during the call only:
    # what goes to the other stream's transport must not change when the next read reuses that buffer.
    from osmo_router.h2.writer import VectorWriter

    async with asyncio.timeout(10):
        stream, served = await served_pair(pair)
        served.send_headers(RESPONSE)
        conn = pair.servers[0]
        assert conn.transport is not None
        holding = _HoldingTransport(conn.transport)
        conn.transport = holding  # type: ignore[assignment]
        conn._output = VectorWriter(holding)  # type: ignore[arg-type]
        passed = 0

        def echo(payload: memoryview) -> bool:
            nonlocal passed
            sent = served.try_write_framed(payload)
            passed += sent
            return sent

        served.set_passthrough(echo)
        messages = [bytes([i]) * 8 * 1024 for i in range(8)]
        for message in messages:
            await stream.write(message)
            assert await stream.read() == message
        assert passed == len(messages)
        changed = [i for i, (piece, was) in enumerate(holding.held) if bytes(piece) != was]
        assert not changed, f"{len(changed)} of {len(holding.held)} pieces changed after they were written"
        served.set_passthrough(None)
        stream.end()
        assert await served.read() is None
        served.end(status_trailers(0))


@pytest.mark.asyncio
async def test_nothing_passes_after_the_peers_end_of_stream(pair: Pair) -> None:
    async with asyncio.timeout(10):
        stream, served = await served_pair(pair)
        arrivals = Arrivals(served)
        raw = pair.client.transport
        assert raw is not None
        raw.write(fr.encode(fr.DATA, fr.END_STREAM, stream.id, framed(b"last")))
        await arrivals.ended()  # read to the end: "last", then None
        # A DATA frame after END_STREAM (a broken or hostile peer) is the stream's error, never passed on.
        assert not served.pass_through(memoryview(framed(b"after the end")))
        assert arrivals.items == [("read", framed(b"last"))], arrivals.items
        served.send_headers(RESPONSE)
        served.end(status_trailers(0))
