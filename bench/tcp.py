"""The TCP baselines of the load generator: the same bytes, in the same message sizes, through socat.

`socat TCP-LISTEN:0,fork,reuseaddr TCP:sink` forks one relay process per connection, like the
router holds one session per stream. The generator owns the sink (or the echo server) and the
sending ends, exactly as it owns both streams of a router session.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator

from bench.wire import WAIT


@contextlib.asynccontextmanager
async def socat_relay(target_port: int) -> AsyncIterator[int]:
    """A socat relay to 127.0.0.1:target_port; yields the port it listens on."""
    proc = await asyncio.create_subprocess_exec(
        "socat",
        "-d",
        "-d",
        "TCP-LISTEN:0,fork,reuseaddr,bind=127.0.0.1",
        f"TCP:127.0.0.1:{target_port}",
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    assert proc.stderr is not None
    stderr = proc.stderr
    port = 0
    async with asyncio.timeout(WAIT):
        while not port:
            line = await stderr.readline()
            if not line:
                raise RuntimeError("socat exited before listening")
            if match := re.search(rb"listening on .*:(\d+)\s*$", line):
                port = int(match.group(1))

    async def drain() -> None:
        while await stderr.readline():
            pass

    drainer = asyncio.create_task(drain())
    try:
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()
        await drainer


class _Sink(asyncio.Protocol):
    """Counts the bytes of one connection; notes when it ended."""

    def __init__(self, counted: list[int], ended: asyncio.Queue[float]) -> None:
        self._counted = counted
        self._ended = ended

    def data_received(self, data: bytes) -> None:
        self._counted[0] += len(data)

    def eof_received(self) -> bool:
        self._ended.put_nowait(time.perf_counter())
        return False


class _Echo(asyncio.Protocol):
    """Sends every byte back."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport: asyncio.WriteTransport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._transport.write(data)


async def tcp_throughput(args: argparse.Namespace) -> None:
    """Payload MB/s through socat, `sessions` connections at once, `size`-byte writes."""
    from bench.loadgen import emit

    loop = asyncio.get_running_loop()
    counted = [0]
    ended: asyncio.Queue[float] = asyncio.Queue()
    server = await loop.create_server(lambda: _Sink(counted, ended), "127.0.0.1", 0)
    sink_port = server.sockets[0].getsockname()[1]
    message = os.urandom(args.size)
    async with socat_relay(sink_port) as port:
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(args.sessions)]
        stop = time.perf_counter() + args.seconds

        async def send(writer: asyncio.StreamWriter) -> None:
            while time.perf_counter() < stop:
                for _ in range(16):
                    writer.write(message)
                    await writer.drain()
            writer.write_eof()

        start = time.perf_counter()
        await asyncio.gather(*(send(w) for _, w in conns))
        async with asyncio.timeout(WAIT):
            last = max([await ended.get() for _ in conns])
        emit({"bytes": counted[0], "seconds": last - start, "mbps": counted[0] / (last - start) / 1e6})
        for _, writer in conns:
            writer.close()
    server.close()


async def tcp_echo(args: argparse.Namespace) -> None:
    """1-byte round trips through socat to an echo server, one at a time."""
    from bench.loadgen import _timed, emit

    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Echo, "127.0.0.1", 0)
    async with socat_relay(server.sockets[0].getsockname()[1]) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def once() -> None:
            writer.write(b"x")
            await reader.readexactly(1)

        emit({"samples_us": await _timed(args.rounds, once, warmup=50)})
        writer.close()
    server.close()
