"""Non-blocking reads and writes on raw file descriptors (PTY masters, pipes) from asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os


async def read_fd(fd: int, size: int) -> bytes:
    """Read up to `size` bytes; b"" at end of file (EIO on a PTY master whose slave closed)."""
    while (chunk := read_now(fd, size)) is None:
        await wait_readable(fd)
    return chunk


def read_now(fd: int, size: int) -> bytes | None:
    """Up to `size` bytes if there are any now; None if none yet; b"" at end of file (or EIO)."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError as err:
        if err.errno == errno.EIO:
            return b""
        raise


async def wait_readable(fd: int) -> None:
    """Return once `fd` has data or its end to read."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _set, waiter)
    try:
        await waiter
    finally:
        loop.remove_reader(fd)


async def gather_more(fd: int, chunk: bytes, size: int, linger: float, bulk: int = 16 * 1024) -> bytes:
    """`chunk`, plus (if it is a bulk read and `linger` is set) what arrives within `linger`, up to `size`."""
    if not linger or len(chunk) < bulk:
        return chunk
    parts, total = [chunk], len(chunk)
    while total < size:
        try:
            async with asyncio.timeout(linger):
                more = await read_fd(fd, size - total)
        except TimeoutError:
            break
        if not more:
            break  # EOF: the next read reports it
        parts.append(more)
        total += len(more)
    return b"".join(parts) if len(parts) > 1 else chunk


async def write_fd(fd: int, data: bytes) -> None:
    """Write all of `data`, waiting while the descriptor is full."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
            view = view[written:]
            continue
        except BlockingIOError:
            pass
        waiter: asyncio.Future[None] = loop.create_future()
        loop.add_writer(fd, _set, waiter)
        try:
            await waiter
        finally:
            loop.remove_writer(fd)


def _set(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def open_pipe(size: int | None = None) -> tuple[int, int]:
    """A pipe (read end, write end), both close-on-exec, enlarged to `size` bytes when the system allows.

    The parent's end is made non-blocking by the caller; the child's end stays blocking.
    """
    read_end, write_end = os.pipe()
    if size:
        # Beyond /proc/sys/fs/pipe-max-size, or past the user's pipe quota, the default size stays.
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, size)
    return read_end, write_end
