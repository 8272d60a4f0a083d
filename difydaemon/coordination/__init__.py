"""
Coordination between replicas of the daemon: a shared key-value store with
expiry, publish/subscribe, fenced leases and node membership (the
interfaces are in :mod:`difydaemon.interfaces`).

A daemon running alone uses the in-memory implementations
(:mod:`.memory`): no Redis needed.  Replicas sharing one Redis use
:mod:`.redis`.  :func:`coordination_for` picks from the configuration:
Redis when ``REDIS_HOST`` is set (or ``REDIS_USE_SENTINEL`` is true).

On top of the interfaces: :mod:`.leases` (a lease held over time, leader
election) and :mod:`.membership` (this node's heartbeat and plugin claims);
:mod:`.nodes` says who a node is and which host it advertises.
"""

from __future__ import annotations

from attrs import field, frozen
from twisted.internet.defer import succeed

from difydaemon.coordination.memory import (
    MemoryKeyValueStore,
    MemoryLeaseService,
    MemoryMembership,
    MemoryPubSub,
)

#: Seconds to reach Redis (or a sentinel, unless
#: ``REDIS_SENTINEL_SOCKET_TIMEOUT`` says otherwise).
CONNECT_TIMEOUT = 5.0
#: Seconds a command may wait for its reply before the connection counts as dead.
REPLY_TIMEOUT = 5.0
#: Seconds between two pings of the idle subscriber connection.
KEEPALIVE = 5.0
#: ``REDIS_PORT`` when unset.
DEFAULT_PORT = 6379


@frozen
class Coordination:
    """
    The four coordination services of one daemon.

    :ivar uses_redis: False for the in-memory set.
    """

    kv: object
    pubsub: object
    leases: object
    membership: object
    uses_redis: bool
    closer: object = field(default=None, repr=False)

    def close(self):
        """Close the connections (nothing to do in memory). Deferred[None]."""
        return self.closer() if self.closer is not None else succeed(None)


def memory_coordination(reactor) -> Coordination:
    """The in-memory set, for a daemon that runs alone."""
    return Coordination(
        kv=MemoryKeyValueStore(reactor),
        pubsub=MemoryPubSub(reactor),
        leases=MemoryLeaseService(reactor),
        membership=MemoryMembership(reactor),
        uses_redis=False,
    )


def coordination_for(
    config,
    reactor,
    connect_timeout: float = CONNECT_TIMEOUT,
    reply_timeout: float = REPLY_TIMEOUT,
    keepalive: float = KEEPALIVE,
) -> Coordination:
    """
    The coordination set the configuration asks for: in memory when
    ``REDIS_HOST`` is unset and Sentinel is off, else on Redis (connected
    lazily, on first use).

    Reads ``REDIS_SSL_CA_CERTS`` (blocking: call it at start-up).

    :raises ConfigError: when the CA file cannot be read or holds no
        certificate.
    """
    if not config.redis.in_use:
        return memory_coordination(reactor)
    from difydaemon.coordination.redis.factory import redis_coordination

    return redis_coordination(config.redis, reactor, connect_timeout, reply_timeout, keepalive)
