"""The edges' writer: a call's messages in order, data frames queued behind a write sent as one (issue 18).

Every gRPC message costs the three processes on its way (client, router, agent) the same fixed
machinery whatever its size, so a stream of small data frames is paid per frame. `BatchingWriter`
lets the sender go on while a write is in flight: data frames queue behind it (up to `backlog`
bytes, then the sender waits), and when the write returns, every data frame already queued right
behind it goes out as one data frame of at most `limit` payload bytes. Nothing waits for more to
arrive: an idle stream's single frame goes at once, so batching adds no timer and no latency.

Only pure data frames merge (wire/codec.py's layout; any receiver takes a larger data frame). A
control frame (half-close, exit status, error, ack, ...) and the end of writing are barriers: they
are written in order after what was queued before them, and their callers wait until they are
written and see their errors, as with a direct write. A failed data write is raised to the next
caller (the data was already handed over). Resume numbers data by its bytes, so a merged frame
carries exactly the units of the frames it holds; merging never splits a frame.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

from osmo_router.wire.codec import merge_data_messages, payload_offset

#: Largest payload of a merged data frame (the router's coalescing uses the same cap).
BATCH_LIMIT: Final = 128 * 1024
#: The longest data-frame message header (wire/codec.py data_header: two tags, two varints of a
#: payload under 4 GiB): a message longer than `limit` plus this has a payload over `limit`.
MAX_DATA_HEADER: Final = 12
#: Data bytes queued behind the write in flight before a sender waits (bounds memory per stream).
BACKLOG: Final = 128 * 1024


async def _nothing() -> None:
    """A barrier that writes nothing (flush)."""


class _Barrier:
    """A write that is not data (a control frame, the end of writing): done in order, awaited."""

    __slots__ = ("future", "run")

    def __init__(self, run: Callable[[], Awaitable[Any]], future: asyncio.Future[None]) -> None:
        self.run = run
        self.future = future


class BatchingWriter:
    """Writes one call's messages in order; data-frame messages queued behind a write go out merged.

    `write` is the call's write (one outstanding at a time, which this class guarantees).
    `try_write` (the native channel's calls have one) sends a message at once if the transport takes
    it without waiting and returns False otherwise: a data frame written while the writer is idle
    then goes out from the caller, with no drain task per message. Only the first of a turn of the
    event loop goes that way: a sender that writes again without waiting in between (a burst), or
    right after the drain task emptied the queue, queues, so a burst still merges as before.
    """

    def __init__(
        self,
        write: Callable[[Any], Awaitable[Any]],
        *,
        limit: int = BATCH_LIMIT,
        backlog: int = BACKLOG,
        try_write: Callable[[Any], bool] | None = None,
    ) -> None:
        self._write = write
        self._try_write = try_write
        self._direct_held = False  # a direct write (or a drain) happened in this turn of the loop
        self._loop: asyncio.AbstractEventLoop | None = None  # (get_running_loop is a getpid() per call)
        self._limit = limit
        self._backlog = backlog
        self._pending: deque[bytes | _Barrier] = deque()
        self._pending_bytes = 0
        self._room = asyncio.Event()
        self._lock = asyncio.Lock()  # held around every write to the call
        #: Barriers written (or waiting for the lock) outside the drain task: while any, nothing goes at once
        #: (`_lock.locked()`, counted: a call less per message sent at once).
        self._barriers = 0
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        #: Messages written and data frames handed in (merged ones count once in `written`).
        self.written = 0
        self.data_frames = 0

    @property
    def idle(self) -> bool:
        """True when nothing is queued or being written by the drain task."""
        return self._task is None and not self._pending

    async def write_data(self, message: bytes) -> None:
        """Queue a data-frame message (wire/codec.py's layout); returns once it is queued.

        Waits while more than `backlog` bytes are queued. Raises the error of an earlier failed write.
        """
        self._check()
        if self.try_write_data(message):
            return  # nothing queued or in flight: sent in order, as the drain task would
        self.data_frames += 1
        self._pending.append(message)
        self._pending_bytes += len(message)
        self._kick()
        while self._pending_bytes > self._backlog and self._error is None:
            self._room.clear()
            await self._room.wait()
        self._check()

    def try_write_data(self, message: bytes) -> bool:
        """`write_data` when the message can go to the call at once (nothing queued or in flight, no
        direct write yet in this turn of the loop unless the message is too large to merge, the call
        taking it whole); False, with nothing written, otherwise. Never raises."""
        try_write = self._try_write
        # (`idle` and `_hold_direct` spelt out: this runs for every message a forward sends, issue 18)
        if try_write is None or self._error is not None or self._task is not None or self._pending or self._barriers:
            return False
        if self._direct_held:
            # The turn's hold is for merging, and a message whose payload alone exceeds `limit` merges with
            # nothing (_take_run): bulk messages go direct one after another instead of a drain task each.
            if len(message) <= self._limit + MAX_DATA_HEADER:
                return False
        else:
            # Held even if the call declines: the next frame of this turn queues behind.
            self._direct_held = True
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._release_direct)
        if not try_write(message):
            return False
        self.data_frames += 1
        self.written += 1
        return True

    def try_write_single(self, message: bytes) -> bool:
        """`try_write_data` for a sender that sends at most one message per turn of the event loop (a
        socket pump: one read per readiness callback, a sleep(0) between sends of its own): it takes no
        turn hold, so no release is scheduled per message (a call_soon and a call, issue 18). A hold
        taken by others (a drain that just ended, a `write_data` sent at once in this turn) still makes
        a small message decline, to be queued behind, as in `try_write_data`. Never raises."""
        try_write = self._try_write
        if try_write is None or self._error is not None or self._task is not None or self._pending or self._barriers:
            return False
        if self._direct_held and len(message) <= self._limit + MAX_DATA_HEADER:
            return False
        if not try_write(message):
            return False
        self.data_frames += 1
        self.written += 1
        return True

    def count_direct(self) -> None:
        """A message that went to the call at once without us (the native front, h2/front.py), counted as
        `try_write_single` counts one."""
        self.data_frames += 1
        self.written += 1

    def refuse_direct(self) -> None:
        """Send nothing at once from now on (the end of writing is queued: data after it must not pass it)."""
        self._try_write = None

    async def write(self, message: Any) -> None:
        """Write a message that is not data, after everything queued; returns once written."""
        await self.barrier(lambda: self._counted_write(message))

    async def barrier(self, run: Callable[[], Awaitable[Any]]) -> None:
        """Run `run` (a write to the call, or its end) after everything queued; raises its error."""
        self._check()
        if self.idle:
            # Nothing ahead of it: written here, with no task hop (the lock orders later writes).
            self._barriers += 1
            try:
                async with self._lock:
                    await run()
            finally:
                self._barriers -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Barrier(run, future))
        self._kick()
        await future

    async def flush(self) -> None:
        """Wait until everything queued so far was written (raises a write's error)."""
        await self.barrier(_nothing)

    def stop(self, error: BaseException) -> None:
        """Drop what is queued; later writes raise `error` (the call was cancelled)."""
        self._fail(error)

    def _hold_direct(self) -> None:
        if not self._direct_held:
            self._direct_held = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._release_direct)

    def _release_direct(self) -> None:
        self._direct_held = False

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def _kick(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while self._pending and self._error is None:
                entry = self._pending.popleft()
                if isinstance(entry, _Barrier):
                    await self._run_barrier(entry)
                    continue
                message = self._take_run(entry)
                self.written += 1
                async with self._lock:
                    await self._write(message)
        except Exception as err:  # a failed write ends the call's writing: every later caller sees it
            self._fail(err)
        except BaseException:  # cancelled (the loop is closing): nobody may wait for a write forever
            self._fail(asyncio.InvalidStateError("the stream's writer was cancelled"))
            raise
        finally:
            self._task = None
            if self._try_write is not None:
                self._hold_direct()  # a sender woken by this drain is mid-burst: its next frame queues

    async def _counted_write(self, message: Any) -> None:
        self.written += 1
        await self._write(message)

    async def _run_barrier(self, entry: _Barrier) -> None:
        try:
            async with self._lock:
                await entry.run()
        except Exception as err:
            if not entry.future.done():
                entry.future.set_exception(err)
            raise
        if not entry.future.done():
            entry.future.set_result(None)

    def _take_run(self, first: bytes) -> bytes:
        """`first`, merged with the data frames queued right behind it (taken off the queue)."""
        self._pending_bytes -= len(first)
        following = self._pending[0] if self._pending else None
        offset = payload_offset(first) if isinstance(following, bytes) and len(first) < self._limit else -1
        if offset < 0:
            self._room.set()
            return first
        messages, offsets, size = [first], [offset], len(first) - offset
        while isinstance(following, bytes):
            offset = payload_offset(following)
            if offset < 0 or size + len(following) - offset > self._limit:
                break
            messages.append(following)
            self._pending.popleft()
            offsets.append(offset)
            size += len(following) - offset
            self._pending_bytes -= len(following)
            following = self._pending[0] if self._pending else None
        self._room.set()
        return first if len(messages) == 1 else merge_data_messages(messages, offsets)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        while self._pending:
            entry = self._pending.popleft()
            if isinstance(entry, _Barrier) and not entry.future.done():
                entry.future.set_exception(error)
        self._pending_bytes = 0
        self._room.set()


__all__ = ["BACKLOG", "BATCH_LIMIT", "BatchingWriter"]
