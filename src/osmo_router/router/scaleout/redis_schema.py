"""The directory's layout in Redis: its keys, and the Lua scripts that write them only where this replica owns them.

What each key holds, and why the epoch key exists, is told in redis_directory.py's docstring. Every
script is atomic in Redis: two replicas that claim one entry at once cannot both win.
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote

# KEYS: entry, task index. ARGV: owner, replica, address, agent id, ttl ms, index member, take over ('1').
CLAIM_AGENT = """
if ARGV[7] ~= '1' then
  local owner = redis.call('HGET', KEYS[1], 'owner')
  if owner and owner ~= ARGV[1] then return 0 end
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'replica', ARGV[2], 'address', ARGV[3], 'agent_id', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[2], now, ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[5]))
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return 1
"""

# KEYS: task-less entry, task index. ARGV: key prefix of the workflow's entries.
FIND_ANY_AGENT = """
local entry = redis.call('HGETALL', KEYS[1])
if #entry > 0 then return entry end
for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  entry = redis.call('HGETALL', ARGV[1] .. member)
  if #entry > 0 then return entry end
end
return {}
"""

# KEYS: entry. ARGV: owner, replica, address, workflow, ttl ms, take over ('1').
# Returns {} when ours (now), else the owner's entry.
CLAIM_SESSION = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] and ARGV[6] ~= '1' then return redis.call('HGETALL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'replica', ARGV[2], 'address', ARGV[3], 'workflow', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {}
"""

# KEYS: entry, and the task index for an agent. ARGV: owner, and the index member for an agent.
RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if #KEYS > 1 then redis.call('ZREM', KEYS[2], ARGV[2]) end
return 1
"""


# KEYS: the directory's epoch key. ARGV: kind ("start" or "rebuild"), ttl ms. Sets it if absent, else extends it.
MARK_EPOCH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('SET', KEYS[1], ARGV[1] .. ':' .. now, 'NX', 'PX', ARGV[2]) then return 1 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 0
"""

# KEYS: the directory's epoch key. Returns {value or nil, now ms}.
READ_EPOCH = """
local t = redis.call('TIME')
return {redis.call('GET', KEYS[1]), tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
"""

#: The key that says since when (and why) the directory's content exists; see redis_directory.py's docstring.
EPOCH_KEY = "osmo:directory"


def _q(value: str) -> str:
    return quote(value, safe="")


def index_member(task: str) -> str:
    """A task as the member of its workflow's task index (and the tail of its agent entry's key)."""
    return _q(task)


def agent_key(workflow_id: str, task: str) -> str:
    """The key of the agent entry for a workflow and task."""
    return f"{agent_prefix(workflow_id)}{_q(task)}"


def agent_prefix(workflow_id: str) -> str:
    """The common prefix of a workflow's agent entries."""
    return f"osmo:agent:{{{_q(workflow_id)}}}:"


def agent_index(workflow_id: str) -> str:
    """The key of a workflow's task index."""
    return f"osmo:agents:{{{_q(workflow_id)}}}"


def session_entry(key: str) -> str:
    """The key of a session's entry: a hash of the session key, never the key itself."""
    return "osmo:session:" + hashlib.sha256(key.encode()).hexdigest()[:32]


__all__ = [
    "CLAIM_AGENT",
    "CLAIM_SESSION",
    "EPOCH_KEY",
    "FIND_ANY_AGENT",
    "MARK_EPOCH",
    "READ_EPOCH",
    "RELEASE",
    "agent_index",
    "agent_key",
    "agent_prefix",
    "index_member",
    "session_entry",
]
