"""client/backoff.py: the waits between a resume's or an attach's attempts, up to their deadline."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from osmo_router.client.backoff import BACKOFF_INITIAL, BACKOFF_MAX, attempts

#: The deadline of these tests: long enough for five waits (0.05 + 0.1 + 0.2 + 0.4 + 0.8 s).
WITHIN = 2.0


async def _run(jitter: bool) -> tuple[list[float], list[float], float]:
    """When each attempt came (seconds from the start), the time it was given, and when the attempts ended."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    times: list[float] = []
    left: list[float] = []
    async with asyncio.timeout(WITHIN + 5 * BACKOFF_MAX):  # (bounded: attempts must end by themselves)
        async for remaining in attempts(WITHIN, jitter=jitter):
            times.append(loop.time() - start)
            left.append(remaining)
    return times, left, loop.time() - start


@pytest.mark.asyncio
@pytest.mark.parametrize("jitter", [False, True])
async def test_attempts_wait_doubling_steps_and_none_comes_after_the_deadline(jitter: bool) -> None:
    times, left, ended = await _run(jitter)
    assert len(times) >= 2, times
    assert times[0] < BACKOFF_INITIAL, times  # the first attempt at once
    steps = [min(BACKOFF_INITIAL * 2**n, BACKOFF_MAX) for n in range(len(times) - 1)]
    least = [step / 2 if jitter else step for step in steps]  # jittered: 50-100% of the step
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= wait for gap, wait in zip(gaps, least, strict=True)), (gaps, least)
    # Each attempt is given the time left, and there is some: none is made past the deadline.
    assert all(0 < remaining <= WITHIN for remaining in left), left
    assert all(moment < WITHIN for moment in times), times
    # No wait was begun that would end past the deadline: the attempts end before it, not after a last step.
    assert ended < WITHIN + BACKOFF_MAX / 2, (times, ended)
