"""Backpressure for one relay direction: a small bounded queue of encoded frames.

A full queue suspends the reader of the sending side, so gRPC's own HTTP/2 flow control pushes
back to the sender; the writer bounds each write by the flow-control timeout, so a receiver that
stops reading ends the session instead of holding buffers forever.
"""

from __future__ import annotations

import asyncio
from collections import deque


class FlowQueue:
    """A bounded single-producer, single-consumer queue that can be ended or failed."""

    __slots__ = ("_ended", "_error", "_getter", "_items", "_maxsize", "_putter")

    def __init__(self, maxsize: int) -> None:
        self._items: deque[bytes] = deque()
        self._maxsize = maxsize
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._ended = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def ended(self) -> bool:
        """True once `end` was called."""
        return self._ended

    async def put(self, item: bytes) -> None:
        """Queue an item, waiting while the queue is full; raises the failure if it failed."""
        while len(self._items) >= self._maxsize and self._error is None and not self._ended:
            self._putter = asyncio.get_running_loop().create_future()
            try:
                await self._putter
            finally:
                self._putter = None
        if self._error is not None:
            raise self._error
        if self._ended:
            return
        self._items.append(item)
        _wake(self._getter)

    async def get(self) -> bytes | None:
        """The next item; None once the queue was ended and is empty; raises the failure if it failed."""
        while not self._items:
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        if self._error is not None:
            raise self._error
        item = self._items.popleft()
        _wake(self._putter)
        return item

    def end(self) -> None:
        """No more items will come (later puts are dropped); the consumer still receives the queued ones."""
        self._ended = True
        _wake(self._getter)
        _wake(self._putter)

    def fail(self, error: BaseException) -> None:
        """Drop everything and make both ends raise `error`."""
        if self._error is None:
            self._error = error
        self._items.clear()
        _wake(self._getter)
        _wake(self._putter)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
