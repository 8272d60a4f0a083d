"""
The coordination interfaces for a daemon that runs alone: everything in this
process, nothing to reach, so nothing ever fails for want of Redis.

Each class takes the reactor it reads the time from (expiries) and, for
:class:`MemoryPubSub`, delivers messages through.  Values are kept as their
JSON text, so what comes back is exactly what the Redis implementation would
give back.
"""

from __future__ import annotations

import heapq

from twisted.internet.defer import succeed
from twisted.logger import Logger
from zope.interface import implementer

from difydaemon.coordination.namespace import (
    check_name,
    decode_value,
    encode_value,
    optional_ttl_milliseconds,
    ttl_milliseconds,
)
from difydaemon.coordination.nodes import NodeInfo
from difydaemon.interfaces import (
    IKeyValueStore,
    ILeaseService,
    IMembership,
    IPubSub,
    ISubscription,
)

log = Logger()


def _expiry(now: float, ttl_ms: int | None) -> float | None:
    return None if ttl_ms is None else now + ttl_ms / 1000.0


def _alive(expires_at: float | None, now: float) -> bool:
    return expires_at is None or now < expires_at


@implementer(IKeyValueStore)
class MemoryKeyValueStore:
    """A dict of JSON texts with expiries; expired entries are dropped as time passes."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._values: dict[str, tuple[str, float | None]] = {}
        # (expires_at, key): popped once due, so that keys nobody reads again
        # do not stay in memory
        self._expiries: list[tuple[float, str]] = []

    def _now(self) -> float:
        now = self._reactor.seconds()
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, key = heapq.heappop(self._expiries)
            entry = self._values.get(key)
            if entry is not None and entry[1] == expires_at:
                del self._values[key]
        return now

    def _store(self, key: str, text: str, ttl_ms: int | None, now: float) -> None:
        expires_at = _expiry(now, ttl_ms)
        self._values[key] = (text, expires_at)
        if expires_at is not None:
            heapq.heappush(self._expiries, (expires_at, key))

    def get(self, key):
        check_name(key)
        self._now()
        entry = self._values.get(key)
        return succeed(None if entry is None else decode_value(entry[0]))

    def set(self, key, value, ttl=None):
        check_name(key)
        ttl_ms = optional_ttl_milliseconds(ttl)
        text = encode_value(value)
        self._store(key, text, ttl_ms, self._now())
        return succeed(None)

    def set_if_absent(self, key, value, ttl=None):
        check_name(key)
        ttl_ms = optional_ttl_milliseconds(ttl)
        text = encode_value(value)
        now = self._now()
        if key in self._values:
            return succeed(False)
        self._store(key, text, ttl_ms, now)
        return succeed(True)

    def delete(self, key):
        check_name(key)
        self._now()
        return succeed(self._values.pop(key, None) is not None)

    def touch(self, key, ttl):
        check_name(key)
        ttl_ms = ttl_milliseconds(ttl)
        now = self._now()
        entry = self._values.get(key)
        if entry is None:
            return succeed(False)
        self._store(key, entry[0], ttl_ms, now)
        return succeed(True)


@implementer(ISubscription)
class _MemorySubscription:
    def __init__(self, owner: "MemoryPubSub", channel: str, on_message) -> None:
        self._owner = owner
        self.channel = channel
        self.on_message = on_message

    def unsubscribe(self):
        self._owner._remove(self)
        return succeed(None)


@implementer(IPubSub)
class MemoryPubSub:
    """
    Subscribers of this process only.  Nothing is ever missed, so
    ``on_missed`` is never called.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._channels: dict[str, list[_MemorySubscription]] = {}

    def publish(self, channel, message):
        check_name(channel, "channel")
        text = encode_value(message)
        for subscription in list(self._channels.get(channel, ())):
            # each subscriber decodes its own copy, as over Redis
            self._reactor.callLater(0, self._deliver, subscription, text)
        return succeed(None)

    def _deliver(self, subscription: _MemorySubscription, text: str) -> None:
        if subscription not in self._channels.get(subscription.channel, ()):
            return
        try:
            subscription.on_message(decode_value(text))
        except Exception:
            log.failure("subscriber of {channel} failed on a message", channel=subscription.channel)

    def subscribe(self, channel, on_message, on_missed=None):
        check_name(channel, "channel")
        subscription = _MemorySubscription(self, channel, on_message)
        self._channels.setdefault(channel, []).append(subscription)
        return succeed(subscription)

    def _remove(self, subscription: _MemorySubscription) -> None:
        subscribers = self._channels.get(subscription.channel, [])
        if subscription in subscribers:
            subscribers.remove(subscription)
        if not subscribers:
            self._channels.pop(subscription.channel, None)


@implementer(ILeaseService)
class MemoryLeaseService:
    """Leases of this process; tokens count up per name from 1."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._leases: dict[str, tuple[int, float]] = {}
        self._fences: dict[str, int] = {}

    def _current(self, name: str) -> int | None:
        entry = self._leases.get(name)
        if entry is None:
            return None
        if not _alive(entry[1], self._reactor.seconds()):
            del self._leases[name]
            return None
        return entry[0]

    def acquire(self, name, ttl):
        check_name(name, "lease name")
        ttl_ms = ttl_milliseconds(ttl)
        if self._current(name) is not None:
            return succeed(None)
        token = self._fences.get(name, 0) + 1
        self._fences[name] = token
        self._leases[name] = (token, _expiry(self._reactor.seconds(), ttl_ms))
        return succeed(token)

    def renew(self, name, token, ttl):
        check_name(name, "lease name")
        ttl_ms = ttl_milliseconds(ttl)
        if self._current(name) != token:
            return succeed(False)
        self._leases[name] = (token, _expiry(self._reactor.seconds(), ttl_ms))
        return succeed(True)

    def release(self, name, token):
        check_name(name, "lease name")
        if self._current(name) != token:
            return succeed(False)
        del self._leases[name]
        return succeed(True)

    def holder(self, name):
        check_name(name, "lease name")
        return succeed(self._current(name))


@implementer(IMembership)
class MemoryMembership:
    """The nodes and plugin claims of this process, with expiries."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._nodes: dict[str, tuple[str, float]] = {}
        self._claims: dict[str, dict[str, float]] = {}

    def _live(self) -> dict[str, NodeInfo]:
        now = self._reactor.seconds()
        for node_id in [n for n, (_, expires_at) in self._nodes.items() if not _alive(expires_at, now)]:
            del self._nodes[node_id]
        return {node_id: NodeInfo.from_json(text) for node_id, (text, _) in self._nodes.items()}

    def announce(self, node, ttl):
        ttl_ms = ttl_milliseconds(ttl)
        check_name(node.node_id, "node id")
        self._nodes[node.node_id] = (node.to_json(), _expiry(self._reactor.seconds(), ttl_ms))
        return succeed(None)

    def withdraw(self, node_id):
        check_name(node_id, "node id")
        self._nodes.pop(node_id, None)
        return succeed(None)

    def live_nodes(self):
        live = self._live()
        return succeed([live[node_id] for node_id in sorted(live)])

    def claim_plugin(self, plugin_unique_identifier, node_id, ttl):
        check_name(plugin_unique_identifier, "plugin identifier")
        check_name(node_id, "node id")
        ttl_ms = ttl_milliseconds(ttl)
        claims = self._claims.setdefault(plugin_unique_identifier, {})
        claims[node_id] = _expiry(self._reactor.seconds(), ttl_ms)
        return succeed(None)

    def release_plugin(self, plugin_unique_identifier, node_id):
        check_name(plugin_unique_identifier, "plugin identifier")
        claims = self._claims.get(plugin_unique_identifier, {})
        claims.pop(node_id, None)
        if not claims:
            self._claims.pop(plugin_unique_identifier, None)
        return succeed(None)

    def plugin_holders(self, plugin_unique_identifier):
        check_name(plugin_unique_identifier, "plugin identifier")
        now = self._reactor.seconds()
        claims = self._claims.get(plugin_unique_identifier, {})
        for node_id in [n for n, expires_at in claims.items() if not _alive(expires_at, now)]:
            del claims[node_id]
        if not claims:
            self._claims.pop(plugin_unique_identifier, None)
        live = self._live()
        return succeed([live[node_id] for node_id in sorted(claims) if node_id in live])
