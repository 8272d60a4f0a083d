"""
Reaching Redis over TLS and through Sentinel, on private servers: a
TLS-only redis-server with a certificate from a test CA, and a Sentinel
watching a private master.
"""

from __future__ import annotations

import shutil
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from difydaemon.coordination import coordination_for
from difydaemon.errors import ConfigError, CoordinationUnavailableError
from difydaemon.testing.cases import AsyncTestCase
from difydaemon.testing.postgres import free_port
from difydaemon.testing.redis import (
    make_tls_files,
    new_prefix,
    private_redis,
    redis_config,
    sentinel_config,
)


class RedisTLSTests(AsyncTestCase):
    """REDIS_USE_SSL with and without certificate checks."""

    timeout = 60

    async def _set_up(self):
        directory = tempfile.mkdtemp(prefix="difydaemon-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        self.files = make_tls_files(directory, hosts=("127.0.0.1",))
        self.server = await private_redis(self, reactor, tls=self.files)

    def setUp(self):
        return Deferred.fromCoroutine(self._set_up())

    def coordination(self, host="127.0.0.1", **variables):
        config = redis_config(host=host, port=self.server.port, prefix=new_prefix(), REDIS_USE_SSL="true", **variables)
        coordination = coordination_for(config, reactor, connect_timeout=2.0, reply_timeout=2.0)
        self.addCleanup(coordination.close)
        return coordination

    async def assert_unavailable(self, coordination) -> str:
        try:
            await coordination.kv.get("k")
        except CoordinationUnavailableError as e:
            return e.message
        self.fail("the connection was accepted")

    async def test_checked_with_ca_file(self):
        """With the CA file the server's certificate is accepted and the store works."""
        coordination = self.coordination(REDIS_SSL_CA_CERTS=self.files.ca)
        await coordination.kv.set("k", "over tls")
        self.assertEqual(await coordination.kv.get("k"), "over tls")

    async def test_unknown_ca_refused(self):
        """Without the CA file (the platform's trust store) the test CA's certificate is refused."""
        message = await self.assert_unavailable(self.coordination(REDIS_SSL_CERT_REQS="CERT_REQUIRED"))
        self.assertTrue(message.startswith("redis unavailable: "), message)

    async def test_host_name_checked(self):
        """A certificate for 127.0.0.1 is refused when the server is reached as localhost."""
        await self.assert_unavailable(self.coordination(host="localhost", REDIS_SSL_CA_CERTS=self.files.ca))

    async def test_cert_none(self):
        """CERT_NONE accepts the server without checking its certificate."""
        coordination = self.coordination(REDIS_SSL_CERT_REQS="CERT_NONE")
        await coordination.kv.set("k", 1)
        self.assertEqual(await coordination.kv.get("k"), 1)

    async def test_plain_client_refused(self):
        """A client without TLS gets a clear error from a TLS-only server."""
        config = redis_config(port=self.server.port, prefix=new_prefix())
        coordination = coordination_for(config, reactor, connect_timeout=2.0, reply_timeout=2.0)
        self.addCleanup(coordination.close)
        await self.assert_unavailable(coordination)

    def test_bad_ca_file(self):
        """A CA file that is missing or holds no certificate is a configuration error."""
        for path in ("/nonexistent/ca.pem", self.files.key):
            error = self.assertRaises(
                ConfigError,
                coordination_for,
                redis_config(port=self.server.port, REDIS_USE_SSL="true", REDIS_SSL_CA_CERTS=path),
                reactor,
            )
            self.assertEqual(error.variable, "REDIS_SSL_CA_CERTS")


class RedisSentinelTests(AsyncTestCase):
    """REDIS_USE_SENTINEL finds the master through the sentinels."""

    timeout = 60

    async def _set_up(self):
        self.master = await private_redis(self, reactor)
        self.sentinel = await private_redis(
            self, reactor, config=sentinel_config("difymaster", self.master.port), sentinel=True
        )

    def setUp(self):
        return Deferred.fromCoroutine(self._set_up())

    def coordination(self, service="difymaster", sentinels=None):
        sentinels = sentinels or f"127.0.0.1:{self.sentinel.port}"
        config = redis_config(
            port=1,
            prefix=new_prefix(),
            REDIS_USE_SENTINEL="true",
            REDIS_SENTINELS=sentinels,
            REDIS_SENTINEL_SERVICE_NAME=service,
            REDIS_SENTINEL_SOCKET_TIMEOUT="2",
        )
        coordination = coordination_for(config, reactor, connect_timeout=2.0, reply_timeout=2.0)
        self.addCleanup(coordination.close)
        return coordination

    async def test_master_found(self):
        """The master is found through the second sentinel when the first does not answer, and the store works on it."""
        coordination = self.coordination(sentinels=f"127.0.0.1:{free_port()},127.0.0.1:{self.sentinel.port}")
        await coordination.kv.set("k", "through sentinel")
        self.assertEqual(await coordination.kv.get("k"), "through sentinel")

    async def test_unknown_service(self):
        """A service the sentinels do not know gives a clear error naming it."""
        try:
            await self.coordination(service="nosuch").kv.get("k")
        except CoordinationUnavailableError as e:
            self.assertIn("no sentinel named a master", e.message)
            self.assertIn("nosuch", e.message)
        else:
            self.fail("a master was found for an unknown service")
