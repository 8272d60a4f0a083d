"""
PostgresPersistence when the database goes away: a private PostgreSQL
cluster (never the machine's shared server) is stopped, crashed, frozen
with SIGSTOP, and its connections are killed mid-transaction.
"""

from __future__ import annotations

import secrets

from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater
from txpostgres import txpostgres

from difydaemon.errors import DatabaseUnavailableError
from difydaemon.persistence.postgres import PostgresPersistence
from difydaemon.persistence.sql import read_only
from difydaemon.testing.cases import AsyncTestCase
from difydaemon.testing.postgres import private_postgres_for

TENANT = "0193a8a4-0000-7000-8000-0000000000a1"


class PostgresOutageTests(AsyncTestCase):
    """Each test gets its own database on a private cluster shared by the class."""

    timeout = 120

    async def _set_up(self):
        self.cluster = await private_postgres_for(self, reactor)
        self.database = "outage_" + secrets.token_hex(6)

    def setUp(self):
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(self._set_up())

    async def persistence(self, pool_size: int = 2, **options) -> PostgresPersistence:
        """A migrated PostgresPersistence on this test's database (created through ``postgres``)."""
        options.setdefault("connect_timeout", 5)
        options.setdefault("read_timeout", 10)
        persistence = PostgresPersistence(
            reactor, self.cluster.dsn(self.database), pool_size=pool_size, default_database="postgres", **options
        )
        self.addCleanup(persistence.close)
        await persistence.migrate()
        return persistence

    async def admin(self) -> txpostgres.Connection:
        """An autocommit connection to this test's database, closed at clean-up."""
        connection = txpostgres.Connection(reactor=reactor)
        await connection.connect(self.cluster.dsn(self.database))
        self.addCleanup(lambda: connection.close() if not connection.closed else None)
        return connection

    async def test_server_restart_while_idle(self):
        """After a restart while the daemon was idle, the very first write and read succeed."""
        persistence = await self.persistence()
        self.assertIsNone(await persistence.get_installation(TENANT, "acme/echo"))
        await self.cluster.stop()
        await self.cluster.start()
        await persistence.storage_set(TENANT, "acme/echo", "k", b"value", 1024)
        self.assertEqual(await persistence.storage_get(TENANT, "acme/echo", "k"), b"value")

    async def test_server_crash_while_idle(self):
        """After a crash (immediate stop) and restart, the first call succeeds."""
        persistence = await self.persistence()
        self.assertEqual(await persistence.list_tasks(TENANT, 0, 10), [])
        await self.cluster.stop("immediate")
        await self.cluster.start()
        self.assertEqual(await persistence.list_tasks(TENANT, 0, 10), [])

    async def test_clear_error_while_down_then_recovery(self):
        """While the server is down reads and writes fail with 'database unavailable'; the first call after it is back succeeds."""
        persistence = await self.persistence()
        await self.cluster.stop()
        for call in (
            lambda: persistence.get_installation(TENANT, "acme/echo"),
            lambda: persistence.storage_set(TENANT, "acme/echo", "k", b"v", 1024),
        ):
            try:
                await call()
            except DatabaseUnavailableError as e:
                self.assertTrue(e.message.startswith("database unavailable: "), e.message)
            else:
                self.fail("a call succeeded with the database down")
        self.assertFalse(persistence.available)
        await self.cluster.start()
        await persistence.storage_set(TENANT, "acme/echo", "k", b"v", 1024)
        self.assertEqual(await persistence.storage_size(TENANT, "acme/echo"), 1)
        self.assertTrue(persistence.available)

    async def with_table(self) -> tuple:
        """A persistence, an admin connection, and an empty table ``written (n int)``."""
        persistence = await self.persistence()
        admin = await self.admin()
        await admin.runOperation("CREATE TABLE written (n int)")
        return persistence, admin

    async def _kill_own_backend(self, tx, admin):
        pid = (await tx.execute("SELECT pg_backend_pid()"))[0][0]
        # waits until the backend is gone
        await admin.runQuery("SELECT pg_terminate_backend(%s, 10000)", (pid,))

    async def test_read_retried_after_connection_dies(self):
        """A read whose connection dies mid-transaction runs once more on a new connection and succeeds."""
        persistence = await self.persistence()
        admin = await self.admin()
        calls = []

        @read_only
        async def read(tx):
            calls.append(None)
            if len(calls) == 1:
                await self._kill_own_backend(tx, admin)
            return await tx.execute("SELECT 42")

        self.assertEqual(await persistence._transact(read), [(42,)])
        self.assertEqual(len(calls), 2)

    async def test_write_retried_when_connection_dies_before_commit(self):
        """A write whose connection dies before COMMIT runs once more, and its row is written once."""
        persistence, admin = await self.with_table()
        calls = []

        async def write(tx):
            calls.append(None)
            await tx.execute("INSERT INTO written VALUES (?)", (len(calls),))
            if len(calls) == 1:
                await self._kill_own_backend(tx, admin)
            await tx.execute("SELECT 1")

        await persistence._transact(write)
        self.assertEqual(len(calls), 2)
        self.assertEqual(await admin.runQuery("SELECT n FROM written"), [(2,)])

    async def test_write_not_retried_when_commit_is_lost(self):
        """A write whose connection dies when COMMIT is sent is not run again and says the outcome is unknown."""
        persistence, admin = await self.with_table()
        calls = []

        async def write(tx):
            calls.append(None)
            await tx.execute("INSERT INTO written VALUES (1)")
            await self._kill_own_backend(tx, admin)

        try:
            await persistence._transact(write)
        except DatabaseUnavailableError as e:
            self.assertIn("may or may not have been saved", e.message)
        else:
            self.fail("a write whose commit was lost succeeded")
        self.assertEqual(len(calls), 1)
        self.assertEqual(await admin.runQuery("SELECT n FROM written"), [])
        # and the next call works
        self.assertEqual(await persistence.list_tasks(TENANT, 0, 10), [])

    async def test_cancelled_caller_leaves_a_usable_connection(self):
        """A caller cancelled while its statement waits on a frozen server does not spoil the connection."""
        persistence = await self.persistence(pool_size=1)
        self.assertEqual(await persistence.list_tasks(TENANT, 0, 10), [])
        self.cluster.freeze()
        pending = persistence.list_tasks(TENANT, 0, 10)
        await deferLater(reactor, 0.3, lambda: None)
        pending.cancel()
        with self.assertRaises(CancelledError):
            await pending
        self.cluster.thaw()
        # the one connection is lent again: its statement finished, nothing is in flight
        self.assertEqual(await persistence.list_tasks(TENANT, 0, 10), [])
        self.assertEqual(await persistence.get_installation(TENANT, "acme/echo"), None)

    async def test_frozen_server_times_out_then_recovers(self):
        """A SIGSTOPped server fails calls after the read and connect time-outs; once resumed, calls succeed."""
        persistence = await self.persistence(connect_timeout=1, read_timeout=1)
        self.assertEqual(await persistence.list_tasks(TENANT, 0, 10), [])
        self.cluster.freeze()
        failures = []
        for _ in range(2):
            try:
                await persistence.list_tasks(TENANT, 0, 10)
            except DatabaseUnavailableError as e:
                failures.append(e.message)
        self.assertEqual(
            failures,
            [
                "database unavailable: no answer from the database within 1 s",
                f"database unavailable: could not connect to 127.0.0.1:{self.cluster.port}/{self.database} within 1 s",
            ],
        )
        self.cluster.thaw()
        self.assertEqual(await persistence.list_tasks(TENANT, 0, 10), [])
