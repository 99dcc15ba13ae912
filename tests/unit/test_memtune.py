"""memtune's idle release: once per quiet spell, never while the process is busy, debounced."""

from __future__ import annotations

import asyncio
import time

import pytest

from osmo_router.io import memtune

pytestmark = pytest.mark.skipif(memtune._c_library() is None, reason="malloc is not glibc's")


async def wait_for(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("not reached in time")
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_release_waits_for_a_quiet_spell_and_runs_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(memtune, "release", lambda: calls.append(time.monotonic()) or True)
    delay = 0.3
    armed = time.monotonic()
    memtune.trim_when_idle(delay)
    memtune.trim_when_idle(delay)  # debounced: the pending check covers it
    # Busy: the loop spins for longer than the window, so the first check sees the CPU used.
    spin_until = time.monotonic() + 3 * delay
    while time.monotonic() < spin_until:
        pass
    await wait_for(lambda: calls)
    # The first check came after the spin and found it busy; the release came a quiet window later.
    assert calls[0] - armed >= 3 * delay + delay * 0.9, calls[0] - armed
    assert len(calls) == 1
    assert memtune._idle_trim.handle is None, "another check is still pending after the release"


def test_the_heap_keeps_freed_buffers_until_release() -> None:
    assert memtune.tune()  # (this test process's malloc, as every osmo process's)
    rss = memtune._rss_kib
    # Earlier tests in this process left freed memory in the heap, which the blocks would reuse
    # without growing RSS: give it back first, so that what is measured is this test's own.
    memtune.release()
    before = rss()
    size = 1 << 20
    blocks = [b"x" * size for _ in range(40)]  # 40 MiB of 1 MiB buffers (touched), as frames are
    grown = rss()
    assert grown - before > 30 << 10, (before, grown)
    del blocks
    kept = rss()
    assert kept > grown - (8 << 10), f"freed buffers were not kept for reuse: {before} {grown} {kept}"
    memtune.release()
    assert rss() < kept - (30 << 10), f"release() gave nothing back: {before} {grown} {kept} {rss()}"
