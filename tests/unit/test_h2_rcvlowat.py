"""SO_RCVLOWAT on large DATA frames (h2/reader.py): set while the rest of a large frame is due, back to 1
before any read that may need a frame header, never under TLS; and no peer can stall a connection on it.

These tests drive a server Connection as a transport does (get_buffer, buffer_updated, reading again at
once after a read that filled its buffer) with a recording socket; test_h2_rcvlowat_tcp.py runs real
connections over loopback TCP, on uvloop and on asyncio's own loop, with peers that trickle a frame or
close inside one.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
from collections.abc import Callable

import pytest

from osmo_router.h2 import frames as fr
from osmo_router.h2.connection import Connection, H2Config, Stream
from tests.unit.test_h2_reader import FakeTransport, message, opening, read_all

CONFIG = H2Config(stream_window=16 << 20, max_message_size=8 << 20)


class RecordingSocket:
    """Stands for a plain TCP socket: records every SO_RCVLOWAT set on it."""

    family, type = socket.AF_INET, socket.SOCK_STREAM

    def __init__(self) -> None:
        self.lowats: list[int] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        self.lowats.append(value)

    @property
    def lowat(self) -> int:
        return self.lowats[-1] if self.lowats else 1


class SocketTransport(FakeTransport):
    """A FakeTransport with a socket (and, for `tls`, an SSL context) among its extra info."""

    def __init__(self, tls: bool = False) -> None:
        super().__init__()
        self.sock = RecordingSocket()
        self.extra: dict[str, object] = {"socket": self.sock}
        if tls:
            self.extra["sslcontext"] = ssl.create_default_context()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.extra.get(name, default)

    def can_write_eof(self) -> bool:
        return False


def data_frames(body: bytes, sizes: list[int]) -> bytes:
    """One gRPC message on stream 1 in DATA frames of these payload sizes (the last takes the rest)."""
    wire, msg, pos = b"", message(body), 0
    for size in [*sizes, len(message(body))]:
        if pos >= len(msg):
            break
        wire += fr.encode(fr.DATA, 0, 1, msg[pos : pos + size])
        pos += size
    return wire


def payload_spans(wire: bytes) -> list[tuple[int, int]]:
    """Where the DATA payloads lie in `wire` (after the preface)."""
    spans, pos = [], len(fr.PREFACE)
    while pos < len(wire):
        word = int.from_bytes(wire[pos : pos + 3], "big")
        if wire[pos + 3] == fr.DATA:
            spans.append((pos + 9, pos + 9 + word))
        pos += 9 + word
    return spans


def frame_left(spans: list[tuple[int, int]], pos: int) -> int:
    """Payload bytes of the DATA frame under way at `pos` still to come (0: at a header or control frame)."""
    return next((end - pos for start, end in spans if start <= pos < end), 0)


def drive(conn: Connection, wire: bytes, arrivals: list[int], check: Callable[[int], None], whole: bool = True) -> None:
    """Feed `wire` as a transport would if its bytes arrived in these amounts (then the rest, if `whole`):
    it reads into the buffers handed out until a read comes back short (the socket drained), then
    `check(pos)` (it waits now)."""
    pos = 0
    for arrived in [*arrivals, len(wire)] if whole else arrivals:
        end = min(len(wire), pos + arrived)
        while True:
            target = conn.get_buffer(-1)  # (after a read that filled: the next attempt, EAGAIN if nothing)
            take = min(len(target), end - pos)
            if not take:
                break
            target[:take] = wire[pos : pos + take]
            pos += take
            conn.buffer_updated(take)
            if take < len(target):
                break
        check(pos)


def server(tls: bool = False) -> tuple[Connection, SocketTransport, list[Stream]]:
    opened: list[Stream] = []
    conn = Connection("server", CONFIG, on_stream=opened.append)
    transport = SocketTransport(tls)
    conn.connection_made(transport)
    conn._timers.cancel()
    return conn, transport, opened


@pytest.mark.asyncio
async def test_the_mark_is_the_rest_of_a_large_frame_and_goes_back_to_1_at_its_end() -> None:
    conn, transport, opened = server()
    body = os.urandom((1 << 20) - 5)
    frame = data_frames(body, [])  # one 1 MiB frame
    head = opening()
    # The header read drains the socket 1,000 payload bytes in; then 200,000 more arrive; then the rest.
    drive(conn, head + frame, [len(head) + 9 + 1000, 200_000], lambda pos: None)
    payload = len(message(body))
    assert transport.sock.lowats == [payload - 1000, payload - 201_000, 1]
    assert read_all(opened[0]) == [body]


@pytest.mark.asyncio
async def test_the_mark_never_exceeds_what_is_left_of_the_frame() -> None:
    # Every way the bytes may arrive: whenever the transport would wait, the mark is at most the rest
    # of the frame under way (whose bytes the sender is committed to), and 1 where a header is next.
    rng = random.Random(70)
    for _ in range(60):
        conn, transport, opened = server()
        bodies = [os.urandom(rng.choice([10, 70_000, 300_000, 1 << 20, 3 << 20])) for _ in range(4)]
        wire = opening()
        for body in bodies:
            sizes = [rng.choice([1 << 20, 200_000, 16_384, 130_000]) for _ in range(30)]
            wire += data_frames(body, sizes) + fr.encode(fr.PING, 0, 0, b"12345678")
        spans = payload_spans(wire)
        arrivals = [rng.choice([1, 9, 5000, 65_536, 300_000, 1 << 20]) for _ in range(200)]

        def check(pos: int, spans: list[tuple[int, int]] = spans, sock: RecordingSocket = transport.sock) -> None:
            assert sock.lowat <= max(1, frame_left(spans, pos)), pos

        drive(conn, wire, arrivals, check)
        assert transport.sock.lowat == 1
        assert read_all(opened[0]) == bodies


@pytest.mark.asyncio
async def test_small_messages_set_nothing() -> None:
    conn, transport, opened = server()
    bodies = [os.urandom(n) for n in (1, 100, 4000, 60_000) * 20]
    wire = opening() + b"".join(fr.encode(fr.DATA, 0, 1, message(b)) for b in bodies)
    drive(conn, wire, [random.Random(1).choice([7, 100, 5000, 70_000]) for _ in range(100)], lambda pos: None)
    assert transport.sock.lowats == []
    assert read_all(opened[0]) == bodies


@pytest.mark.asyncio
async def test_never_under_tls() -> None:
    conn, transport, opened = server(tls=True)
    body = os.urandom(3 << 20)
    head = opening()
    drive(conn, head + data_frames(body, [1 << 20] * 3), [len(head) + 100, 300_000, 5000], lambda pos: None)
    assert transport.sock.lowats == []
    assert read_all(opened[0]) == [body]


@pytest.mark.asyncio
async def test_closing_mid_frame_puts_the_mark_back() -> None:
    # Our own close lingers reading to the peer's EOF, dropping what comes: any byte may be the last.
    conn, transport, _ = server()
    head = opening()
    drive(conn, head + data_frames(os.urandom((1 << 20) - 5), []), [len(head) + 9 + 100], lambda pos: None, whole=False)
    assert transport.sock.lowat > 1
    conn.close()
    assert transport.sock.lowat == 1
    conn.connection_lost(None)


# -- real connections over loopback TCP --------------------------------------------------------------
