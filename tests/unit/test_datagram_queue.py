"""DatagramQueue and ByteShares: datagrams bounded in count and bytes, per queue, per user, in total."""

from __future__ import annotations

import asyncio

import pytest

from osmo_router.io.byte_shares import ByteShares
from osmo_router.io.datagram_queue import DatagramQueue


def test_a_queue_drops_what_passes_its_count_or_its_bytes() -> None:
    by_count: DatagramQueue[str] = DatagramQueue(max_count=2, max_bytes=1000)
    assert by_count.offer("a", 1) and by_count.offer("b", 1)
    assert not by_count.offer("c", 1)
    by_bytes: DatagramQueue[str] = DatagramQueue(max_count=100, max_bytes=100)
    assert by_bytes.offer("a", 60)
    assert not by_bytes.offer("b", 41)
    assert by_bytes.offer("c", 40)
    assert (by_count.dropped, by_bytes.dropped) == (1, 1)
    assert by_bytes.queued_bytes == 100


def test_one_users_queues_fill_only_her_share_and_give_it_back() -> None:
    shares = ByteShares(total=300, per_owner=200)
    alice_1: DatagramQueue[str] = DatagramQueue(100, 150, shares, "alice")
    alice_2: DatagramQueue[str] = DatagramQueue(100, 150, shares, "alice")
    bob: DatagramQueue[str] = DatagramQueue(100, 150, shares, "bob")
    assert alice_1.offer("x", 150)
    assert alice_2.offer("y", 50)
    assert not alice_2.offer("z", 10), "alice's share is full"
    assert bob.offer("w", 100), "bob has room whatever alice holds"
    assert not bob.offer("v", 1), "the total is full"
    assert shares.used == 300 and shares.owned("alice") == 200
    alice_1.close()
    assert shares.owned("alice") == 50 and shares.used == 150
    assert alice_2.offer("z", 10)


@pytest.mark.asyncio
async def test_get_gives_bytes_back_in_order_and_returns_none_after_the_end() -> None:
    shares = ByteShares(total=100, per_owner=100)
    queue: DatagramQueue[str] = DatagramQueue(10, 100, shares, "u")
    waiter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert queue.offer("first", 70) and queue.offer("second", 30)
    assert await asyncio.wait_for(waiter, 5) == "first"
    assert shares.used == 30
    queue.end()
    assert not queue.offer("late", 1), "nothing is queued after the end"
    assert await queue.get() == "second"
    assert await queue.get() is None
    assert shares.used == 0 and shares.owned("u") == 0
