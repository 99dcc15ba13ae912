"""The directory's sessions and epoch in Redis: their keys, and the scripts that write them only where this
replica owns them (a workflow's agents and their indexes are in agent_index.py).

What each key holds, and why the epoch key exists, is told in redis_directory.py's docstring. Every
script is atomic in Redis: two replicas that claim one entry at once cannot both win.
"""

from __future__ import annotations

import hashlib

# KEYS: entry. ARGV: owner, replica, address, workflow, ttl ms, take over ('1').
# Returns {} when ours (now), else the owner's entry.
CLAIM_SESSION = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[1] and ARGV[6] ~= '1' then return redis.call('HGETALL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'replica', ARGV[2], 'address', ARGV[3], 'workflow', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {}
"""

# KEYS: entry, and for an agent its indexes (agent_index.agent_keys). ARGV: owner, and the index member for an agent.
RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
for i = 2, #KEYS do redis.call('ZREM', KEYS[i], ARGV[2]) end
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


def session_entry(key: str) -> str:
    """The key of a session's entry: a hash of the session key, never the key itself."""
    return "osmo:session:" + hashlib.sha256(key.encode()).hexdigest()[:32]


__all__ = ["CLAIM_SESSION", "EPOCH_KEY", "MARK_EPOCH", "READ_EPOCH", "RELEASE", "session_entry"]
