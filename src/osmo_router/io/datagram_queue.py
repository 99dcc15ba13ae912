"""Datagrams waiting for their stream, bounded in count and in bytes: per queue, per user, in total.

A UDP forward queues what arrives faster than its session stream takes it (a reader that stopped, a
stalled link). UDP may drop, so a full queue drops the datagram rather than wait; counting datagrams
alone bounded nothing useful (1,024 datagrams of 64 KiB are 64 MiB per session), so every queue is
bounded in bytes too, and on the agent its bytes also count in a per-user and a process-wide share
(`ByteShares`), so one user's stalled sessions cannot take the memory every other session needs.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

from osmo_router.io.byte_shares import ByteShares

T = TypeVar("T")


class DatagramQueue(Generic[T]):
    """A FIFO of datagrams (any item with its size) that drops what does not fit.

    At most `max_count` items and `max_bytes` bytes, and, with `shares`, only what `owner`'s share and
    the total have room for. `end` queues the end whatever the bounds; `close` gives every byte back.
    """

    def __init__(self, max_count: int, max_bytes: int, shares: ByteShares | None = None, owner: str = "") -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._shares = shares
        self._owner = owner
        # Unbounded: the bounds are checked in `offer`, so the end (None) always goes in behind the items.
        self._queue: asyncio.Queue[tuple[T, int] | None] = asyncio.Queue()
        self._bytes = 0
        self._ended = False
        #: Datagrams dropped for want of room.
        self.dropped = 0

    @property
    def queued_bytes(self) -> int:
        """Bytes queued now."""
        return self._bytes

    def offer(self, item: T, size: int) -> bool:
        """Queue `item` of `size` bytes if it fits; else drop it (counted in `dropped`) and return False."""
        if self._ended or self._queue.qsize() >= self.max_count or self._bytes + size > self.max_bytes:
            self.dropped += 1
            return False
        if self._shares is not None and not self._shares.take(self._owner, size):
            self.dropped += 1
            return False
        self._queue.put_nowait((item, size))
        self._bytes += size
        return True

    def end(self) -> None:
        """No more items: `get` returns None once the queued ones are taken."""
        if not self._ended:
            self._ended = True
            self._queue.put_nowait(None)

    async def get(self) -> T | None:
        """The next item; None once ended and empty."""
        entry = await self._queue.get()
        if entry is None:
            self._queue.put_nowait(None)  # (for the next `get` too)
            return None
        item, size = entry
        self._release(size)
        return item

    def close(self) -> None:
        """Drop what is queued and give its bytes back (the queue's user is gone)."""
        while not self._queue.empty():
            self._queue.get_nowait()
        self._release(self._bytes)
        self._ended = True
        self._queue.put_nowait(None)  # (the end, drained above if it was queued: a waiting `get` ends)

    def _release(self, size: int) -> None:
        self._bytes -= size
        if self._shares is not None and size:
            self._shares.give(self._owner, size)
