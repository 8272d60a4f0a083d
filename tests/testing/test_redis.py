"""Tests for difydaemon.testing.redis: the private redis-server of outage tests."""

from __future__ import annotations

import os

from twisted.internet import reactor

from difydaemon.testing.cases import AsyncTestCase
from difydaemon.testing.redis import SHARED_PORT, PrivateRedis, ping


class PrivateRedisTests(AsyncTestCase):
    """A server of the test's own: start, freeze, stop, kill, destroy."""

    timeout = 60

    async def test_lifecycle(self):
        """It answers once started, not while frozen or stopped, again after a restart, and destroy removes it."""
        server = PrivateRedis(reactor)
        self.addCleanup(server.destroy)
        self.assertNotEqual(server.port, SHARED_PORT)
        await server.start()
        self.assertTrue(ping(server.host, server.port))
        server.freeze()
        self.assertFalse(ping(server.host, server.port, timeout=0.2))
        server.thaw()
        self.assertTrue(ping(server.host, server.port))
        await server.stop()
        self.assertFalse(server.running)
        self.assertFalse(ping(server.host, server.port))
        await server.start()
        self.assertTrue(ping(server.host, server.port))
        await server.kill()
        self.assertFalse(ping(server.host, server.port))
        await server.start()
        server.destroy()
        self.assertFalse(server.running)
        self.assertFalse(os.path.exists(server.directory))
        self.assertFalse(ping(server.host, server.port))
