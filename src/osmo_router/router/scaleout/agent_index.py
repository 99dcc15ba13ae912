"""A workflow's agents in the shared directory: the keys that index them and the scripts that keep them.

    osmo:agent:{WORKFLOW}:TASK    hash owner, replica, address, agent_id   an agent registered somewhere
    osmo:agents:{WORKFLOW}        sorted set of TASK by last refresh       drops the tasks of a lost replica
    osmo:agents-age:{WORKFLOW}    sorted set of TASK by registration (us)  the oldest agent, as `pick` takes it
    osmo:agents-names:{WORKFLOW}  sorted set of TASK, all scored 0         the first task names, in order

A client that names no task gets, whichever replica it reaches, what one router gives it (core/registry.py
`pick`): the task-less agent, else the oldest registered one; and is told the tasks (core/session.py
DefaultedTask). `DEFAULT_AGENT` answers both in one round trip, its reply bounded to `max names` names
(TASK is percent-encoded, so names are ordered as encoded: the same order for ordinary names). A lost
replica's tasks leave the refresh index (and the other two) at the next registration or refresh in
the workflow once their TTL passed; the lookup also drops any oldest task whose entry has expired.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

from osmo_router.router.core.placement import Owner


def q(value: str) -> str:
    """An id percent-encoded for use in a key (a `:` or `{` cannot forge another key)."""
    return quote(value, safe="")


def agent_prefix(workflow_id: str) -> str:
    """The common prefix of a workflow's agent entries."""
    return f"osmo:agent:{{{q(workflow_id)}}}:"


def agent_key(workflow_id: str, task: str) -> str:
    """The key of the agent entry for a workflow and task."""
    return f"{agent_prefix(workflow_id)}{q(task)}"


def agent_index(workflow_id: str) -> str:
    """The key of a workflow's task index (by last refresh)."""
    return f"osmo:agents:{{{q(workflow_id)}}}"


def agent_keys(workflow_id: str, task: str) -> list[str]:
    """The keys CLAIM_AGENT and the agent release write: the entry, then the three indexes."""
    wf = q(workflow_id)
    return [
        agent_key(workflow_id, task),
        agent_index(workflow_id),
        f"osmo:agents-age:{{{wf}}}",
        f"osmo:agents-names:{{{wf}}}",
    ]


# KEYS: agent_keys. ARGV: owner, replica, address, agent id, ttl ms, index member, take over ('1').
# A registration (take over) dates the agent now; a refresh keeps its date (or dates it, after Redis lost it).
CLAIM_AGENT = """
if ARGV[7] ~= '1' then
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner and owner ~= ARGV[1] then return 0 end
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'replica', ARGV[2], 'address', ARGV[3], 'agent_id', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cutoff = now - tonumber(ARGV[5])
for _, stale in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)) do
  redis.call('ZREM', KEYS[3], stale)
  redis.call('ZREM', KEYS[4], stale)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
redis.call('ZADD', KEYS[2], now, ARGV[6])
-- Dated in microseconds (exact in a double until the year 2255): registrations within a millisecond keep their order.
local since = tonumber(t[1]) * 1000000 + tonumber(t[2])
if ARGV[7] == '1' then redis.call('ZADD', KEYS[3], since, ARGV[6])
else redis.call('ZADD', KEYS[3], 'NX', since, ARGV[6]) end
redis.call('ZADD', KEYS[4], 0, ARGV[6])
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
return 1
"""

# KEYS: agent_keys(workflow, ""). ARGV: the workflow's entry prefix, how many names to return.
# Returns {entry of the chosen agent or {}, its task, the number of tasks, the first names}.
DEFAULT_AGENT = """
local entry = redis.call('HGETALL', KEYS[1])
local task = ''
if #entry == 0 then
  while true do
    local first = redis.call('ZRANGE', KEYS[3], 0, 0)
    if #first == 0 then break end
    entry = redis.call('HGETALL', ARGV[1] .. first[1])
    if #entry > 0 then task = first[1] break end
    redis.call('ZREM', KEYS[3], first[1])  -- its entry expired: its replica is gone
    redis.call('ZREM', KEYS[4], first[1])
  end
end
return {entry, task, redis.call('ZCARD', KEYS[4]), redis.call('ZRANGE', KEYS[4], 0, tonumber(ARGV[2]) - 1)}
"""


@dataclass(frozen=True)
class DefaultAgent:
    """The agent a client naming no task gets, and the workflow's tasks it is told of."""

    #: The replica holding it; None when it is this one.
    owner: Owner | None
    task: str
    #: The first task names, in order (at most the number asked for).
    tasks: tuple[str, ...]
    #: How many tasks the workflow has.
    count: int


def parse_default(reply: list[object]) -> tuple[list[object], str, int, tuple[str, ...]]:
    """DEFAULT_AGENT's reply as (entry fields, task, count, names), the ids decoded."""
    entry, task, count, names = reply
    assert isinstance(entry, list) and isinstance(names, list)
    return entry, unquote(str(task)), int(str(count)), tuple(unquote(str(name)) for name in names)
