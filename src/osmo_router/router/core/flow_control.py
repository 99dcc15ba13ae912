"""Backpressure for one relay direction: a small queue of encoded frames, bounded in messages and in bytes.

A full queue suspends the reader of the sending side, so gRPC's own HTTP/2 flow control pushes
back to the sender; the writer bounds each write by the flow-control timeout, and its progress over
each such period by the minimum drain rate, so a receiver that stops reading, or only takes a
trickle, ends the session instead of holding buffers forever.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from osmo_router.router.core.budget import ByteBudget
from osmo_router.wire.errors import detached


class FlowQueue:
    """A bounded single-producer, single-consumer queue that can be ended or failed.

    Bounded twice: at most `maxsize` messages, and at most `max_bytes` bytes queued (one message
    always fits into an empty queue, so a message as large as the gRPC limit still passes).
    """

    __slots__ = (
        "_budgets",
        "_bytes",
        "_ended",
        "_error",
        "_getter",
        "_items",
        "_max_bytes",
        "_maxsize",
        "_putter",
        "_sink",
    )

    def __init__(self, maxsize: int, max_bytes: int = 1 << 62) -> None:
        # A list, not a deque: an empty deque allocates a 64-slot block (~600 bytes), and a router
        # holds two queues per session, mostly empty; pop(0) on a handful of items costs nothing.
        self._items: list[bytes] = []
        self._maxsize = maxsize
        self._max_bytes = max_bytes
        self._bytes = 0
        #: Shared budgets every queued byte is also counted in (core/budget.py).
        self._budgets: tuple[ByteBudget, ...] = ()
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._ended = False
        #: The consumer's direct hand-over (see `set_sink`).
        self._sink: Callable[[bytes], bool] | None = None

    def __len__(self) -> int:
        return len(self._items)

    @property
    def queued_bytes(self) -> int:
        """Bytes queued now."""
        return self._bytes

    def _release_all(self) -> None:
        if self._budgets and self._bytes:
            self._give(self._bytes)
        self._items.clear()
        self._bytes = 0

    def _full(self, incoming: int) -> bool:
        return len(self._items) >= self._maxsize or (bool(self._items) and self._bytes + incoming > self._max_bytes)

    @property
    def held_back(self) -> bool:
        """True while a put waits for room: the sender's stream is not being read (gRPC buffers for it)."""
        return self._putter is not None

    @property
    def ended(self) -> bool:
        """True once `end` was called."""
        return self._ended

    @property
    def budgets(self) -> tuple[ByteBudget, ...]:
        """The shared budgets this queue counts in (none: only its own bounds)."""
        return self._budgets

    def use_budgets(self, budgets: tuple[ByteBudget, ...]) -> None:
        """Count what this queue holds in shared budgets too (set before anything is queued)."""
        assert not self._items
        self._budgets = budgets

    def set_sink(self, sink: Callable[[bytes], bool] | None) -> None:
        """Let `put` hand an item straight to the consumer while it waits for one (`readable` pending,
        nothing queued): `sink(item)` sends it and returns True, or returns False having done nothing
        (then the item is queued as usual). Saves the consumer a wake-up per item when it keeps up."""
        self._sink = sink

    def offer(self, item: bytes) -> bool:
        """`put` of an item with nothing behind it, if it goes to the sink at once (see `set_sink`);
        False, with nothing done, if it would be queued or wait."""
        return self._sink is not None and self._handed_over(item)

    def pass_through(self, framed: memoryview, size: int) -> bool:
        """`offer` of an item still framed as it arrived (its `size` bytes after a 5-byte gRPC prefix),
        to a sink that writes it as it is; False, with nothing done, otherwise.

        Such a sink (relay.py `_DirectWrite`) has two attributes beside its call: `framed`, the writer's
        endpoint's own send of a framed message (None: it has none), and `watchdog`, the writer's
        WriteWatchdog, whose `moved` counts what was sent at once as written. They are used here rather
        than through a method of the sink: one call less per relayed message (issue 18)."""
        sink, getter = self._sink, self._getter
        # _may_hand_over, inline: this runs per relayed message
        if sink is None or getter is None or getter.done() or self._items or self._error is not None or self._ended:
            return False
        for budget in self._budgets:
            if budget.used and budget.used + budget.held + size > budget.limit:  # budget.fits(size)
                return False
        write_framed = sink.framed  # type: ignore[attr-defined]
        if write_framed is None or not write_framed(framed):
            return False
        sink.watchdog.moved += size  # type: ignore[attr-defined]
        return True

    @property
    def sink(self) -> Callable[[bytes], bool] | None:
        """The sink set by `set_sink` (None: none)."""
        return self._sink

    def passed_natively(self, size: int) -> None:
        """The native front (h2/front.py) passed an item on as `pass_through` would: counted as it counts."""
        self._sink.watchdog.moved += size  # type: ignore[union-attr]

    def _handed_over(self, item: bytes) -> bool:
        return self._may_hand_over(len(item)) and self._sink(item)  # type: ignore[misc]

    def _may_hand_over(self, size: int) -> bool:
        """Whether an item of `size` bytes may go to the sink: exactly when `put` would not wait, so it
        passes as if queued and taken at once (the consumer waits for one, nothing is queued)."""
        getter = self._getter
        if getter is None or getter.done() or self._items or self._error is not None or self._ended:
            return False  # the consumer is busy (it may hold an item), or the queue is over
        for budget in self._budgets:
            # budget.fits(size), inline: this runs per relayed message
            if budget.used and budget.used + budget.held + size > budget.limit:
                return False
        return True

    async def put(self, item: bytes, more: bool = True) -> None:
        """Queue an item, waiting while the queue or one of its budgets is full; raises the failure if it failed.

        While it waits the item is in memory all the same: its bytes are counted as held in every
        budget (so other queues of the budget see them) until it is queued or dropped. With `more`
        False (the producer has nothing else in hand) it may go to the sink instead (`set_sink`);
        with more to come it is queued, so the consumer can merge what follows it.
        """
        if not more and self._sink is not None and self._handed_over(item):
            return
        size = len(item)
        holding = False
        try:
            while self._error is None and not self._ended:
                spent: ByteBudget | None = None
                if not self._full(size):
                    spent = self._take(size, holding)
                    if spent is None:
                        break  # queued bytes counted in every budget
                if not holding and self._budgets:
                    self._hold(size)
                    holding = True
                self._putter = asyncio.get_running_loop().create_future()
                if spent is not None:
                    spent.notify(self._putter)
                try:
                    await self._putter
                finally:
                    self._putter = None
        finally:
            if holding:
                self._unhold(size)
        if self._error is not None:
            raise detached(self._error)
        if self._ended:
            return  # (nothing was taken: the loop takes only right before it leaves)
        self._items.append(item)
        self._bytes += size
        _wake(self._getter)

    def _take(self, size: int, holding: bool) -> ByteBudget | None:
        """Take `size` from every budget: None when done, else the budget that had no room (none taken)."""
        for i, budget in enumerate(self._budgets):
            if not budget.try_take(size, holding):
                for taken in self._budgets[:i]:
                    taken.give(size)
                return budget
        return None

    def _hold(self, size: int) -> None:
        for budget in self._budgets:
            budget.hold(size)

    def _unhold(self, size: int) -> None:
        for budget in self._budgets:
            budget.unhold(size)

    def _give(self, size: int) -> None:
        for budget in self._budgets:
            budget.give(size)

    async def get(self) -> bytes | None:
        """The next item; None once the queue was ended and is empty; raises the failure if it failed."""
        while not self._items:
            if self._error is not None:
                raise detached(self._error)
            if self._ended:
                return None
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        if self._error is not None:
            raise detached(self._error)
        return self.pop()

    def poll(self) -> bytes | None:
        """The next item without waiting: an item, b"" when none is queued yet (items are never empty),
        or None once the queue was ended and is empty; raises the failure if it failed."""
        if self._error is not None:
            raise detached(self._error)
        if self._items:
            return self.pop()
        return None if self._ended else b""

    def readable(self) -> asyncio.Future[None]:
        """A future that completes once an item comes, or the queue ends or fails; then `poll` again.

        Awaiting it directly (rather than `get`) keeps no coroutine frame alive while a relay
        direction is idle: a router holds two per session.
        """
        getter = self._getter
        if getter is None or getter.done():
            getter = self._getter = asyncio.get_running_loop().create_future()
        if self._items or self._ended or self._error is not None:
            _wake(getter)
        return getter

    def peek(self) -> bytes | None:
        """The next item without taking it; None when nothing is queued (or the queue failed)."""
        if self._error is not None or not self._items:
            return None
        return self._items[0]

    def pop(self) -> bytes:
        """Take the next item without waiting (call only after `peek` returned one)."""
        item = self._items.pop(0)
        self._bytes -= len(item)
        if self._budgets:
            self._give(len(item))
        _wake(self._putter)
        return item

    def end(self, drop: bool = False) -> None:
        """No more items will come (later puts are dropped); the consumer still receives the queued
        ones, unless `drop` (nobody will read them)."""
        if drop:
            self._release_all()
        self._ended = True
        _wake(self._getter)
        _wake(self._putter)

    def fail(self, error: BaseException) -> None:
        """Drop everything and make both ends raise `error`."""
        if self._error is None:
            self._error = detached(error)
        self._release_all()
        _wake(self._getter)
        _wake(self._putter)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class WriteInterrupted(Exception):
    """The write in progress was interrupted on purpose (the stream it wrote to is over)."""


class WriteWatchdog:
    """Bounds the writes of one task: none may take longer than `timeout` seconds, and a writer that
    had data waiting for `timeout` seconds in all must have moved `min_rate * timeout` bytes in them.

    `asyncio.timeout` around every write arms and cancels a timer per message, which costs more
    than the rest of the relay's own work per message. The watchdog notes when the current write
    started and adds up the time spent writing (data waiting for the reader); a single timer wakes
    at most once per `timeout` of writing and cancels the task if the write in progress started
    more than `timeout` seconds ago, or if the last `timeout` seconds spent writing moved fewer than
    `min_rate * timeout` bytes (the relay adds each write's size to `moved`). The second rule ends
    a reader that takes a trickle (4 KiB every few seconds) and so never lets one write run past
    the timeout. Time spent waiting for data (between writes) is not counted, and does not reset
    the count either: a trickle whose queue runs empty now and then (its sender held back by a
    shared budget) is still judged on its writing time. Use as `with watchdog: await write(...)`;
    a write that overran raises TimeoutError from the block (`slow` tells which rule fired), and
    one stopped by `interrupt` raises WriteInterrupted.
    """

    __slots__ = (
        "_busy",
        "_closed",
        "_interrupted",
        "_loop",
        "_mark",
        "_started",
        "_task",
        "_timer",
        "fired",
        "min_bytes",
        "moved",
        "slow",
        "timeout",
    )

    def __init__(self, timeout: float, min_rate: float = 0.0) -> None:
        self.timeout = timeout
        #: Bytes `timeout` seconds spent writing must move at least (0: no such rule).
        self.min_bytes = int(min_rate * timeout)
        #: Bytes written so far: the writer adds each completed write's size.
        self.moved = 0
        #: `moved` when the writing time being judged began.
        self._mark = 0
        #: Seconds spent in finished writes since then.
        self._busy = 0.0
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[object] | None = None
        self._started: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._interrupted = False
        self._closed = False
        self.fired = False
        self.slow = False

    def __enter__(self) -> None:
        self._started = now = self._loop.time()
        if self._timer is None and not self._closed:
            self._task = asyncio.current_task()
            self._timer = self._loop.call_at(now + self.timeout - self._busy, self._check)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._started is not None:
            self._busy += self._loop.time() - self._started
        self._started = None
        if exc_type is asyncio.CancelledError and self._task is not None and (self.fired or self._interrupted):
            # Our own cancellation (unless someone else cancelled too): a timeout or an interruption.
            if self._task.uncancel() == 0:
                if self._interrupted:
                    raise WriteInterrupted from None
                raise TimeoutError from None

    def idle(self) -> None:
        """The writer waits for data: kept for callers; waiting time is never counted (see the class)."""

    def interrupt(self) -> None:
        """Stop the write in progress, if any (it raises WriteInterrupted); later writes are not affected."""
        if self._started is not None and self._task is not None and not self._task.done():
            self._interrupted = True
            self._task.cancel()

    def close(self) -> None:
        """Stop the timer (the writing is over); `interrupt` does nothing after this."""
        self._closed = True
        self._started = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        started = self._started
        if started is None:
            return  # waiting for data: the next write re-arms the timer for the writing time left
        now = self._loop.time()
        if now >= started + self.timeout:
            self._fire(slow=False)
            return
        busy = self._busy + now - started
        if busy >= self.timeout:
            if self.min_bytes and self.moved - self._mark < self.min_bytes:
                self._fire(slow=True)
                return
            # Judged: the next `timeout` of writing counts from now (this write's time so far excluded).
            self._mark = self.moved
            self._busy = -(now - started)
            busy = 0.0
        self._timer = self._loop.call_at(min(started + self.timeout, now + self.timeout - busy), self._check)

    def _fire(self, *, slow: bool) -> None:
        if self._task is not None and not self._task.done():
            self.fired = True
            self.slow = slow
            self._task.cancel()
