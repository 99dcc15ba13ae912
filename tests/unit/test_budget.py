"""Byte budgets shared by relay queues: per user and for the whole process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from osmo_router.router.core.budget import DEFAULT_TOTAL_BYTES, Budgets, ByteBudget, default_total_bytes
from osmo_router.router.core.flow_control import FlowQueue
from osmo_router.wire.errors import Cancelled


@pytest.mark.asyncio
async def test_queues_of_one_budget_wait_for_each_other_and_resume_as_it_drains() -> None:
    budget = ByteBudget(100)
    first, second = FlowQueue(16), FlowQueue(16)
    for queue in (first, second):
        queue.use_budgets((budget,))
    await first.put(b"a" * 80)
    await second.put(b"b" * 20)  # the budget is full now
    blocked = asyncio.create_task(second.put(b"c" * 10))
    await asyncio.sleep(0)
    assert not blocked.done() and budget.used == 100 and budget.held == 10
    assert first.poll() == b"a" * 80  # another queue of the budget drains: room for the waiter
    await asyncio.wait_for(blocked, 1)
    assert (budget.used, budget.held) == (30, 0)


@pytest.mark.asyncio
async def test_the_message_a_reader_holds_at_a_full_queue_counts_in_the_budget() -> None:
    # Issue 14: the message a reader holds while its queue is full is in memory all the same; other
    # queues of the budget must see it, or a user holds a budget plus one message per session.
    budget = ByteBudget(100)
    full, other = FlowQueue(1), FlowQueue(16)
    for queue in (full, other):
        queue.use_budgets((budget,))
    await full.put(b"a" * 10)
    held = asyncio.create_task(full.put(b"b" * 40))  # its queue holds its one message: it waits
    await asyncio.sleep(0)
    assert not held.done() and (budget.used, budget.held, budget.counted) == (10, 40, 50)
    blocked = asyncio.create_task(other.put(b"c" * 60))  # 10 queued + 40 held + 60 > 100
    await asyncio.sleep(0)
    assert not blocked.done()
    assert full.poll() == b"a" * 10  # the held message is queued (held -> used), then 40 + 60 fits
    await asyncio.wait_for(asyncio.gather(held, blocked), 1)
    assert (budget.used, budget.held) == (100, 0)


@pytest.mark.asyncio
async def test_a_held_message_is_given_back_when_its_queue_fails_or_ends() -> None:
    budget = ByteBudget(100)
    queue = FlowQueue(1)
    queue.use_budgets((budget,))
    await queue.put(b"a")
    held = asyncio.create_task(queue.put(b"b" * 50))
    await asyncio.sleep(0)
    assert budget.held == 50
    queue.fail(Cancelled("gone"))
    with pytest.raises(Cancelled):
        await asyncio.wait_for(held, 1)
    assert (budget.used, budget.held) == (0, 0)
    ended = FlowQueue(1)
    ended.use_budgets((budget,))
    await ended.put(b"a")
    held = asyncio.create_task(ended.put(b"b" * 50))
    await asyncio.sleep(0)
    ended.end(drop=True)
    await asyncio.wait_for(held, 1)
    assert (budget.used, budget.held) == (0, 0)


@pytest.mark.asyncio
async def test_readers_that_all_hold_messages_still_go_through_in_turn() -> None:
    # Held bytes count against other takers, but never block a taker while nothing is queued:
    # two readers each holding more than half the budget must not wait for each other forever.
    budget = ByteBudget(100)
    first, second, third = FlowQueue(16), FlowQueue(16), FlowQueue(16)
    for queue in (first, second, third):
        queue.use_budgets((budget,))
    await third.put(b"z" * 50)
    a = asyncio.create_task(first.put(b"a" * 60))
    b = asyncio.create_task(second.put(b"b" * 60))
    await asyncio.sleep(0)
    assert not a.done() and not b.done() and budget.held == 120
    third.poll()
    done, _ = await asyncio.wait((a, b), timeout=1, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1 and budget.used == 60
    (first if a in done else second).poll()
    await asyncio.wait_for(asyncio.gather(a, b), 1)
    assert (budget.used, budget.held) == (60, 0)


@pytest.mark.asyncio
async def test_a_failed_or_dropped_queue_gives_its_bytes_back_and_frees_its_waiter() -> None:
    user, total = ByteBudget(50), ByteBudget(1000)
    queue = FlowQueue(16)
    queue.use_budgets((user, total))
    await queue.put(b"x" * 50)
    blocked = asyncio.create_task(queue.put(b"y"))
    await asyncio.sleep(0)
    queue.fail(Cancelled("gone"))
    with pytest.raises(Cancelled):
        await asyncio.wait_for(blocked, 1)
    assert (user.used, total.used) == (0, 0)
    other = FlowQueue(16)
    other.use_budgets((user, total))
    await other.put(b"z" * 40)
    other.end(drop=True)
    assert (user.used, total.used) == (0, 0)


@pytest.mark.asyncio
async def test_a_full_user_budget_holds_back_that_user_only() -> None:
    budgets = Budgets(per_user=10, total=1000)
    alice_a, alice_b, bob = FlowQueue(16), FlowQueue(16), FlowQueue(16)
    alice_a.use_budgets(budgets.acquire("alice"))
    alice_b.use_budgets(budgets.acquire("alice"))
    bob.use_budgets(budgets.acquire("bob"))
    await alice_a.put(b"x" * 10)
    blocked = asyncio.create_task(alice_b.put(b"y"))
    await asyncio.wait_for(bob.put(b"z" * 10), 1)  # bob is not held back by alice's budget
    await asyncio.sleep(0)
    assert not blocked.done()
    alice_a.poll()
    await asyncio.wait_for(blocked, 1)
    budgets.release("alice")
    budgets.release("alice")
    assert budgets.acquire("alice")[0].used == 0  # a fresh budget once all of alice's sessions ended


def test_the_default_total_is_half_the_container_limit(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("1073741824\n")
    assert default_total_bytes(tmp_path) == 512 * 1024**2
    (tmp_path / "memory.max").write_text("max\n")
    assert default_total_bytes(tmp_path) == DEFAULT_TOTAL_BYTES


class CountingBudget(ByteBudget):
    """A ByteBudget that counts its waiters' registrations (each wake-up that finds no room re-registers)."""

    __slots__ = ("registered",)

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.registered = 0

    def notify(self, waiter: asyncio.Future[None]) -> None:
        self.registered += 1
        super().notify(waiter)


@pytest.mark.asyncio
async def test_a_budget_past_its_limit_wakes_one_waiter_when_room_comes_and_none_before() -> None:
    """Thousands of one user's streams hold their windows past the budget: each byte unheld woke every waiting
    queue, each found no room and waited again, O(waiters) per message (3,000 forwarded connections of one
    port-forward took a minute, the router at 100% CPU)."""
    budget = CountingBudget(100)
    budget.hold(1000)  # the streams' windows (StreamCredit), past the limit: only an empty queue lets one in
    first = FlowQueue(16)
    first.use_budgets((budget,))
    await first.put(b"a" * 10)
    queues = [FlowQueue(16) for _ in range(50)]
    for queue in queues:
        queue.use_budgets((budget,))
    puts = [asyncio.create_task(queue.put(b"b" * 10)) for queue in queues]
    await asyncio.sleep(0)
    assert budget.registered == 50 and not any(put.done() for put in puts)
    for _ in range(10):
        budget.unhold(1)  # a stream's window shrank: still no room
        await asyncio.sleep(0)
    assert budget.registered == 50  # nobody was woken for nothing
    assert first.poll() == b"a" * 10  # the queue empties: one may queue
    for _ in range(3):
        await asyncio.sleep(0)
    assert [put.done() for put in puts] == [True] + [False] * 49  # the first to wait, alone
    assert budget.registered == 50
    for put in puts:
        put.cancel()
    await asyncio.gather(*puts, return_exceptions=True)


def test_opening_messages_fill_at_most_the_users_budget_and_are_given_back() -> None:
    """Kept opening messages count as held in both budgets; a user's alone never pass her budget."""
    budgets = Budgets(per_user=100, total=150)
    mallory, _ = budgets.acquire("mallory")
    budgets.acquire("alice")
    assert budgets.init_fits("mallory", 60)
    budgets.hold_init("mallory", 60)
    assert (mallory.held, budgets.total.held) == (60, 60)
    assert not budgets.init_fits("mallory", 41)  # her budget
    assert budgets.init_fits("alice", 90)
    budgets.hold_init("alice", 80)
    assert not budgets.init_fits("alice", 11)  # the process's budget
    budgets.unhold_init("mallory", 60)
    assert (mallory.held, budgets.total.held) == (0, 80)
    assert budgets.init_fits("mallory", 70)
