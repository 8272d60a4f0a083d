"""What makeService builds for PLATFORM=serverless."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from difydaemon import tap
from difydaemon.coordination.sessions import SharedServerlessSessions
from difydaemon.runtimes.serverless.runtime import ServerlessRuntimeFactory
from difydaemon.runtimes.serverless.sessions import MemoryServerlessSessions
from difydaemon.testing.cases import SynchronousTestCase
from tests.test_tap import environment


class ServerlessWiringTests(SynchronousTestCase):
    """The serverless platform replaces the local runtime."""

    def make(self, **extra):
        environ = environment(self.mktemp(), 5002)
        environ.update(
            PLATFORM="serverless",
            DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL="http://connector:5004/sri",
            DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY="",
            **extra,
        )
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        return tap.makeService(options, reactor=MemoryReactorClock(), environ=environ)

    def test_serverless_parts(self):
        """No local runtime: the registry brings plugins up through the connector, installs record 'serverless'."""
        service = self.make(MAX_SERVERLESS_RETRY_TIMES="5", MAX_SERVERLESS_REQUEST_BYTES="1000")
        self.assertIsInstance(service.runtimes.factory, ServerlessRuntimeFactory)
        self.assertEqual(service.installer.runtime_type, "serverless")
        self.assertEqual(service.serverless.connector.url("ping"), "http://connector:5004/sri/ping")
        self.assertEqual(service.serverless.invoker.max_attempts, 5)
        self.assertEqual(service.serverless.invoker.max_request_bytes, 1000)
        self.assertEqual(service._ready_checks, [service.serverless.ping])

    def test_transaction_route_only_on_serverless(self):
        """/backwards-invocation/transaction is mounted on serverless only."""
        root = self.make().site.resource
        self.assertIsNotNone(root._transaction)
        environ = environment(self.mktemp(), 5002)
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        local = tap.makeService(options, reactor=MemoryReactorClock(), environ=environ)
        self.assertIsNone(local.site.resource._transaction)
        self.assertIsNone(local.serverless)

    def test_admin_routes(self):
        """The admin routes exist only with ADMIN_API_ENABLED."""
        self.assertIsNone(self.make().site.resource._admin)
        self.assertIsNotNone(self.make(ADMIN_API_ENABLED="true", ADMIN_API_KEY="0123456789").site.resource._admin)

    def test_sessions_alone_in_memory(self):
        """Without Redis the live serverless sessions are kept in memory, and the transaction route reads them."""
        service = self.make()
        self.assertIsInstance(service.serverless.sessions, MemoryServerlessSessions)
        self.assertIs(service.site.resource._transaction._sessions, service.serverless.sessions)

    def test_sessions_shared_with_redis(self):
        """With Redis the live serverless sessions are in Redis's store, so a callback may land on any replica."""
        service = self.make(REDIS_HOST="127.0.0.1", CLUSTER_ADVERTISE_HOST="10.1.2.3")
        sessions = service.serverless.sessions
        self.assertIsInstance(sessions, SharedServerlessSessions)
        self.assertIs(sessions._kv, service.coordination.kv)
        self.assertIs(service.runtimes.factory._sessions, sessions)
        self.assertIs(service.site.resource._transaction._sessions, sessions)
