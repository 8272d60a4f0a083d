"""
The Lua scripts that make our compare-and-set steps atomic on Redis.

Times inside them come from the server's ``TIME``, in milliseconds, so that
replicas with skewed clocks agree on what has expired.  Numbers handed to
``redis.call`` are formatted with ``%d`` (Lua's own number-to-string
conversion would write 1.7e+12).  Scripts run with ``EVALSHA`` and are sent
with ``EVAL`` when the server does not know them yet (after a restart).
"""

from __future__ import annotations

import hashlib

from attrs import frozen

from difydaemon.coordination.redis.connection import CoordinationError

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
"""


@frozen
class Script:
    """One Lua script and its SHA-1 (what ``EVALSHA`` names it by)."""

    source: str

    @property
    def sha1(self) -> str:
        return hashlib.sha1(self.source.encode("utf-8")).hexdigest()


async def run_script(connection, script: Script, keys=(), args=()):
    """
    Run ``script`` on ``connection`` (a RedisConnection); its reply.

    :raises CoordinationUnavailableError: as any command.
    """
    arguments = (len(keys), *keys, *args)
    try:
        return await connection.execute("EVALSHA", script.sha1, *arguments)
    except CoordinationError as e:
        if "NOSCRIPT" not in str(e):
            raise
    return await connection.execute("EVAL", script.source, *arguments)


#: KEYS: lock, fence.  ARGV: ttl ms.  The new token (a string), or nil when held.
#: A fence counter that does not exist (a new name, or a Redis that lost its
#: data) starts from the server's time in microseconds, so tokens keep
#: growing across such a loss.
ACQUIRE = Script(
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if redis.call('EXISTS', KEYS[2]) == 0 then
  local clock = redis.call('TIME')
  redis.call('SET', KEYS[2], clock[1] .. string.format('%06d', tonumber(clock[2])))
end
redis.call('INCR', KEYS[2])
local token = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[1])
return token
"""
)

#: KEYS: lock.  ARGV: token, ttl ms.  1 when renewed, 0 otherwise.
RENEW = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
)

#: KEYS: lock.  ARGV: token.  1 when released, 0 otherwise.
RELEASE = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)

#: KEYS: nodes hash, node expiry zset.  ARGV: node id, node JSON, ttl ms.
#: Writers (never readers) drop entries that expired already.
ANNOUNCE = Script(
    _NOW
    + """
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for _, id in ipairs(gone) do
  if id ~= ARGV[1] then redis.call('HDEL', KEYS[1], id) end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], string.format('%d', now + tonumber(ARGV[3])), ARGV[1])
return 1
"""
)

#: KEYS: nodes hash, node expiry zset.  ARGV: node id.
WITHDRAW = Script(
    """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""
)

#: KEYS: nodes hash, node expiry zset.  The JSON of every unexpired node.
LIVE_NODES = Script(
    _NOW
    + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. string.format('%d', now), '+inf')
local found = {}
for _, id in ipairs(ids) do
  local node = redis.call('HGET', KEYS[1], id)
  if node then table.insert(found, node) end
end
return found
"""
)

#: KEYS: plugin claims zset.  ARGV: node id, ttl ms.  The zset lives as long
#: as its latest claim.
CLAIM = Script(
    _NOW
    + """
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], string.format('%d', now + ttl), ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""
)

#: KEYS: plugin claims zset, nodes hash, node expiry zset.  The JSON of
#: every live node with an unexpired claim.
HOLDERS = Script(
    _NOW
    + """
local cutoff = '(' .. string.format('%d', now)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], cutoff, '+inf')
local found = {}
for _, id in ipairs(ids) do
  local expires = redis.call('ZSCORE', KEYS[3], id)
  if expires and tonumber(expires) > now then
    local node = redis.call('HGET', KEYS[2], id)
    if node then table.insert(found, node) end
  end
end
return found
"""
)
