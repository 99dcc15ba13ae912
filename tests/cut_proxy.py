"""A TCP proxy on loopback that a test can cut (drop every connection, refuse new ones) and restore.

It runs an asyncio loop in a thread of its own, so synchronous tests drive it with plain calls.
`cut()` returns once every connection is aborted (a reset to both ends) and the port refuses
connections; `restore()` once the same port accepts again.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
#: Longest a control call (start, cut, restore, close) may take.
CONTROL_TIMEOUT = 10.0


class CutProxy:
    """127.0.0.1:port -> target, with cut() and restore()."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="cut-proxy", daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.connections = 0
        self._call(self._listen())

    @property
    def address(self) -> str:
        """host:port to dial instead of the target."""
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Abort every connection and refuse new ones."""
        self._call(self._cut())

    def restore(self) -> None:
        """Accept connections again, on the same port."""
        self._call(self._listen())

    def close(self) -> None:
        """Cut and stop the thread."""
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers.update((writer, up_writer))
        try:
            await self._relay(reader, writer, up_reader, up_writer)
        finally:
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        """Both directions of one connection, until both ended (a subclass may hold one back)."""
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (OSError, asyncio.IncompleteReadError):
        # One end reset (a router SIGKILLed with unread data): reset the other, as a real path does.
        # Left open, a peer that had nothing to send (a client waiting for flow-control credit, or
        # for the SETTINGS of a connection the router reset) heard nothing until its keepalive or
        # connect timeout, 20 s later.
        writer.transport.abort()
