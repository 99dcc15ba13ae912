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
    assert not blocked.done() and budget.used == 100
    assert first.poll() == b"a" * 80  # another queue of the budget drains: room for the waiter
    await asyncio.wait_for(blocked, 1)
    assert budget.used == 30


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
