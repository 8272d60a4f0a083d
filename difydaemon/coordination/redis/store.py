"""
The key-value store, leases and membership on Redis (see
:mod:`difydaemon.interfaces` for what each method promises).

Keys, under :class:`~difydaemon.coordination.namespace.KeySpace`:

- ``kv:<key>``: a value's JSON text, with ``PX`` expiry;
- ``lock:<name>`` (the token holding it, ``PX`` expiry) and
  ``fence:<name>`` (the last token given out; never expires);
- ``nodes:info`` (hash node id -> NodeInfo JSON) and ``nodes:expiry`` (zset node
  id -> expiry in server milliseconds);
- ``plugin:<sha256 of the identifier>``: zset node id -> claim expiry.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from difydaemon.coordination.namespace import (
    KeySpace,
    check_name,
    decode_value,
    encode_value,
    optional_ttl_milliseconds,
    plugin_digest,
    ttl_milliseconds,
)
from difydaemon.coordination.nodes import NodeInfo
from difydaemon.coordination.redis import scripts
from difydaemon.interfaces import IKeyValueStore, ILeaseService, IMembership

log = Logger()


def _deferred(coroutine) -> Deferred:
    return Deferred.fromCoroutine(coroutine)


@implementer(IKeyValueStore)
class RedisKeyValueStore:
    """JSON values under ``kv:``, expiring with ``PX``."""

    def __init__(self, connection, keys: KeySpace) -> None:
        self._connection = connection
        self._keys = keys

    def _key(self, key: str) -> str:
        return self._keys.key("kv", check_name(key))

    def get(self, key):
        redis_key = self._key(key)
        return _deferred(self._get(redis_key))

    async def _get(self, redis_key):
        text = await self._connection.execute("GET", redis_key)
        return None if text is None else decode_value(text)

    def set(self, key, value, ttl=None):
        redis_key = self._key(key)
        ttl_ms = optional_ttl_milliseconds(ttl)
        text = encode_value(value)
        return _deferred(self._set(redis_key, text, ttl_ms, nx=False))

    def set_if_absent(self, key, value, ttl=None):
        redis_key = self._key(key)
        ttl_ms = optional_ttl_milliseconds(ttl)
        text = encode_value(value)
        return _deferred(self._set(redis_key, text, ttl_ms, nx=True))

    async def _set(self, redis_key, text, ttl_ms, nx):
        args = ["SET", redis_key, text]
        if ttl_ms is not None:
            args += ["PX", ttl_ms]
        if nx:
            args.append("NX")
        reply = await self._connection.execute(*args)
        return reply == "OK" if nx else None

    def delete(self, key):
        redis_key = self._key(key)
        return _deferred(self._count("DEL", redis_key))

    def touch(self, key, ttl):
        redis_key = self._key(key)
        ttl_ms = ttl_milliseconds(ttl)
        return _deferred(self._count("PEXPIRE", redis_key, ttl_ms))

    async def _count(self, *command) -> bool:
        return await self._connection.execute(*command) == 1


@implementer(ILeaseService)
class RedisLeaseService:
    """Owned leases under ``lock:``, fenced by the counter under ``fence:``."""

    def __init__(self, connection, keys: KeySpace) -> None:
        self._connection = connection
        self._keys = keys

    def _lock(self, name: str) -> str:
        return self._keys.key("lock", check_name(name, "lease name"))

    def acquire(self, name, ttl):
        lock = self._lock(name)
        ttl_ms = ttl_milliseconds(ttl)
        return _deferred(self._acquire(lock, self._keys.key("fence", name), ttl_ms))

    async def _acquire(self, lock, fence, ttl_ms):
        token = await scripts.run_script(self._connection, scripts.ACQUIRE, (lock, fence), (ttl_ms,))
        return None if token is None else int(token)

    def renew(self, name, token, ttl):
        lock = self._lock(name)
        ttl_ms = ttl_milliseconds(ttl)
        return _deferred(self._compare(scripts.RENEW, lock, str(int(token)), ttl_ms))

    def release(self, name, token):
        lock = self._lock(name)
        return _deferred(self._compare(scripts.RELEASE, lock, str(int(token))))

    async def _compare(self, script, lock, *args) -> bool:
        return await scripts.run_script(self._connection, script, (lock,), args) == 1

    def holder(self, name):
        lock = self._lock(name)
        return _deferred(self._holder(lock))

    async def _holder(self, lock):
        token = await self._connection.execute("GET", lock)
        return None if token is None else int(token)


def _nodes(texts) -> list[NodeInfo]:
    """The nodes of stored JSON texts, by node id; a record that is not one is skipped."""
    nodes = {}
    for text in texts or ():
        try:
            node = NodeInfo.from_json(text)
        except ValueError as e:
            log.warn("skipping a node record that is not one: {problem}", problem=str(e))
            continue
        nodes[node.node_id] = node
    return [nodes[node_id] for node_id in sorted(nodes)]


@implementer(IMembership)
class RedisMembership:
    """Nodes in ``nodes`` + ``nodes:expiry``, plugin claims in ``plugin:<digest>``."""

    def __init__(self, connection, keys: KeySpace) -> None:
        self._connection = connection
        self._keys = keys
        self._node_keys = (keys.key("nodes", "info"), keys.key("nodes", "expiry"))

    def announce(self, node, ttl):
        check_name(node.node_id, "node id")
        ttl_ms = ttl_milliseconds(ttl)
        return _deferred(
            scripts.run_script(self._connection, scripts.ANNOUNCE, self._node_keys, (node.node_id, node.to_json(), ttl_ms))
        ).addCallback(lambda _: None)

    def withdraw(self, node_id):
        check_name(node_id, "node id")
        return _deferred(scripts.run_script(self._connection, scripts.WITHDRAW, self._node_keys, (node_id,))).addCallback(
            lambda _: None
        )

    def live_nodes(self):
        return _deferred(scripts.run_script(self._connection, scripts.LIVE_NODES, self._node_keys)).addCallback(_nodes)

    def _claims(self, plugin_unique_identifier: str) -> str:
        return self._keys.key("plugin", plugin_digest(plugin_unique_identifier))

    def claim_plugin(self, plugin_unique_identifier, node_id, ttl):
        claims = self._claims(plugin_unique_identifier)
        check_name(node_id, "node id")
        ttl_ms = ttl_milliseconds(ttl)
        return _deferred(scripts.run_script(self._connection, scripts.CLAIM, (claims,), (node_id, ttl_ms))).addCallback(
            lambda _: None
        )

    def release_plugin(self, plugin_unique_identifier, node_id):
        claims = self._claims(plugin_unique_identifier)
        check_name(node_id, "node id")
        return _deferred(self._connection.execute("ZREM", claims, node_id)).addCallback(lambda _: None)

    def plugin_holders(self, plugin_unique_identifier):
        claims = self._claims(plugin_unique_identifier)
        return _deferred(
            scripts.run_script(self._connection, scripts.HOLDERS, (claims, *self._node_keys))
        ).addCallback(_nodes)
