"""The receive path (h2/reader.py, Stream's assembly): messages split across transport reads anywhere.

A server-role Connection is driven as asyncio's transports drive a BufferedProtocol (get_buffer,
then buffer_updated with how much was read into it), with the reads cut at every byte: frame
headers, gRPC prefixes and payloads split between reads, messages split between DATA frames,
padded frames, and an oversized message refused before anything is allocated for it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path

import hpack
import pytest

from osmo_router.h2 import frames as fr
from osmo_router.h2 import inbound as stream_module
from osmo_router.h2.connection import Connection, H2Config, Stream
from osmo_router.h2.reader import HEADER_READ, QUIET_AFTER, READ_SIZE
from osmo_router.h2.writer import VectorWriter
from tests.security_kit import loopback_tls

REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/t.S/M"), (":authority", "x"), ("te", "trailers")]


class FakeTransport:
    """Records what the connection writes (the test reads the frames back)."""

    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, pieces: Iterable[bytes]) -> None:
        for piece in pieces:
            self.out += piece

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def frames(self) -> list[fr.Frame]:
        return list(fr.FrameParser(fr.MAX_FRAME_LIMIT).feed(bytes(self.out)))


def message(body: bytes) -> bytes:
    """One gRPC length-prefixed message."""
    return b"\x00" + len(body).to_bytes(4, "big") + body


def opening() -> bytes:
    """The client's preface, SETTINGS and the request HEADERS of stream 1."""
    block = hpack.Encoder().encode(REQUEST)
    return fr.PREFACE + fr.encode_settings({}) + fr.encode(fr.HEADERS, fr.END_HEADERS, 1, block)


def padded(payload: bytes, pad: int, flags: int = 0) -> bytes:
    """A PADDED DATA frame on stream 1."""
    return fr.encode(fr.DATA, flags | fr.PADDED, 1, bytes([pad]) + payload + b"\0" * pad)


async def deliver(wire: bytes, cuts: Iterable[int], config: H2Config | None = None) -> tuple[Connection, Stream]:
    """A server connection fed `wire` in reads ending at `cuts` (then the rest); its stream 1."""
    opened: list[Stream] = []
    conn = Connection("server", config or H2Config(), on_stream=opened.append)
    transport = FakeTransport()
    conn.connection_made(transport)
    pos = 0
    for end in [*sorted(set(cuts)), len(wire)]:
        while pos < end:  # one read may fill several buffers, as a transport's loop would
            target = conn.get_buffer(-1)
            take = min(len(target), end - pos)
            target[:take] = wire[pos : pos + take]
            pos += take
            conn.buffer_updated(take)
    conn._timers.cancel()
    return conn, opened[0]


def read_all(stream: Stream) -> list[bytes]:
    out = []
    while (got := stream.read_nowait()) is not None:
        assert isinstance(got, bytes)
        out.append(got)
    return out


BIG = bytes(range(256)) * 3  # split across frames below


def wires() -> dict[str, tuple[bytes, list[bytes]]]:
    """Named wires (after the opening) and the messages each carries."""
    small, empty = b"hello", b""
    both = message(BIG)
    return {
        "one frame per message": (
            fr.encode(fr.DATA, 0, 1, message(small)) + fr.encode(fr.DATA, 0, 1, message(BIG)),
            [small, BIG],
        ),
        "messages across frames": (
            fr.encode(fr.DATA, 0, 1, message(small) + both[:3])  # the big one's prefix split
            + fr.encode(fr.DATA, 0, 1, both[3:400])
            + fr.encode(fr.DATA, 0, 1, b"")
            + fr.encode(fr.DATA, 0, 1, both[400:] + message(empty) + message(small)),
            [small, BIG, empty, small],
        ),
        "padded frames": (
            padded(message(small) + both[:2], 7)
            + fr.encode(fr.DATA, 0, 1, both[2:500])
            + padded(both[500:], 200)
            + padded(b"", 0),
            [small, BIG],
        ),
    }


@pytest.mark.asyncio
@pytest.mark.parametrize("name", list(wires()))
async def test_messages_split_at_every_byte_come_out_whole(name: str) -> None:
    data, expected = wires()[name]
    head = opening()
    wire = head + data + fr.encode(fr.DATA, fr.END_STREAM, 1, b"")
    for cut in range(len(head), len(wire)):
        conn, stream = await deliver(wire, [cut])
        assert read_all(stream) == expected, cut
        assert stream.ended_in, cut
        assert not [f for f in FakeTransport.frames(conn.transport) if f.kind in (fr.RST_STREAM, fr.GOAWAY)]  # type: ignore[arg-type]


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["messages across frames", "padded frames"])
async def test_byte_by_byte_reads_and_the_window_given_back(name: str) -> None:
    # (padded frames: their padding counts against the stream's window, and is given back with the data)
    data, expected = wires()[name]
    window = 1024
    conn, stream = await deliver(opening() + data, range(len(opening()) + len(data)), H2Config(stream_window=window))
    assert read_all(stream) == expected
    await asyncio.sleep(0)  # the turn ends: the window updates it deferred are written (core.py send_window_update)
    frames = FakeTransport.frames(conn.transport)  # type: ignore[arg-type]
    granted = sum(int.from_bytes(f.payload, "big") for f in frames if f.kind == fr.WINDOW_UPDATE and f.stream_id == 1)
    flow = sum(f.flow for f in fr.FrameParser().feed(data))
    # Everything was read: all of it was given back but less than the quarter window a grant waits for.
    assert granted > 0
    assert 0 <= flow - granted < window // 4
    assert stream._recv_left == window - flow + granted


@pytest.mark.asyncio
async def test_a_large_message_is_read_straight_into_place() -> None:
    body = (bytes(range(256)) * 4096)[:-5]  # one frame of 1 MiB, the largest we accept
    head = opening() + fr.header(fr.DATA, 0, 1, len(body) + 5) + message(body)[:5]
    conn, stream = await deliver(head, [])
    target = conn.get_buffer(-1)
    assert len(target) == len(body)  # the message itself, not the read buffer
    target[:] = body
    conn.buffer_updated(len(body))
    assert read_all(stream) == [body]


def record_allocations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lengths of the messages streams allocate from now on (h2/stream.py's new_message)."""
    allocated: list[int] = []
    original = stream_module.new_message

    def recording(length: int) -> tuple[bytes | bytearray, memoryview]:
        allocated.append(length)
        return original(length)

    monkeypatch.setattr(stream_module, "new_message", recording)
    return allocated


@pytest.mark.asyncio
async def test_an_oversized_message_is_refused_before_it_is_allocated(monkeypatch: pytest.MonkeyPatch) -> None:
    allocated = record_allocations(monkeypatch)
    config = H2Config(max_message_size=1000)
    announced = b"\x00" + (1 << 30).to_bytes(4, "big")
    for wire in (fr.encode(fr.DATA, 0, 1, announced + b"x" * 100), padded(announced, 3)):
        conn, stream = await deliver(opening() + wire, [len(opening()) + 12], config)
        assert stream.reset_code is not None
        frames = FakeTransport.frames(conn.transport)  # type: ignore[arg-type]
        assert any(f.kind == fr.RST_STREAM and f.stream_id == 1 for f in frames)
    assert allocated == []


@pytest.mark.asyncio
async def test_bulk_messages_over_tls_arrive_intact(tmp_path: Path) -> None:
    # The loop's TLS transport drives a BufferedProtocol too: decrypted bytes land in the messages.
    server_tls, client_tls = loopback_tls(tmp_path)
    loop = asyncio.get_running_loop()
    served: asyncio.Queue[Stream] = asyncio.Queue()
    server = await loop.create_server(
        lambda: Connection("server", on_stream=served.put_nowait), "127.0.0.1", 0, ssl=server_tls
    )
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(
        lambda: Connection("client"), "127.0.0.1", port, ssl=client_tls, server_hostname="localhost"
    )
    bodies = [os.urandom(size) for size in (1, 70_000, (1 << 20) - 5, 3 << 20)]
    try:
        async with asyncio.timeout(30):
            await client.ready()
            stream = await client.open_stream(REQUEST)
            echo = await served.get()
            for body in bodies:
                await stream.write(body)
                got = await echo.read()
                assert got == body
                await echo.write(got)
                assert await stream.read() == body
    finally:
        client.close()
        server.close()
        await server.wait_closed()


@pytest.mark.asyncio
async def test_the_read_buffer_grows_while_busy_and_shrinks_when_quiet() -> None:
    conn, stream = await deliver(opening(), [])
    assert len(conn.get_buffer(-1)) <= HEADER_READ  # an idle connection holds a small buffer
    target = conn.get_buffer(-1)
    filling = b"f" * (len(target) - 14)
    target[:] = fr.encode(fr.DATA, 0, 1, message(filling))  # a read that fills what it was offered: busy
    conn.buffer_updated(len(target))
    assert len(conn.get_buffer(-1)) >= READ_SIZE // 4
    frame = fr.encode(fr.DATA, 0, 1, message(b"x"))
    for _ in range(QUIET_AFTER + 1):  # small reads: quiet again
        target = conn.get_buffer(-1)
        target[: len(frame)] = frame
        conn.buffer_updated(len(frame))
    assert len(conn.get_buffer(-1)) <= HEADER_READ
    assert read_all(stream) == [filling] + [b"x"] * (QUIET_AFTER + 1)


class PausingTransport(FakeTransport):
    """Pauses the connection's writing on a write while `pause_on_write` is set (a full socket)."""

    def __init__(self) -> None:
        super().__init__()
        self.conn: Connection | None = None
        self.pause_on_write = False

    def writelines(self, pieces: Iterable[bytes]) -> None:
        super().writelines(pieces)
        if self.pause_on_write and self.conn is not None:
            self.conn.pause_writing()


@pytest.mark.asyncio
async def test_a_writer_blocked_by_the_window_wakes_when_its_data_left_during_a_pause() -> None:
    # The writer waits for the peer's window; a pause and resume of the transport pass meanwhile; the
    # window opens and its data goes out but the transport pauses again: the next resume wakes it.
    conn, stream = await deliver(opening(), [])
    transport = PausingTransport()
    conn.transport, transport.conn = transport, conn
    conn._output = VectorWriter(transport)  # type: ignore[arg-type]
    stream.send_headers([(":status", "200")])
    stream.write_nowait(bytes(100_000))  # more than the first 65,535-byte window
    assert stream.unsent
    writer = asyncio.create_task(stream.drained())
    async with asyncio.timeout(5):
        await asyncio.sleep(0)  # one turn of the loop: the writer now waits in drained()
        assert stream in conn.drain_waiters
        conn.pause_writing()
        conn.resume_writing()
        transport.pause_on_write = True
        larger_frames = fr.encode_settings({fr.SETTINGS_MAX_FRAME_SIZE: 1 << 20})  # the rest in one write
        grant = larger_frames + fr.window_update(0, 1 << 20) + fr.window_update(1, 1 << 20)
        target = conn.get_buffer(-1)
        target[: len(grant)] = grant
        conn.buffer_updated(len(grant))
        assert not stream.unsent and conn.write_paused and not writer.done()
        transport.pause_on_write = False
        conn.resume_writing()
        await writer


@pytest.mark.asyncio
async def test_a_message_larger_than_the_window_is_not_allocated_ahead_of_its_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    allocated = record_allocations(monkeypatch)
    window, body = 4096, os.urandom(10_000)  # announced: more than the peer may send
    wire = message(body)
    head = opening() + fr.encode(fr.DATA, 0, 1, wire[:3000])
    conn, stream = await deliver(head, [], H2Config(stream_window=window))
    assert allocated == []
    assert len(conn.get_buffer(-1)) != len(body) - 2995  # the read buffer, not the message
    # The rest arrives as the window is given back (the peer may send once bytes are returned).
    for pos in range(3000, len(wire), 3000):
        chunk = fr.encode(fr.DATA, 0, 1, wire[pos : pos + 3000])
        target = conn.get_buffer(-1)
        target[: len(chunk)] = chunk
        conn.buffer_updated(len(chunk))
        assert stream.reset_code is None
    assert read_all(stream) == [body]
    assert allocated == []
