"""
Tests for difydaemon.coordination.sessions: the serverless sessions shared
through the coordination store, on the in-memory store and on the
machine's shared Redis (under a key prefix of the test's own).
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock

from difydaemon.coordination import coordination_for, memory_coordination
from difydaemon.coordination.sessions import SharedServerlessSessions, session_key
from difydaemon.errors import CoordinationUnavailableError
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from difydaemon.testing.redis import redis_config
from tests.coordination.test_redis import TwoRedisReplicas
from tests.runtimes.serverless.test_sessions import ServerlessSessionsContract, session


class SharedSessionsInMemoryTests(ServerlessSessionsContract, SynchronousTestCase):
    """The shared implementation keeps the contract on the in-memory store."""

    ttl = 60

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.coordination = memory_coordination(self.clock)
        self.sessions = SharedServerlessSessions(self.coordination.kv)

    def run_check(self, check):
        self.successResultOfCoroutine(check)

    async def wait(self, seconds):
        self.clock.advance(seconds)

    def test_stored_as_json(self):
        """A session is stored as its JSON object under ``serverless-session:<id>``."""
        self.successResultOf(self.sessions.register(session(), 60))
        self.assertEqual(self.successResultOf(self.coordination.kv.get(session_key("s-1"))), session().to_json())

    def test_not_a_session(self):
        """A stored value that is not a session is no session (not an error)."""
        self.successResultOf(self.coordination.kv.set(session_key("s-1"), {"tenant_id": "t"}))
        self.successResultOf(self.coordination.kv.set(session_key("s-2"), ["a"]))
        self.assertIsNone(self.successResultOf(self.sessions.lookup("s-1")))
        self.assertIsNone(self.successResultOf(self.sessions.lookup("s-2")))


class SharedSessionsOnRedisTests(TwoRedisReplicas, ServerlessSessionsContract, AsyncTestCase):
    """The shared implementation keeps the contract on Redis, and another replica's connection sees its sessions."""

    ttl = 2.0

    async def _set_up(self):
        await super()._set_up()
        self.sessions = SharedServerlessSessions(self.coordination.kv)

    async def test_other_replica(self):
        """A session registered through one replica is found, then forgotten, through another's connection."""
        other = SharedServerlessSessions(self.other.kv)
        await self.sessions.register(session("s-9"), 60)
        self.assertEqual(await other.lookup("s-9"), session("s-9"))
        await other.forget("s-9")
        self.assertIsNone(await self.sessions.lookup("s-9"))

    async def test_expiry_in_redis(self):
        """The key carries the session's lifetime as its expiry in Redis."""
        await self.sessions.register(session("s-8"), 60)
        connection = self.coordination.kv._connection
        ttl_ms = await connection.execute("PTTL", f"{self.prefix}:difydaemon:kv:{session_key('s-8')}")
        self.assertTrue(59_000 < ttl_ms <= 60_000, ttl_ms)


def _closed_port() -> int:
    """A loopback port nothing listens on (bound then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SharedSessionsRedisDownTests(AsyncTestCase):
    """While Redis cannot be reached, the sessions fail at once with CoordinationUnavailableError."""

    timeout = 30

    async def test_lookup_fails_fast(self):
        """A lookup with Redis unreachable fails with CoordinationUnavailableError, not a hang."""
        coordination = coordination_for(redis_config(port=_closed_port()), reactor, connect_timeout=2.0)
        self.addCleanup(coordination.close)
        sessions = SharedServerlessSessions(coordination.kv)
        with self.assertRaises(CoordinationUnavailableError):
            await sessions.lookup("s-1")
        with self.assertRaises(CoordinationUnavailableError):
            await sessions.register(session(), 60)
