"""WriteWatchdog: one timer per period bounds every write, like asyncio.timeout around each."""

from __future__ import annotations

import asyncio
import time

import pytest

from osmo_router.router.core.flow_control import WriteInterrupted, WriteWatchdog

TIMEOUT = 0.2


@pytest.mark.asyncio
async def test_a_stuck_write_times_out() -> None:
    watchdog = WriteWatchdog(TIMEOUT)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(5):
            with watchdog:
                await never
    assert TIMEOUT <= time.monotonic() - started < 2.5
    assert watchdog.fired
    watchdog.close()


@pytest.mark.asyncio
async def test_quick_writes_spanning_many_periods_never_time_out() -> None:
    watchdog = WriteWatchdog(TIMEOUT)
    deadline = time.monotonic() + 4 * TIMEOUT
    writes = 0
    while time.monotonic() < deadline:
        with watchdog:
            await asyncio.sleep(TIMEOUT / 20)
        writes += 1
    watchdog.close()
    assert not watchdog.fired
    assert writes >= 10


@pytest.mark.asyncio
async def test_idle_time_between_writes_does_not_count() -> None:
    watchdog = WriteWatchdog(TIMEOUT)
    with watchdog:
        await asyncio.sleep(0)
    await asyncio.sleep(3 * TIMEOUT)  # idle, not writing: the timer fires and finds nothing to do
    with watchdog:
        await asyncio.sleep(TIMEOUT / 4)
    watchdog.close()
    assert not watchdog.fired


@pytest.mark.asyncio
async def test_a_write_that_starts_late_in_a_period_gets_its_full_timeout() -> None:
    watchdog = WriteWatchdog(TIMEOUT)
    with watchdog:
        await asyncio.sleep(0)
    await asyncio.sleep(TIMEOUT * 0.8)  # the timer armed by the first write fires during the next one
    with watchdog:
        await asyncio.sleep(TIMEOUT * 0.6)
    watchdog.close()
    assert not watchdog.fired


@pytest.mark.asyncio
async def test_an_outside_cancellation_stays_a_cancellation() -> None:
    watchdog = WriteWatchdog(TIMEOUT)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def write() -> None:
        with watchdog:
            await never

    task = asyncio.create_task(write())
    await asyncio.sleep(TIMEOUT / 4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not watchdog.fired
    watchdog.close()


@pytest.mark.asyncio
async def test_interrupt_stops_the_write_in_progress_only() -> None:
    watchdog = WriteWatchdog(30.0)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    entered = asyncio.Event()

    async def write() -> str:
        with watchdog:
            entered.set()
            await never
        return "finished"

    task = asyncio.create_task(write())
    await entered.wait()
    watchdog.interrupt()
    with pytest.raises(WriteInterrupted):
        async with asyncio.timeout(5):
            await task
    assert not watchdog.fired
    watchdog.close()
    watchdog.interrupt()  # after close (and between writes) it does nothing


@pytest.mark.asyncio
async def test_interrupt_between_writes_does_nothing() -> None:
    watchdog = WriteWatchdog(30.0)
    with watchdog:
        await asyncio.sleep(0)
    watchdog.interrupt()
    await asyncio.sleep(0.01)  # a stray cancellation would surface here
    with watchdog:
        await asyncio.sleep(0)
    watchdog.close()


async def _write_steadily(watchdog: WriteWatchdog, size: int, pause: float, writes: int) -> int:
    """`writes` writes of `size` bytes, each taking `pause` seconds, back to back; the count done."""
    done = 0
    for _ in range(writes):
        with watchdog:
            await asyncio.sleep(pause)
        watchdog.moved += size
        done += 1
    return done


@pytest.mark.asyncio
async def test_a_trickle_of_short_writes_is_ended_by_the_minimum_drain_rate() -> None:
    # 4 KiB every 20 ms is 200 KiB/s: under a 1 MiB/s minimum, though no write comes near the timeout.
    watchdog = WriteWatchdog(0.2, min_rate=1024 * 1024)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(5):
            await _write_steadily(watchdog, 4096, 0.02, 1000)
    assert watchdog.fired and watchdog.slow
    watchdog.close()


@pytest.mark.asyncio
async def test_a_reader_at_the_rate_or_without_the_rule_goes_on() -> None:
    fast = WriteWatchdog(0.2, min_rate=1024 * 1024)
    assert await _write_steadily(fast, 256 * 1024, 0.02, 30) == 30  # 12.5 MiB/s
    assert not fast.fired
    fast.close()
    off = WriteWatchdog(0.2)
    assert await _write_steadily(off, 1, 0.02, 30) == 30
    assert not off.fired
    off.close()


@pytest.mark.asyncio
async def test_a_period_in_which_the_writer_waited_for_data_is_not_held_against_the_reader() -> None:
    # Idle 30 x 50 ms = 1.5 s, past the 1 s timeout were it counted; writing 30 x 5 ms = 0.15 s, which a
    # loaded machine may stretch 6x before the rate rule judges it (0.2 s and 15 ms idles failed once
    # under a load of 8: the writes themselves took over 0.2 s).
    watchdog = WriteWatchdog(1.0, min_rate=1024 * 1024)
    for _ in range(30):  # a slow sender: the writer idles between small writes
        with watchdog:
            await asyncio.sleep(0.005)
        watchdog.moved += 100
        watchdog.idle()
        await asyncio.sleep(0.05)
    assert not watchdog.fired
    watchdog.close()


async def _trickle_with_gaps(watchdog: WriteWatchdog, gap_every: int, writes: int) -> None:
    """4 KiB writes of 20 ms each; every `gap_every` writes the queue runs empty for 30 ms (the
    sender is held back by a shared budget), as the stall test's trickle reader sees it."""
    for done in range(writes):
        if done % gap_every == gap_every - 1:
            watchdog.idle()
            await asyncio.sleep(0.03)
        with watchdog:
            await asyncio.sleep(0.02)
        watchdog.moved += 4096


@pytest.mark.asyncio
async def test_a_trickle_whose_queue_runs_empty_now_and_then_is_still_ended() -> None:
    # 200 KiB/s of writing time, under 1 MiB/s: a short wait for data in every period must not
    # exempt the period (before: it was thrown away, or never judged, and the trickle went on).
    watchdog = WriteWatchdog(0.2, min_rate=1024 * 1024)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(5):
            await _trickle_with_gaps(watchdog, 4, 1000)
    assert watchdog.fired and watchdog.slow
    watchdog.close()


@pytest.mark.asyncio
async def test_a_slow_sender_with_a_fast_reader_goes_on() -> None:
    # Mostly waiting for data, each write quick and large: the reader keeps up, nothing fires.
    watchdog = WriteWatchdog(0.2, min_rate=1024 * 1024)
    for _ in range(40):
        watchdog.idle()
        await asyncio.sleep(0.02)
        with watchdog:
            await asyncio.sleep(0.002)
        watchdog.moved += 64 * 1024
    assert not watchdog.fired
    watchdog.close()
