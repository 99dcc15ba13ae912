"""MemoryGuard: above its limit it ends the held-back sessions of the user who has the most of them."""

from __future__ import annotations

import asyncio

import pytest

from osmo_router.router.core.memory_guard import MemoryGuard, ResidentSize, default_limit
from osmo_router.router.core.sessions import Session
from osmo_router.wire.errors import ResourceExhausted

MIB = 1 << 20


def _session(user: str) -> Session:
    return Session(key=f"k-{user}", workflow_id="wf", task="", buffer=1, user=user)


async def _hold_back(session: Session) -> asyncio.Task[None]:
    """Fill the session's queue toward the agent and start a put that waits (its reader is held back)."""
    await session.to_agent.put(b"\x12first")
    task = asyncio.create_task(session.to_agent.put(b"\x12second"))
    await asyncio.sleep(0)
    assert session.to_agent.held_back
    return task


@pytest.mark.asyncio
async def test_the_heaviest_users_held_back_sessions_are_ended_and_no_one_elses() -> None:
    mallory = [_session("mallory") for _ in range(3)]
    alice_held, alice_free = _session("alice"), _session("alice")
    puts = [await _hold_back(s) for s in (*mallory, alice_held)]
    ended: list[tuple[str, int]] = []
    guard = MemoryGuard(100 * MIB, lambda: [*mallory, alice_held, alice_free], lambda u, n: ended.append((u, n)))
    assert guard.check(200 * MIB)
    assert ended == [("mallory", 3)]
    assert all(isinstance(s.error, ResourceExhausted) for s in mallory)
    assert alice_held.error is None and alice_free.error is None
    for put in puts[:3]:  # her readers' puts raise the session's error
        with pytest.raises(ResourceExhausted):
            await put
    # Right after, only more of mallory's would be ended; later, alice's held-back one is next.
    assert not guard.check(200 * MIB)
    guard._last_until = 0.0  # the pause is over
    assert guard.check(200 * MIB)
    assert ended[-1] == ("alice", 1) and alice_free.error is None
    assert not guard.check(200 * MIB)  # nothing held back any more
    with pytest.raises(ResourceExhausted):
        await puts[3]


@pytest.mark.asyncio
async def test_the_guard_acts_only_above_its_limit() -> None:
    session = _session("mallory")
    put = await _hold_back(session)
    readings = iter([50 * MIB, 99 * MIB, 101 * MIB])
    guard = MemoryGuard(100 * MIB, lambda: [session], lambda u, n: None, rss=lambda: next(readings, 0))
    runner = asyncio.create_task(guard.run(interval=0.01))
    async with asyncio.timeout(5):
        with pytest.raises(ResourceExhausted):
            await put
    runner.cancel()
    assert session.error is not None


def test_default_limit() -> None:
    assert default_limit(2048 * MIB, 4096 * MIB) == 3072 * MIB  # 3/4 of the container's limit
    assert default_limit(2048 * MIB, None) == 3072 * MIB  # 1.5 x the total budget


def test_resident_size_follows_the_process_rss_through_its_open_descriptor() -> None:
    reader = ResidentSize()
    try:
        before = reader()
        ballast = b"\x01" * (64 * MIB)  # (every page written: resident)
        after = reader()
        with open("/proc/self/status") as status_file:
            status = dict(line.split(":", 1) for line in status_file.read().splitlines())
        vm_rss = int(status["VmRSS"].split()[0]) * 1024
    finally:
        reader.close()
    assert after - before >= 60 * MIB  # the same descriptor read again sees the new pages
    assert abs(after - vm_rss) < 8 * MIB  # and agrees with the kernel's other account of it
    assert reader() == 0  # closed: no reading, no error
    del ballast
