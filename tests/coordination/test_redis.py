"""
The Redis coordination set against the coordination contract, on the
machine's shared Redis (required: CI starts it), each test under a key
prefix of its own that is deleted afterwards.
"""

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from difydaemon.coordination import coordination_for
from difydaemon.testing.cases import AsyncTestCase
from difydaemon.testing.redis import redis_config, shared_redis_prefix
from tests.coordination.contract import CoordinationContract


class TwoRedisReplicas:
    """
    A case mixin: ``self.coordination`` and ``self.other``, two replicas'
    Redis coordination sets under a fresh prefix (``self.prefix``) of the
    shared Redis, and the real clock for ``run_check`` and ``wait``.
    """

    timeout = 30

    async def _set_up(self):
        self.prefix = await shared_redis_prefix(self, reactor)
        config = redis_config(prefix=self.prefix)
        self.coordination = coordination_for(config, reactor)
        self.other = coordination_for(config, reactor)
        self.addCleanup(self.coordination.close)
        self.addCleanup(self.other.close)

    def setUp(self):
        return Deferred.fromCoroutine(self._set_up())

    def run_check(self, check):
        return Deferred.fromCoroutine(check)

    async def wait(self, seconds):
        await deferLater(reactor, seconds, lambda: None)


class RedisCoordinationTests(TwoRedisReplicas, CoordinationContract, AsyncTestCase):
    """Two replicas' Redis connections share the state of one prefix and keep the contract."""

    async def delivered(self, deferred):
        return await deferred
