"""FlowQueue: bounded, ordered, endable, failable."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref

import pytest

from osmo_router.router.core.flow_control import FlowQueue
from osmo_router.wire.errors import ResourceExhausted

pytestmark = pytest.mark.asyncio


async def test_items_come_out_in_order() -> None:
    queue = FlowQueue(4)
    for item in (b"a", b"b", b"c"):
        await queue.put(item)
    assert [await queue.get() for _ in range(3)] == [b"a", b"b", b"c"]


async def test_put_waits_while_full_and_resumes_after_get() -> None:
    queue = FlowQueue(2)
    await queue.put(b"1")
    await queue.put(b"2")
    blocked = asyncio.create_task(queue.put(b"3"))
    await asyncio.sleep(0)
    assert not blocked.done() and len(queue) == 2
    assert await queue.get() == b"1"
    await asyncio.wait_for(blocked, 5)
    assert [await queue.get(), await queue.get()] == [b"2", b"3"]


async def test_end_delivers_queued_items_then_none() -> None:
    queue = FlowQueue(4)
    await queue.put(b"last")
    queue.end()
    assert await queue.get() == b"last"
    assert await queue.get() is None
    await queue.put(b"dropped")  # puts after the end are dropped, never block
    assert await queue.get() is None


async def test_end_releases_a_blocked_producer() -> None:
    queue = FlowQueue(1)
    await queue.put(b"x")
    blocked = asyncio.create_task(queue.put(b"y"))
    await asyncio.sleep(0)
    queue.end()
    await asyncio.wait_for(blocked, 5)


async def test_fail_wakes_both_sides_with_the_error() -> None:
    queue = FlowQueue(1)
    await queue.put(b"x")
    producer = asyncio.create_task(queue.put(b"y"))
    await asyncio.sleep(0)
    error = ResourceExhausted("stalled")
    queue.fail(error)
    with pytest.raises(ResourceExhausted):
        await asyncio.wait_for(producer, 5)
    with pytest.raises(ResourceExhausted):
        await queue.get()


async def test_waiting_consumer_is_woken_by_put() -> None:
    queue = FlowQueue(1)
    consumer = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not consumer.done()
    await queue.put(b"z")
    assert await asyncio.wait_for(consumer, 5) == b"z"


async def test_poll_and_readable_follow_the_queue() -> None:
    queue = FlowQueue(2)
    assert queue.poll() == b""  # nothing yet
    readable = queue.readable()
    assert not readable.done()
    await queue.put(b"a")
    await asyncio.wait_for(readable, 5)
    assert queue.poll() == b"a"
    queue.end()
    await asyncio.wait_for(queue.readable(), 5)  # already ended: done at once
    assert queue.poll() is None


async def test_poll_raises_the_failure_and_readable_wakes_on_it() -> None:
    queue = FlowQueue(2)
    readable = queue.readable()
    queue.fail(ResourceExhausted("stalled"))
    await asyncio.wait_for(readable, 5)
    with pytest.raises(ResourceExhausted):
        queue.poll()


async def test_bytes_bound_the_queue_whatever_the_message_count() -> None:
    q = FlowQueue(16, max_bytes=100)
    await q.put(b"x" * 60)
    await q.put(b"y" * 40)  # exactly at the bound
    assert q.queued_bytes == 100
    blocked = asyncio.create_task(q.put(b"z"))
    await asyncio.sleep(0)  # let it reach its wait
    assert not blocked.done() and len(q) == 2
    assert await q.get() == b"x" * 60
    await asyncio.wait_for(blocked, 1)
    assert q.queued_bytes == 41


async def test_one_message_larger_than_the_byte_bound_still_passes_alone() -> None:
    q = FlowQueue(16, max_bytes=10)
    await asyncio.wait_for(q.put(b"a" * 50), 1)  # an empty queue takes any one message
    blocked = asyncio.create_task(q.put(b"b"))
    await asyncio.sleep(0)
    assert not blocked.done()
    assert q.poll() == b"a" * 50
    await asyncio.wait_for(blocked, 1)
    assert q.queued_bytes == 1


class _Sink:
    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.got: list[bytes] = []

    def __call__(self, item: bytes) -> bool:
        if self.accept:
            self.got.append(item)
        return self.accept


async def test_a_waiting_consumer_gets_items_through_its_sink_without_a_wake_up() -> None:
    queue = FlowQueue(4)
    sink = _Sink()
    queue.set_sink(sink)
    waiting = queue.readable()
    await queue.put(b"a", more=False)
    assert sink.got == [b"a"] and not waiting.done() and len(queue) == 0
    await queue.put(b"b")  # more behind it: queued, so the consumer can merge the burst
    assert sink.got == [b"a"] and waiting.done() and queue.poll() == b"b"


async def test_the_sink_is_skipped_while_the_consumer_is_busy_or_items_are_queued() -> None:
    queue = FlowQueue(4)
    sink = _Sink()
    queue.set_sink(sink)
    await queue.put(b"1", more=False)  # nobody waits in readable(): the consumer may be writing
    assert sink.got == [] and len(queue) == 1
    queue.readable()  # (completes at once: an item is queued)
    await queue.put(b"2", more=False)
    assert sink.got == [] and [queue.poll(), queue.poll()] == [b"1", b"2"]  # order kept
    refusing = _Sink(accept=False)
    queue.set_sink(refusing)
    waiting = queue.readable()
    await queue.put(b"3", more=False)  # the sink could not send it: queued and the consumer woken
    assert waiting.done() and queue.poll() == b"3"
    queue.set_sink(None)
    waiting = queue.readable()
    await queue.put(b"4", more=False)
    assert waiting.done() and queue.poll() == b"4"


async def test_the_sink_respects_a_spent_budget() -> None:
    from osmo_router.router.core.budget import ByteBudget

    shared = ByteBudget(10)
    other, queue = FlowQueue(4), FlowQueue(4)
    other.use_budgets((shared,))
    queue.use_budgets((shared,))
    await other.put(b"x" * 8)
    sink = _Sink()
    queue.set_sink(sink)
    waiting = queue.readable()
    blocked = asyncio.create_task(queue.put(b"y" * 5, more=False))  # 8 + 5 > 10: waits, as before
    await asyncio.sleep(0)
    assert not blocked.done() and sink.got == []
    assert other.poll() == b"x" * 8
    await asyncio.wait_for(blocked, 5)
    assert waiting.done() and queue.poll() == b"y" * 5


@pytest.mark.asyncio
async def test_a_kept_failure_does_not_keep_the_frames_that_raised_it() -> None:
    """A failed queue's error, raised in producers holding a message, must not keep their messages alive."""
    queue = FlowQueue(1)
    queue.fail(ResourceExhausted("peer stopped reading"))
    refs: list[weakref.ref[memoryview]] = []

    async def producer() -> None:
        message = memoryview(bytearray(1 << 20))  # a local of the raising frame, as the relay's are
        refs.append(weakref.ref(message))
        await queue.put(message.tobytes())

    for _ in range(2):  # raised more than once: no raise may gather its frames on the kept error
        with contextlib.suppress(ResourceExhausted):
            await producer()
    gc.collect()
    assert [ref() for ref in refs] == [None, None], "the queue's kept error refers to a producer's frame"
