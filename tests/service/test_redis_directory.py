"""RedisDirectory against a real redis-server: ownership, lookups, expiry and Redis outages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from osmo_router.router.core.registry import AgentRegistration
from osmo_router.router.core.session import MAX_TASKS_TOLD
from osmo_router.router.scaleout.agent_index import DefaultAgent, agent_key
from osmo_router.router.scaleout.directory import DirectoryUnavailable, Owner
from osmo_router.router.scaleout.redis_directory import RedisDirectory
from osmo_router.router.scaleout.redis_schema import EPOCH_KEY, session_entry
from tests.redis_harness import RedisServer


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the module, emptied before each test."""
    server = RedisServer()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def directories(redis_server: RedisServer) -> AsyncIterator[tuple[RedisDirectory, RedisDirectory]]:
    """Two replicas' views of one empty Redis (r1 at 10.0.0.1:1, r2 at 10.0.0.2:2)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    with redis_server.client() as client:
        client.flushall()
    views = []
    for n in (1, 2):
        view = RedisDirectory(redis_server.url, replica=f"r{n}", ttl=30.0)
        await view.start(f"10.0.0.{n}:{n}", lambda _key: True)
        views.append(view)
    yield views[0], views[1]
    for view in views:
        await view.close()


def registration(workflow: str, task: str = "", agent_id: str = "agent") -> AgentRegistration:
    """A registration as the agent service makes it."""
    return AgentRegistration(agent_id=agent_id, workflow_id=workflow, task=task, operations=())


@pytest.mark.asyncio
async def test_agents_are_found_from_other_replicas_but_not_from_their_own(
    directories: tuple[RedisDirectory, RedisDirectory],
) -> None:
    r1, r2 = directories
    await r1.agent_registered(registration("wf", "t1"))
    assert await r2.find_agent("wf", "t1") == Owner("r1", "10.0.0.1:1")
    # No task asked: any task of the workflow will do (found through the workflow's index).
    assert await r2.find_agent("wf", "") == Owner("r1", "10.0.0.1:1")
    assert await r2.find_agent("wf", "t2") is None
    assert await r2.find_agent("other", "") is None
    # A replica never relays to itself: its own entries are not "elsewhere".
    assert await r1.find_agent("wf", "t1") is None


@pytest.mark.asyncio
async def test_newest_registration_wins_across_replicas(
    directories: tuple[RedisDirectory, RedisDirectory], redis_server: RedisServer
) -> None:
    r1, r2 = directories
    old, new = registration("wf", agent_id="old"), registration("wf", agent_id="new")
    await r1.agent_registered(old)
    await r2.agent_registered(new)
    assert await r1.find_agent("wf", "") == Owner("r2", "10.0.0.2:2")
    await r1.refresh()
    assert old.replaced.is_set(), "r1 must close the registration another replica took over"
    assert not new.replaced.is_set()
    # The loser's unregistration must not delete the winner's entry.
    r1.agent_unregistered(old)
    await r1.refresh()
    with redis_server.client() as client:
        assert client.hget(agent_key("wf", ""), "agent_id") == "new"


@pytest.mark.asyncio
async def test_ids_cannot_forge_each_others_keys(directories: tuple[RedisDirectory, RedisDirectory]) -> None:
    r1, r2 = directories
    assert agent_key("a:b", "c") != agent_key("a", "b:c")
    await r1.agent_registered(registration("a:b", "c"))
    assert await r2.find_agent("a", "b:c") is None
    assert await r2.find_agent("a:b", "c") == Owner("r1", "10.0.0.1:1")
    await r1.agent_registered(registration("x}", ""))
    assert await r2.find_agent("x", "") is None


@pytest.mark.asyncio
async def test_a_session_key_has_one_owner_and_is_stored_hashed(
    directories: tuple[RedisDirectory, RedisDirectory], redis_server: RedisServer
) -> None:
    r1, r2 = directories
    key = "orchestrator-key-0123456789"
    assert await r1.claim_session(key, "wf") is None
    assert await r2.claim_session(key, "wf") == Owner("r1", "10.0.0.1:1")
    assert await r2.find_session(key) == Owner("r1", "10.0.0.1:1")
    with redis_server.client() as client:
        keys = [k for k in client.scan_iter() if k != EPOCH_KEY]
        assert keys == [session_entry(key)]
        assert key not in str(client.hgetall(keys[0]))
    r1.session_removed(key)
    await r1.close()  # waits for the background withdrawal
    assert await r2.find_session(key) is None
    assert await r2.claim_session(key, "wf") is None


@pytest.mark.asyncio
async def test_sessions_no_longer_held_are_withdrawn_by_the_heartbeat(
    directories: tuple[RedisDirectory, RedisDirectory], redis_server: RedisServer
) -> None:
    r1, _ = directories
    view = RedisDirectory(redis_server.url, replica="r3", ttl=30.0)
    await view.start("10.0.0.3:3", lambda key: key == "kept")
    try:
        await view.claim_session("kept", "wf")
        await view.claim_session("abandoned", "wf")  # e.g. the join failed after the claim
        await view.refresh()
        assert await r1.find_session("kept") == Owner("r3", "10.0.0.3:3")
        for _ in range(100):  # the withdrawal runs in the background: bounded polling
            if await r1.find_session("abandoned") is None:
                break
            await asyncio.sleep(0.02)
        assert await r1.find_session("abandoned") is None
    finally:
        await view.close()
    assert await r1.find_session("kept") is None, "close() withdraws every entry of the replica"


@pytest.mark.asyncio
async def test_redis_outage(directories: tuple[RedisDirectory, RedisDirectory], redis_server: RedisServer) -> None:
    r1, r2 = directories
    reg = registration("wf")
    redis_server.kill()
    # Writes are best effort and never raise; lookups say what is wrong.
    await r1.agent_registered(reg)
    assert await r1.claim_session("k", "wf") is None
    with pytest.raises(DirectoryUnavailable, match="Redis"):
        await r2.find_agent("wf", "")
    assert not r2.up and r2.up_gauge.collect()[0].samples[0].value == 0
    redis_server.start()
    # The heartbeat writes what could not be written while Redis was away.
    await r1.refresh()
    assert r1.up
    assert await r2.find_agent("wf", "") == Owner("r1", "10.0.0.1:1")
    assert await r2.find_session("k") == Owner("r1", "10.0.0.1:1")
    assert r2.up and not reg.replaced.is_set()


@pytest.mark.asyncio
async def test_a_miss_while_the_directory_is_rebuilt_says_so(redis_server: RedisServer) -> None:
    """After Redis lost its content, a miss is "being rebuilt" until a heartbeat interval after it refills."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    with redis_server.client() as client:
        client.flushall()
    r1 = RedisDirectory(redis_server.url, replica="r1", ttl=30.0)
    r2 = RedisDirectory(redis_server.url, replica="r2", ttl=1.5)  # rebuild window: 0.5 + 0.5 s
    try:
        await r1.start("10.0.0.1:1", lambda _key: True)
        await r2.start("10.0.0.2:2", lambda _key: True)
        await r1.agent_registered(registration("wf"))
        assert await r2.find_agent("gone", "") is None  # a fresh directory: a miss is a miss
        with redis_server.client() as client:
            client.flushall()  # what a restarted Redis holds
        with pytest.raises(DirectoryUnavailable, match=r"being rebuilt.*retry"):
            await r2.find_agent("wf", "")
        await r1.refresh()  # r1's heartbeat re-publishes
        assert await r2.find_agent("wf", "") == Owner("r1", "10.0.0.1:1")
        with pytest.raises(DirectoryUnavailable, match="being rebuilt"):
            await r2.find_agent("gone", "")  # other replicas may not have re-published yet
        for _ in range(200):  # the window closes a heartbeat interval later: bounded polling
            try:
                assert await r2.find_agent("gone", "") is None
                break
            except DirectoryUnavailable:
                await asyncio.sleep(0.02)
        else:
            raise AssertionError("the rebuild window never closed")
        assert r2.up
    finally:
        await r1.close()
        await r2.close()


@pytest.mark.asyncio
async def test_a_resume_takes_the_session_entry_over(
    directories: tuple[RedisDirectory, RedisDirectory], redis_server: RedisServer
) -> None:
    """The replica serving a resume publishes the session whoever held it (the old holder may be dead)."""
    r1, r2 = directories
    key = "resumed-session-key"
    assert await r1.claim_session(key, "wf") is None
    assert await r2.claim_session(key, "wf", take_over=True) is None
    assert await r1.find_session(key) == Owner("r2", "10.0.0.2:2")
    # The old holder's refresh does not take it back, and its withdrawal does not remove r2's entry.
    await r1.refresh()
    assert await r1.find_session(key) == Owner("r2", "10.0.0.2:2")
    r1.session_removed(key)
    await r1.close()
    with redis_server.client() as client:
        assert client.hget(session_entry(key), "replica") == "r2"
    assert await r2.claim_session(key, "wf") is None


@pytest.mark.asyncio
async def test_close_is_bounded_when_a_redis_call_swallows_the_cancel(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py can swallow a cancel that lands in a timeout of its own (redis/redis-py#2551): the
    heartbeat then went on beating and close(), awaiting it, never returned (a teardown stuck 120 s)."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    view = RedisDirectory(redis_server.url, replica="r1", ttl=3.0)
    await view.start("10.0.0.1:1", lambda _key: True)
    beating = asyncio.Event()

    async def refresh_that_swallows_a_cancel() -> None:
        beating.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # what redis-py's timeout may do with it

    monkeypatch.setattr(view, "refresh", refresh_that_swallows_a_cancel)
    async with asyncio.timeout(10):  # the heartbeat beats every second (ttl / 3)
        await beating.wait()
    async with asyncio.timeout(10):
        await view.close()
    heartbeat = view._heartbeat
    assert heartbeat is not None and heartbeat.done()


# The agent a client naming no task gets across replicas (scaleout/agent_index.py): the task-less one, else
# the oldest registered, and the first MAX_TASKS_TOLD task names, whichever replica asks.
R1 = Owner("r1", "10.0.0.1:1")


@pytest.mark.asyncio
async def test_the_oldest_agent_and_the_first_names_whichever_replica_asks(
    directories: tuple[RedisDirectory, RedisDirectory], redis_server: RedisServer
) -> None:
    r1, r2 = directories
    # Registered newest name first, alternating replicas: age and name order disagree.
    names = [f"t{n:03d}" for n in range(3 * MAX_TASKS_TOLD)]
    regs = {}
    for n, task in enumerate(reversed(names)):
        regs[task] = registration("wf", task, agent_id=task)
        await (r1 if n % 2 == 0 else r2).agent_registered(regs[task])
    told = tuple(names[:MAX_TASKS_TOLD])
    oldest = names[-1]  # registered first, by r1
    assert await r2.default_agent("wf") == DefaultAgent(R1, oldest, told, len(names))
    assert await r1.default_agent("wf") == DefaultAgent(None, oldest, told, len(names))
    assert await r2.find_agent("wf", "") == R1
    # A heartbeat keeps an agent's age (it is not a new registration).
    await r1.refresh()
    await r2.refresh()
    assert (await r2.default_agent("wf")) == DefaultAgent(R1, oldest, told, len(names))
    # A lost replica's entry (expired) is skipped and dropped from the indexes: the next oldest, r2's.
    with redis_server.client() as client:
        client.delete(agent_key("wf", oldest))  # as if r1 died and the TTL passed
    assert await r2.default_agent("wf") == DefaultAgent(None, names[-2], told, len(names) - 1)
    # A replica that shuts down withdraws its agents from every index.
    await r1.close()
    left = list(reversed(names))[1::2]
    assert await r2.default_agent("wf") == DefaultAgent(
        None, names[-2], tuple(sorted(left)[:MAX_TASKS_TOLD]), len(left)
    )


@pytest.mark.asyncio
async def test_a_task_less_agent_is_chosen_first(directories: tuple[RedisDirectory, RedisDirectory]) -> None:
    r1, r2 = directories
    await r2.agent_registered(registration("wf", "a"))
    await r1.agent_registered(registration("wf", ""))
    assert await r2.default_agent("wf") == DefaultAgent(R1, "", ("", "a"), 2)
    assert await r2.default_agent("other") is None
