"""Standard input read in a daemon thread, so any kind of stdin works and exit never waits on it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading

from osmo_router.protocol import CHUNK_SIZE


class StdinReader:
    """Chunks of a file descriptor, delivered to the event loop with backpressure; b"" at EOF."""

    def __init__(self, fd: int = 0, depth: int = 4, chunk_size: int = CHUNK_SIZE) -> None:
        self._fd = fd
        self._chunk_size = chunk_size
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(depth)
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="stdin-reader", daemon=True)
        self._thread.start()

    async def read(self) -> bytes:
        """The next chunk; b"" once the input ended."""
        return await self._queue.get()

    def _run(self) -> None:
        while True:
            try:
                chunk = os.read(self._fd, self._chunk_size)
            except OSError:
                chunk = b""
            try:
                asyncio.run_coroutine_threadsafe(self._queue.put(chunk), self._loop).result()
            except (RuntimeError, concurrent.futures.CancelledError):
                return
            if not chunk:
                return


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to a (blocking) descriptor, ignoring a reader that went away."""
    view = memoryview(data)
    with contextlib.suppress(BrokenPipeError):
        while view:
            view = view[os.write(fd, view) :]
