"""A pipe whose full-pipe waits happen in a thread of its own: the input of exec and `rsync --server`.

With a non-blocking pipe driven from the event loop, every time the reader has taken part of the
pipe the loop wakes, writes what fits and waits again: a 1 MiB frame into rsync's pipe cost a dozen
loop iterations, which made the agent's Python overhead the largest part of its CPU on a 1 GiB
upload. Here the loop writes what fits at once (a keystroke never leaves the loop), and only the
rest of a chunk goes to the thread, which waits for room with poll() outside the GIL and wakes the
loop once when the chunk is all written.

The thread owns the descriptor: it closes it after the writes queued before `close()`, so a write
still in progress (a reader that stopped reading) never races the close, and the descriptor number
is never reused under it. Its thread is a daemon: a writer stuck on a reader that never reads does
not keep the agent from exiting.

A descriptor shared with other processes (the client's stdout and stderr: a terminal, or a pipe the
shell made) is neither made non-blocking nor closed (`shared=True`): O_NONBLOCK belongs to the open
file, so the shell and the other commands of a pipeline would see it too. The loop then writes a
chunk itself only when it cannot wait: a regular file, or at most PIPE_BUF bytes while poll() says
there is room (a pipe then takes them whole at once); anything else goes to the thread, which may
block in write() without holding the loop (its signal handlers, pings and input).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import select
import stat
import threading

_Item = tuple[memoryview, asyncio.Future[None]] | None


class PipeWriter:
    """Writes whole chunks to a descriptor; `write` returns once the kernel has all of a chunk.

    It owns `fd` (made non-blocking, closed by `close`) unless `shared` (see the module docstring).
    """

    def __init__(self, fd: int, name: str = "pipe-writer", *, shared: bool = False) -> None:
        self._shared = shared
        self._room: select.poll | None = None  # shared, not a regular file: whether a write would wait
        if not shared:
            os.set_blocking(fd, False)
        elif not stat.S_ISREG(os.fstat(fd).st_mode):
            self._room = select.poll()
            self._room.register(fd, select.POLLOUT)
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._in_thread = 0  # chunks handed to the thread and not yet reported back
        self._closed = False
        threading.Thread(target=self._run, name=name, daemon=True).start()

    async def write(self, data: bytes) -> None:
        """Write all of `data`; raises BrokenPipeError once the reader is gone or the writer closed, and
        the OSError of any other failed write (ENOSPC, EIO), for this and every later chunk."""
        if self._closed:
            raise BrokenPipeError("the pipe writer is closed")
        view = memoryview(data)
        if not self._in_thread:  # nothing queued ahead: write what fits now, keeping the order
            view = self._write_now(view)
            if not view:
                return
        done: asyncio.Future[None] = self._loop.create_future()
        self._in_thread += 1
        self._queue.put((view, done))
        await done

    def _write_now(self, view: memoryview) -> memoryview:
        """What is left of `view` after writing what the loop may write without waiting."""
        room = self._room  # (shared: the write below blocks unless poll() says there is room for it)
        if room is not None and (len(view) > select.PIPE_BUF or not room.poll(0)):
            return view
        try:
            return view[os.write(self._fd, view) :]
        except BlockingIOError:  # (also a shared descriptor another process made non-blocking)
            return view

    def close(self) -> None:
        """Stop after the writes already queued (does not wait for them); the descriptor is closed then
        unless shared."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)

    def _run(self) -> None:
        failed: OSError | None = None
        try:
            while (item := self._queue.get()) is not None:
                data, done = item
                if failed is None:
                    try:
                        _write_all(self._fd, data)
                    except OSError as err:
                        failed = err
                self._report(done, failed)
        finally:
            if not self._shared:
                os.close(self._fd)

    def _report(self, done: asyncio.Future[None], error: OSError | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._settle, done, error)

    def _settle(self, done: asyncio.Future[None], error: OSError | None) -> None:
        # Counted down here, not when the waiter is cancelled: the thread still had the chunk,
        # and a later write must not overtake it.
        self._in_thread -= 1
        if done.done():  # the writer was cancelled
            return
        if error is None:
            done.set_result(None)
        else:
            # A fresh exception per waiter, of the errno's own class: EPIPE is BrokenPipeError (the reader
            # went away), ENOSPC or EIO stay what they are (`> /dev/full` is a failed write, not a gone reader).
            done.set_exception(OSError(error.errno, error.strerror) if error.errno else error)


def _write_all(fd: int, view: memoryview) -> None:
    """Write all of view, waiting for room outside the GIL (in poll(), or in write() on a blocking descriptor)."""
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            poller.poll()  # POLLERR/POLLHUP wake it too: the next write then raises
