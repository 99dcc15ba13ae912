"""A long link on loopback: a TCP relay that delays every byte by a fixed one-way time.

Used where a test or benchmark needs a path whose round trip is long (bulk throughput through HTTP/2
flow-control windows): no netem here (the kernel has no sch_netem), so the delay is made in user
space. Each direction keeps at most `--buffer-bytes` in flight (read stops until the far end took
some), like a link whose capacity is that many bytes per one-way delay.

    python -m tests.delay_link --target 127.0.0.1:PORT --delay-ms 20    # prints "listening PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections import deque

READ_SIZE = 256 * 1024


class _Direction:
    """Bytes read from one end, written to the other `delay` seconds later."""

    def __init__(self, delay: float, buffer_bytes: int) -> None:
        self.delay = delay
        self.buffer_bytes = buffer_bytes
        self.chunks: deque[tuple[float, bytes]] = deque()
        self.held = 0
        self.arrived = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def read_from(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        while data := await reader.read(READ_SIZE):
            self.chunks.append((loop.time() + self.delay, data))
            self.held += len(data)
            self.arrived.set()
            while self.held >= self.buffer_bytes:
                self.room.clear()
                await self.room.wait()
        self.chunks.append((loop.time() + self.delay, b""))  # the end, delayed like the data
        self.arrived.set()

    async def write_to(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.chunks:
                self.arrived.clear()
                await self.arrived.wait()
            due, data = self.chunks.popleft()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
            self.held -= len(data)
            self.room.set()


async def _relay(
    delay: float, buffer_bytes: int, target: tuple[str, int], client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    reader, writer = client
    try:
        up_reader, up_writer = await asyncio.open_connection(*target)
    except OSError:
        writer.close()
        return
    up, down = _Direction(delay, buffer_bytes), _Direction(delay, buffer_bytes)
    tasks = [
        asyncio.create_task(up.read_from(reader)),
        asyncio.create_task(up.write_to(up_writer)),
        asyncio.create_task(down.read_from(up_reader)),
        asyncio.create_task(down.write_to(writer)),
    ]
    try:
        await asyncio.gather(*tasks)
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        for task in tasks:
            task.cancel()
        writer.close()
        up_writer.close()


async def start(target: tuple[str, int], delay: float, buffer_bytes: int = 64 << 20) -> asyncio.Server:
    """A delay link on a free loopback port (server.sockets[0]) relaying every connection to `target`."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _relay(delay, buffer_bytes, target, (reader, writer))

    return await asyncio.start_server(on_client, "127.0.0.1", 0)


async def serve(target: tuple[str, int], delay: float, buffer_bytes: int) -> None:
    """Listen on a free loopback port (printed as "listening PORT") and relay every connection."""
    server = await start(target, delay, buffer_bytes)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="host:port to relay to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay (the round trip is twice it)")
    parser.add_argument("--buffer-bytes", type=int, default=64 << 20, help="most bytes in flight per direction")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    asyncio.run(serve((host, int(port)), args.delay_ms / 1000, args.buffer_bytes))


if __name__ == "__main__":
    main()
