"""SO_RCVLOWAT on large DATA frames over real loopback TCP (h2/reader.py; the logic: test_h2_rcvlowat.py).

Real connections on uvloop and on asyncio's own loop: large messages arrive intact with the mark in effect
(also with a small, locked receive buffer), a peer that trickles a frame in pieces is read, a peer gone in
the middle of a frame is seen at once, and no mark is ever set under TLS.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from osmo_router.h2.connection import Connection, Stream
from osmo_router.h2.reader import LOWAT_MAX, LOWAT_MIN, FrameReader
from tests.h2_pair import connected_pair
from tests.security_kit import loopback_tls
from tests.unit.test_h2_rcvlowat import CONFIG
from tests.unit.test_h2_reader import REQUEST

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "uvloop": uvloop.new_event_loop,
    "asyncio": asyncio.new_event_loop,
}


def run(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(main())  # type: ignore[arg-type]


@pytest.fixture
def marks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every SO_RCVLOWAT the readers set (as they set it)."""
    seen: list[int] = []
    original = FrameReader._set_lowat

    def recording(self: FrameReader, value: int) -> None:
        seen.append(value)
        original(self, value)

    monkeypatch.setattr(FrameReader, "_set_lowat", recording)
    yield seen


class Trickle:
    """A TCP relay that passes the client's bytes on in `piece`s with a pause after each (a peer that
    sends a large frame slowly); with `cut_after`, it ends both connections once that many have passed
    (FIN, or RST with `reset`): a peer gone in the middle of a frame."""

    def __init__(self, target: int, piece: int, pause: float, cut_after: int = 0, reset: bool = False) -> None:
        self.target, self.piece, self.pause = target, piece, pause
        self.cut_after, self.reset = cut_after, reset
        self.cut = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        self.writers += [writer, up_writer]
        back = asyncio.create_task(self._copy(up_reader, writer))
        self.tasks.add(back)
        passed = 0
        try:
            while data := await reader.read(self.piece):
                if self.cut_after and passed + len(data) >= self.cut_after:
                    up_writer.write(data[: self.cut_after - passed])
                    await up_writer.drain()
                    self._end(up_writer)
                    self._end(writer)
                    self.cut.set()
                    return
                passed += len(data)
                up_writer.write(data)
                await up_writer.drain()
                await asyncio.sleep(self.pause)  # (the peer's own pace: what the test is about)
            up_writer.write_eof()
        finally:
            back.cancel()

    def _end(self, writer: asyncio.StreamWriter) -> None:
        if self.reset:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        writer.transport.abort() if self.reset else writer.close()

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()

    async def close(self) -> None:
        """Everything of the relay ends (the test's event loop can then close)."""
        for task in self.tasks:
            task.cancel()
        for writer in self.writers:
            writer.transport.abort()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


BODIES = [os.urandom(n) for n in (3 << 20, 1 << 20, 5, (2 << 20) + 17, 3 << 20)]


async def send_and_check(client: Connection, served: asyncio.Queue[Stream]) -> None:
    """Several MiB-sized messages (several frames each, the last one at the end of all) arrive intact."""
    stream = await client.open_stream(REQUEST)
    for body in BODIES:
        await stream.write(body)
    echo = await served.get()
    for body in BODIES:
        assert await echo.read() == body


@pytest.mark.parametrize("rcvbuf", [0, 32 << 10], ids=["autotuned", "small-locked-rcvbuf"])
@pytest.mark.parametrize("loop", LOOPS)
def test_large_messages_arrive_intact_over_tcp(loop: str, rcvbuf: int, marks: list[int]) -> None:
    # Frames of 1 MiB, larger than the socket's receive buffer at first (tcp_rmem's default, 128 KiB
    # here) or for good (a locked 32 KiB SO_RCVBUF: the kernel caps the mark at half the buffer).
    async def main() -> None:
        async with connected_pair(CONFIG, rcvbuf=rcvbuf) as connected, asyncio.timeout(30):
            await send_and_check(connected.client, connected.streams)
            sock = connected.servers[0].transport.get_extra_info("socket")  # type: ignore[union-attr]
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1  # (nothing left due)

    run(loop, main)
    assert any(mark >= LOWAT_MIN for mark in marks)  # (the mark was in effect on the way)
    assert max(marks) <= LOWAT_MAX


@pytest.mark.parametrize("loop", LOOPS)
def test_a_peer_sending_a_frame_slowly_in_pieces(loop: str, marks: list[int]) -> None:
    async def main() -> None:
        trickles: list[Trickle] = []

        async def via(port: int) -> int:
            trickles.append(Trickle(port, piece=96 << 10, pause=0.002))
            return await trickles[0].start()

        async with connected_pair(CONFIG, via=via) as connected:
            try:
                async with asyncio.timeout(30):
                    await send_and_check(connected.client, connected.streams)
            finally:
                await trickles[0].close()

    run(loop, main)
    assert any(mark >= LOWAT_MIN for mark in marks)


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
@pytest.mark.parametrize("loop", LOOPS)
def test_a_peer_gone_in_the_middle_of_a_frame_is_seen_at_once(loop: str, reset: bool, marks: list[int]) -> None:
    async def main() -> None:
        trickles: list[Trickle] = []

        async def via(port: int) -> int:
            # 1.5 MiB in: inside the second 1 MiB DATA frame of the first message.
            trickles.append(Trickle(port, piece=64 << 10, pause=0.002, cut_after=(3 << 20) // 2, reset=reset))
            return await trickles[0].start()

        async with connected_pair(CONFIG, via=via) as connected:
            conn = connected.servers[0]
            try:
                stream = await connected.client.open_stream(REQUEST)
                writing = asyncio.create_task(stream.write(BODIES[0]))
                async with asyncio.timeout(10):
                    await trickles[0].cut.wait()
                    assert any(mark >= LOWAT_MIN for mark in marks)  # waiting on the rest of the frame
                    await conn.wait_closed()  # the EOF (or the reset) woke the reader at once
                    assert conn.closed
                writing.cancel()
            finally:
                await trickles[0].close()

    run(loop, main)


def test_over_tls_no_mark_is_set(tmp_path: Path, marks: list[int]) -> None:
    server_tls, client_tls = loopback_tls(tmp_path)

    async def main() -> None:
        async with connected_pair(CONFIG, tls=(server_tls, client_tls)) as connected, asyncio.timeout(30):
            await send_and_check(connected.client, connected.streams)

    run("uvloop", main)
    assert marks == []
