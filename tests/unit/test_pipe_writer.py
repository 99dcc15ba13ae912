"""PipeWriter on real pipes: every byte in order, the thread path and the fast path never overtake each other."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from pathlib import Path

import pytest

from osmo_router.io.pipe_writer import PipeWriter

pytestmark = pytest.mark.asyncio


def _drain(fd: int, out: list[bytes], step: int = 4096) -> threading.Thread:
    """Read fd to EOF in small reads (a slow reader keeps the pipe full), collecting the bytes."""

    def run() -> None:
        while chunk := os.read(fd, step):
            out.append(chunk)
        os.close(fd)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def test_large_and_small_writes_arrive_whole_and_in_order() -> None:
    read_end, write_end = os.pipe()
    writer = PipeWriter(write_end)
    received: list[bytes] = []
    reader = _drain(read_end, received)
    pieces = [os.urandom(1024 * 1024), b"k", os.urandom(300_000), b"x" * 10, os.urandom(2 * 1024 * 1024)]
    for piece in pieces:
        await asyncio.wait_for(writer.write(piece), 30)
    writer.close()
    await asyncio.wait_for(asyncio.to_thread(reader.join), 30)
    assert hashlib.sha256(b"".join(received)).digest() == hashlib.sha256(b"".join(pieces)).digest()


async def test_a_cancelled_write_is_not_overtaken_by_the_next() -> None:
    read_end, write_end = os.pipe()
    writer = PipeWriter(write_end)
    big = os.urandom(4 * 1024 * 1024)  # far more than the pipe holds: the thread gets the rest
    pending = asyncio.create_task(writer.write(big))
    await asyncio.sleep(0)  # the fast path has run and handed the remainder to the thread
    pending.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pending
    received: list[bytes] = []
    reader = _drain(read_end, received)
    await asyncio.wait_for(writer.write(b"after"), 30)
    writer.close()
    await asyncio.wait_for(asyncio.to_thread(reader.join), 30)
    assert b"".join(received) == big + b"after"


async def test_a_reader_that_went_away_gives_broken_pipe() -> None:
    read_end, write_end = os.pipe()
    writer = PipeWriter(write_end)
    os.close(read_end)
    with pytest.raises(BrokenPipeError):
        await asyncio.wait_for(writer.write(b"data"), 10)
    writer.close()


async def test_a_reader_that_leaves_mid_write_fails_the_write_and_frees_the_descriptor() -> None:
    read_end, write_end = os.pipe()
    pipe = _target(write_end)
    writer = PipeWriter(write_end)
    pending = asyncio.create_task(writer.write(os.urandom(4 * 1024 * 1024)))
    await asyncio.sleep(0)
    os.close(read_end)
    with pytest.raises(BrokenPipeError):
        await asyncio.wait_for(pending, 10)
    writer.close()
    # The thread closes the descriptor once it has the close; bounded polling of an observable state.
    for _ in range(200):
        if _target(write_end) != pipe:
            break
        await asyncio.sleep(0.01)
    assert _target(write_end) != pipe
    with pytest.raises(BrokenPipeError):
        await writer.write(b"late")


def _target(fd: int) -> str | None:
    """What the descriptor refers to ("pipe:[inode]"), None once closed (a reused number differs)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


async def test_a_shared_descriptor_stays_blocking_and_open_and_a_full_pipe_does_not_hold_the_loop() -> None:
    read_end, write_end = os.pipe()
    pipe = _target(write_end)
    writer = PipeWriter(write_end, shared=True, name="shared-writer-under-test")
    big = os.urandom(4 * 1024 * 1024)  # far more than the pipe holds
    loop_ran = threading.Event()
    received: list[bytes] = []
    waited: list[bool] = []

    def read() -> None:
        # Reads only once the loop ran past the write; a loop held by the write never gets there,
        # so after 10 s this reads anyway (unblocking it) and the test fails on `waited`.
        waited.append(loop_ran.wait(10))
        _read_until(read_end, len(big) + 4, received)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    pending = asyncio.create_task(writer.write(big))
    await asyncio.sleep(0.01)  # the write starts here (a blocking one would hold the loop in it)
    loop_ran.set()
    small = asyncio.create_task(writer.write(b"tail"))  # queued behind it, never ahead
    await asyncio.wait_for(asyncio.gather(pending, small), 30)
    await asyncio.wait_for(asyncio.to_thread(reader.join), 30)
    assert waited == [True], "the write held the event loop until the pipe was read"
    assert b"".join(received) == big + b"tail"
    writer.close()
    (thread,) = [t for t in threading.enumerate() if t.name == "shared-writer-under-test"] or [None]
    if thread is not None:
        await asyncio.wait_for(asyncio.to_thread(thread.join), 10)  # ended: anything it closes is closed
    assert os.get_blocking(write_end) and _target(write_end) == pipe
    os.close(write_end)
    os.close(read_end)


async def test_a_shared_descriptor_takes_a_small_write_at_once_when_there_is_room(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    writer = PipeWriter(write_end, shared=True)
    await asyncio.wait_for(writer.write(b"keystroke"), 10)
    assert writer._in_thread == 0 and os.read(read_end, 100) == b"keystroke"  # no thread hop
    writer.close()
    os.close(write_end)
    os.close(read_end)
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)  # a regular file: any size at once
    writer = PipeWriter(fd, shared=True)
    await asyncio.wait_for(writer.write(b"y" * 1_000_000), 10)
    assert writer._in_thread == 0
    writer.close()
    os.close(fd)
    assert (tmp_path / "out").read_bytes() == b"y" * 1_000_000


def _read_until(fd: int, size: int, out: list[bytes]) -> None:
    """Read `size` bytes from fd (the writer's descriptor stays open: no EOF to wait for)."""
    got = 0
    while got < size:
        chunk = os.read(fd, 65536)
        out.append(chunk)
        got += len(chunk)
