"""The directory shared by router replicas, in Redis.

Keys (every one written with a TTL and refreshed by each replica's heartbeat, so the entries of a
replica that crashed vanish on their own; deleted at once on unregister, session end or shutdown):

    osmo:agent:{WORKFLOW}:TASK   hash owner, replica, address, agent_id   an agent registered somewhere
    osmo:agents*:{WORKFLOW}      sorted sets of TASK (agent_index.py)     finds an agent when no task is given
    osmo:session:SHA256(KEY)     hash owner, replica, address, workflow   a session held somewhere

Ids are percent-encoded, so a `:` or `{` in a workflow id cannot forge another key; the braces
make a workflow's keys one Redis Cluster hash slot. Session keys are stored hashed: reading the
directory does not reveal a key that would let one join a session.

Every write is conditional on ownership (Lua): a refresh never overwrites an entry that another
replica took over since (a newer registration of the same agent target wins, as it does on one
replica), and a delete never removes another replica's entry. Redis errors never reach the
sessions of this replica: writes are retried by the next heartbeat, lookups raise
DirectoryUnavailable.

A Redis that restarted empty (or was flushed) holds no agents until every replica's heartbeat has
re-published its own, up to a third of the TTL later. A miss in that window is not "no agent is
registered" (issue 15): one more key tells it apart,

    osmo:directory               "start:MS" or "rebuild:MS"                 when this content began

written set-if-absent with the TTL by every replica at start ("start") and by every heartbeat and
registration ("rebuild": a replica that finds it missing after its start is re-publishing into an
emptied Redis), so it lives as long as any replica does. A lookup that finds no agent reads it (one
more round trip, on misses only): absent, or "rebuild" less than a heartbeat interval (plus the
operation timeout) ago, means the directory is being rebuilt, and the lookup raises
DirectoryUnavailable saying so and to retry, instead of reporting no agent. Limit: a replica that
starts while the others are still re-publishing writes "start", so misses in what is left of that
window read as "no agent".

The agents' keys and scripts are in agent_index.py, the sessions' and the epoch's in redis_schema.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from osmo_router.router.core.placement import Owner
from osmo_router.router.core.registry import AgentRegistration
from osmo_router.router.core.session import MAX_TASKS_TOLD
from osmo_router.router.scaleout.agent_index import (
    CLAIM_AGENT,
    DEFAULT_AGENT,
    DefaultAgent,
    agent_key,
    agent_keys,
    agent_prefix,
    parse_default,
    q,
)
from osmo_router.router.scaleout.directory import DirectoryUnavailable, SessionAlive
from osmo_router.router.scaleout.redis_schema import (
    CLAIM_SESSION,
    EPOCH_KEY,
    MARK_EPOCH,
    READ_EPOCH,
    RELEASE,
    session_entry,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(eq=False)
class _AgentEntry:
    reg: AgentRegistration
    owner: str


class RedisDirectory:
    """This replica's view of, and contribution to, the shared directory."""

    def __init__(self, url: str, *, replica: str, ttl: float, registry: CollectorRegistry | None = None) -> None:
        self._interval = ttl / 3
        self._op_timeout = min(2.0, self._interval)
        self._redis: Redis = Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=self._op_timeout,
            socket_connect_timeout=self._op_timeout,
            # One immediate retry replaces a pooled connection that died with a restarted Redis; no
            # longer loop: the heartbeat is the retry, and callers must not stall.
            retry=Retry(NoBackoff(), 1),
        )
        self._replica = replica
        self._address = ""
        self._ttl_ms = str(int(ttl * 1000))
        self._claim_agent = self._redis.register_script(CLAIM_AGENT)
        self._default_agent = self._redis.register_script(DEFAULT_AGENT)
        self._claim_session = self._redis.register_script(CLAIM_SESSION)
        self._release = self._redis.register_script(RELEASE)
        self._mark_epoch = self._redis.register_script(MARK_EPOCH)
        self._read_epoch = self._redis.register_script(READ_EPOCH)
        self._agents: dict[tuple[str, str], _AgentEntry] = {}
        self._sessions: dict[str, str] = {}
        self._serial = 0
        self._session_alive: SessionAlive = lambda _key: True
        self._up = True
        self._wake = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None
        self._closed = False
        self._background: set[asyncio.Task[None]] = set()
        self.up_gauge = Gauge("router_grpc_directory_up", "1 while the shared directory answers.", registry=registry)
        self.errors_total = Counter(
            "router_grpc_directory_errors_total", "Failed directory operations.", registry=registry
        )
        self.up_gauge.set(1)

    @property
    def up(self) -> bool:
        """False after an operation failed, until one succeeds."""
        return self._up

    async def start(self, address: str, session_alive: SessionAlive) -> None:
        """Start the heartbeat; a Redis that is down now is logged, not fatal (local sessions work)."""
        self._address = address
        self._session_alive = session_alive
        with contextlib.suppress(DirectoryUnavailable):
            await self._call("ping", self._epoch("start"))
        self._heartbeat = asyncio.create_task(self._beat())

    async def close(self) -> None:
        """Stop the heartbeat and withdraw every entry of this replica (bounded)."""
        self._closed = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            # Bounded, and the loop checks _closed too: a cancel that lands while redis-py waits in a
            # timeout of its own can be swallowed (redis/redis-py#2551), and the heartbeat would go on
            # beating, holding shutdown up for good (seen: a test's teardown stuck for 120 s).
            self._wake.set()
            await asyncio.wait({self._heartbeat}, timeout=2 * self._op_timeout)
        agents, self._agents = self._agents, {}
        sessions, self._sessions = self._sessions, {}
        # Bounded as a whole: the pipeline's own script loading and the connection close are not
        # covered by _call's timeout, and a dead Redis must not hold up shutdown.
        with contextlib.suppress(DirectoryUnavailable, TimeoutError):
            async with asyncio.timeout(self._op_timeout), self._redis.pipeline(transaction=False) as pipe:
                for (workflow_id, task), entry in agents.items():
                    await self._release(
                        keys=agent_keys(workflow_id, task),
                        args=[entry.owner, q(task)],
                        client=pipe,
                    )
                for key in sessions:
                    await self._release(keys=[session_entry(key)], args=[self._replica], client=pipe)
                await self._call("withdraw", pipe.execute())
        if self._background:
            await asyncio.wait(self._background, timeout=self._op_timeout)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._op_timeout):
                await self._redis.aclose()

    async def agent_registered(self, reg: AgentRegistration) -> None:
        """Publish (and take over) the agent's target; if Redis is down, the heartbeat publishes it later."""
        self._serial += 1
        entry = _AgentEntry(reg, f"{self._replica}/{self._serial}")
        self._agents[(reg.workflow_id, reg.task)] = entry
        with contextlib.suppress(DirectoryUnavailable):
            await self._call("publish agent", self._write_agent(entry, take_over=True))
            await self._call("publish agent", self._epoch("rebuild"))

    def agent_unregistered(self, reg: AgentRegistration) -> None:
        """Withdraw the agent unless a newer registration took its place."""
        entry = self._agents.get((reg.workflow_id, reg.task))
        if entry is None or entry.reg is not reg:
            return
        del self._agents[(reg.workflow_id, reg.task)]
        keys = agent_keys(reg.workflow_id, reg.task)
        self._spawn(self._call("withdraw agent", self._release(keys=keys, args=[entry.owner, q(reg.task)])))

    async def find_agent(self, workflow_id: str, task: str) -> Owner | None:
        """The replica holding an agent for the workflow (and task); the default agent when no task is given."""
        if not task:
            found = await self.default_agent(workflow_id)
            return found.owner if found is not None else None
        fields: Any = await self._call("find agent", self._redis.hgetall(agent_key(workflow_id, task)))
        owner = self._owner(fields)
        if owner is None and not fields:
            await self._raise_if_rebuilding(workflow_id, task)
        return owner

    async def default_agent(self, workflow_id: str) -> DefaultAgent | None:
        """The agent a client naming no task gets (task-less, else oldest; agent_index.py), None if none."""
        script = self._default_agent(keys=agent_keys(workflow_id, ""), args=[agent_prefix(workflow_id), MAX_TASKS_TOLD])
        fields, task, count, names = parse_default(await self._call("find agent", script))
        if not fields:
            await self._raise_if_rebuilding(workflow_id, "")
            return None
        return DefaultAgent(self._owner(fields), task, names, count)

    async def _raise_if_rebuilding(self, workflow_id: str, task: str) -> None:
        """Raise DirectoryUnavailable if the directory is being rebuilt after Redis lost its content."""
        value, now = await self._call("find agent", self._read_epoch(keys=[EPOCH_KEY]))
        kind, _, since = str(value or "").partition(":")
        window = self._interval + self._op_timeout
        if value is None or (kind == "rebuild" and since.isdigit() and int(now) - int(since) < window * 1000):
            what = f"workflow {workflow_id!r}" + (f" task {task!r}" if task else "")
            raise DirectoryUnavailable(
                f"no agent found for {what} yet: the session directory (Redis) is being rebuilt after it "
                f"lost its content; every replica re-publishes its agents within {window:.0f}s: retry"
            )

    async def find_session(self, key: str) -> Owner | None:
        """The replica holding the session with this key."""
        return self._owner(await self._call("find session", self._redis.hgetall(session_entry(key))))

    async def claim_session(self, key: str, workflow_id: str, *, take_over: bool = False) -> Owner | None:
        """Publish a session of this replica, or return the replica that already holds the key.

        `take_over` (a resume): publish it here whoever held it. Never raises: while Redis is down
        the session stays local and the heartbeat publishes it.
        """
        try:
            write = self._write_session(key, workflow_id, take_over=take_over)
            other = await self._call("claim session", write)
        except DirectoryUnavailable:
            other = None
        owner = self._owner(other)
        if owner is None:
            self._sessions[key] = workflow_id
        return owner

    def session_removed(self, key: str) -> None:
        """Withdraw a session of this replica."""
        if self._sessions.pop(key, None) is not None:
            release = self._release(keys=[session_entry(key)], args=[self._replica])
            self._spawn(self._call("withdraw session", release))

    async def refresh(self) -> None:
        """Re-write every entry of this replica with a fresh TTL; give up agents another replica took over."""
        for key in [k for k in self._sessions if not self._session_alive(k)]:
            self.session_removed(key)
        agents = list(self._agents.values())
        sessions = list(self._sessions.items())
        if not agents and not sessions:
            await self._call("ping", self._epoch("rebuild"))
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry in agents:
                await self._write_agent(entry, take_over=False, client=pipe)
            for key, workflow_id in sessions:
                await self._write_session(key, workflow_id, client=pipe)
            # Last, after this replica's entries: "rebuild" starts once something is back in.
            await self._epoch("rebuild", client=pipe)
            results = (await self._call("refresh", pipe.execute()))[: len(agents) + len(sessions)]
        for entry, kept in zip(agents, results, strict=False):
            if not kept and self._agents.get((entry.reg.workflow_id, entry.reg.task)) is entry:
                log.info(
                    "agent %s for workflow %s task %r registered with another replica: closing it here",
                    entry.reg.agent_id,
                    entry.reg.workflow_id,
                    entry.reg.task,
                )
                del self._agents[(entry.reg.workflow_id, entry.reg.task)]
                entry.reg.replaced.set()
        for (key, _), other in zip(sessions, results[len(agents) :], strict=False):
            if other:
                self._sessions.pop(key, None)

    def _write_agent(self, entry: _AgentEntry, *, take_over: bool, client: Any = None) -> Awaitable[Any]:
        reg = entry.reg
        return self._claim_agent(
            keys=agent_keys(reg.workflow_id, reg.task),
            args=[
                entry.owner,
                self._replica,
                self._address,
                reg.agent_id,
                self._ttl_ms,
                q(reg.task),
                "1" if take_over else "0",
            ],
            client=client,
        )

    def _epoch(self, kind: str, client: Any = None) -> Awaitable[Any]:
        """Write the epoch key if it is absent (as `kind`), else extend its TTL."""
        return self._mark_epoch(keys=[EPOCH_KEY], args=[kind, self._ttl_ms], client=client)

    def _write_session(
        self, key: str, workflow_id: str, client: Any = None, *, take_over: bool = False
    ) -> Awaitable[Any]:
        return self._claim_session(
            keys=[session_entry(key)],
            args=[self._replica, self._replica, self._address, workflow_id, self._ttl_ms, "1" if take_over else "0"],
            client=client,
        )

    def _owner(self, fields: Any) -> Owner | None:
        """The owner in a hash (a dict, or the flat list a script returns); None if empty or this replica."""
        if isinstance(fields, list):
            fields = dict(zip(fields[::2], fields[1::2], strict=False))
        if not fields or not fields.get("address") or fields.get("replica") == self._replica:
            return None
        return Owner(replica=str(fields["replica"]), address=str(fields["address"]))

    async def _call(self, what: str, operation: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._op_timeout):
                result = await operation
        except (RedisError, OSError, TimeoutError) as err:
            self.errors_total.inc()
            reason = str(err) or type(err).__name__
            if self._up:
                log.warning("session directory (Redis) unreachable (%s: %s); local sessions keep working", what, reason)
            self._up = False
            self.up_gauge.set(0)
            raise DirectoryUnavailable(f"the session directory (Redis) is unreachable: {reason}") from None
        if not self._up:
            log.info("session directory (Redis) reachable again; re-publishing this replica's entries")
            self._up = True
            self.up_gauge.set(1)
            self._wake.set()
        return result

    def _spawn(self, operation: Coroutine[Any, Any, Any]) -> None:
        async def run() -> None:
            with contextlib.suppress(DirectoryUnavailable):
                await operation

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _beat(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            try:
                await self.refresh()
            except DirectoryUnavailable:
                pass
            except Exception:
                log.exception("directory heartbeat failed")
