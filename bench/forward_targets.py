"""Targets for the port-forward benchmark: a byte source and an asyncio echo server, in threads."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Wait (bounded) until something accepts connections on the port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


class BulkServer:
    """A bulk-transfer target: a connection that sends b"D" gets `total` bytes; b"U" sends `total` bytes
    and gets b"ok" once all arrived.

    Runs in its own process: in the measuring process its threads would compete for the GIL with
    the measuring thread and skew the figures.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.forward_targets", "bulk", str(total)],
            stdout=subprocess.PIPE,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        assert self._proc.stdout is not None
        self.port = int(self._proc.stdout.readline())

    def __enter__(self) -> BulkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._proc.terminate()
        self._proc.wait(10)


def _bulk_connection(conn: socket.socket, total: int, block: memoryview) -> None:
    with conn, contextlib.suppress(OSError):
        mode = conn.recv(1)
        left = total
        if mode == b"D":
            while left > 0:
                chunk = block[: min(left, len(block))]
                conn.sendall(chunk)
                left -= len(chunk)
        elif mode == b"U":
            buf = bytearray(len(block))
            while left > 0:
                got = conn.recv_into(buf)
                if not got:
                    return
                left -= got
            conn.sendall(b"ok")


def serve_bulk(total: int) -> None:
    """Accept connections forever, each served by a thread (see BulkServer)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    print(listener.getsockname()[1], flush=True)
    block = memoryview(bytes(range(256)) * 4096)  # 1 MiB
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=_bulk_connection, args=(conn, total, block), daemon=True).start()


class EchoServer:
    """An asyncio echo server on its own event loop thread (cheap per connection, for 1,000 at once)."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.Server | None = None
        self.port = 0

    def __enter__(self) -> EchoServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("echo server did not start")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._echo, "127.0.0.1", 0, backlog=4096))
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._ready.set()
        self._loop.run_forever()
        self._server.close()

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["bulk"]:
        serve_bulk(int(sys.argv[2]))
