"""Datagrams waiting for their stream, bounded in count and in bytes: per queue, per user, in total.

A UDP forward queues what arrives faster than its session stream takes it (a reader that stopped, a
stalled link). UDP may drop, so a full queue drops the datagram rather than wait; counting datagrams
alone bounded nothing useful (1,024 datagrams of 64 KiB are 64 MiB per session), so every queue is
bounded in bytes too, and on the agent its bytes also count in a per-user and a process-wide share
(`ByteShares`), so one user's stalled sessions cannot take the memory every other session needs.
"""

from __future__ import annotations

import asyncio
from collections import deque
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
        self._items: deque[tuple[T, int]] = deque()
        self._bytes = 0
        self._ended = False
        self._getter: asyncio.Future[None] | None = None
        #: Datagrams dropped for want of room.
        self.dropped = 0

    @property
    def queued_bytes(self) -> int:
        """Bytes queued now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def offer(self, item: T, size: int) -> bool:
        """Queue `item` of `size` bytes if it fits; else drop it (counted in `dropped`) and return False."""
        if self._ended or len(self._items) >= self.max_count or self._bytes + size > self.max_bytes:
            self.dropped += 1
            return False
        if self._shares is not None and not self._shares.take(self._owner, size):
            self.dropped += 1
            return False
        self._items.append((item, size))
        self._bytes += size
        self._wake()
        return True

    def end(self) -> None:
        """No more items: `get` returns None once the queued ones are taken."""
        self._ended = True
        self._wake()

    async def get(self) -> T | None:
        """The next item; None once ended and empty."""
        while not self._items:
            if self._ended:
                return None
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        item, size = self._items.popleft()
        self._release(size)
        return item

    def close(self) -> None:
        """Drop what is queued and give its bytes back (the queue's user is gone)."""
        self._ended = True
        self._items.clear()
        self._release(self._bytes)
        self._wake()

    def _release(self, size: int) -> None:
        self._bytes -= size
        if self._shares is not None and size:
            self._shares.give(self._owner, size)

    def _wake(self) -> None:
        if self._getter is not None and not self._getter.done():
            self._getter.set_result(None)
