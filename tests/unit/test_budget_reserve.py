"""Reservations in a byte budget: what a waiting WebSocket side may read before it knows what it read."""

from __future__ import annotations

import asyncio

import pytest

from osmo_router.router.core.budget import ByteBudget
from osmo_router.router.ws.read_budget import reserve as _reserve
from osmo_router.router.ws.read_budget import try_reserve as _try_reserve


def test_reservations_take_at_most_half_the_budget_and_one_always_fits() -> None:
    budget = ByteBudget(100)
    assert budget.reserve_fits(500)  # none held: one fits, whatever its size
    budget.reserve(30)
    assert budget.reserve_fits(20) and not budget.reserve_fits(21)
    assert (budget.reserved, budget.held) == (30, 30)  # other queues see it as held
    budget.unreserve(30)
    assert (budget.reserved, budget.held) == (0, 0)


@pytest.mark.asyncio
async def test_a_reservation_given_back_wakes_the_reservers_that_fit_first_come_first_served() -> None:
    budget = ByteBudget(100)
    budget.reserve(50)
    loop = asyncio.get_running_loop()
    first, second, third = (loop.create_future() for _ in range(3))
    for waiter in (first, second, third):
        budget.notify_reserve(30, waiter)
    budget.unreserve(50)  # room for one of 30 (half the budget is 50)
    assert first.done() and not second.done() and not third.done()
    budget.reserve(30)
    budget.unreserve(0)  # nothing given back: nobody else fits yet
    assert not second.done()
    budget.unreserve(30)
    assert second.done() and not third.done()


@pytest.mark.asyncio
async def test_a_waiting_side_reserves_in_all_its_budgets_once_both_have_room() -> None:
    user, total = ByteBudget(100), ByteBudget(100)
    assert _try_reserve((user, total), 50)  # both full now (reservations take half a budget)
    first = asyncio.create_task(_reserve((user, total), 50))
    second = asyncio.create_task(_reserve((user, total), 50))
    await asyncio.sleep(0)
    user.unreserve(50)  # room in her budget, none in the process's yet: both wait there (passed on)
    for _ in range(3):
        await asyncio.sleep(0)
    assert not first.done() and not second.done()
    total.unreserve(50)
    await asyncio.wait_for(first, 1)
    assert (user.reserved, total.reserved) == (50, 50) and not second.done()
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    assert (user.reserved, total.reserved) == (50, 50)
