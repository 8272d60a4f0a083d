"""
PostgresPersistence against the IPersistence contract on the real server.

These tests are required (CI runs them): an unreachable server fails them
with a message saying so, it never skips them.  Each test gets a fresh
schema in database ``test`` (or the database of ``DIFYDAEMON_TEST_PG_DSN``)
that is dropped afterwards.
"""

import os
import secrets

import psycopg2
from twisted.internet.defer import Deferred, gatherResults
from txpostgres import txpostgres

from twisted.internet.error import ConnectionLost

from difydaemon.errors import DatabaseUnavailableError
from difydaemon.persistence.postgres import PostgresPersistence, connection_gone, quote_identifier, to_pyformat
from difydaemon.persistence.sql import read_only
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from tests.persistence.contract import FrozenTimeReactor, PersistenceContract
from tests.persistence.test_sqlite import MIGRATIONS, TABLES

DEFAULT_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def postgres_dsn() -> str:
    """The PostgreSQL the tests use."""
    return os.environ.get("DIFYDAEMON_TEST_PG_DSN", DEFAULT_DSN)


class PostgresSchemaCase(AsyncTestCase):
    """
    A real-reactor case with a private schema: ``self.schema`` exists for
    the test and ``self.connect_params`` put every connection into it.
    """

    async def _create_schema(self):
        from twisted.internet import reactor

        self.reactor = FrozenTimeReactor(reactor)
        self.schema = "test_" + secrets.token_hex(8)
        self.admin = txpostgres.Connection(reactor=reactor)
        try:
            await self.admin.connect(postgres_dsn())
        except psycopg2.OperationalError as e:
            self.fail(
                f"PostgreSQL at {postgres_dsn()!r} is not reachable ({e}); these tests are "
                "required: start the server or set DIFYDAEMON_TEST_PG_DSN"
            )
        self.addCleanup(self.admin.close)
        await self.admin.runOperation(f"CREATE SCHEMA {self.schema}")
        self.addCleanup(self.admin.runOperation, f"DROP SCHEMA {self.schema} CASCADE")
        self.connect_params = {"options": f"-c search_path={self.schema}"}

    def make_persistence(self, pool_size=4):
        """A PostgresPersistence in this test's schema, closed at cleanup."""
        persistence = PostgresPersistence(
            self.reactor, postgres_dsn(), pool_size=pool_size, **self.connect_params
        )
        self.addCleanup(persistence.close)
        return persistence


class PostgresPersistenceTests(PersistenceContract, PostgresSchemaCase):
    """PostgreSQL, with a pool of four connections, keeps the contract."""

    async def _set_up(self):
        await self._create_schema()
        self.clock = self.reactor
        self.persistence = self.make_persistence()
        await self.persistence.migrate()

    def setUp(self):
        return Deferred.fromCoroutine(self._set_up())

    def run_check(self, check):
        return Deferred.fromCoroutine(check)


class PostgresSchemaTests(PostgresSchemaCase):
    """What only the PostgreSQL schema shows."""

    def setUp(self):
        return Deferred.fromCoroutine(self._create_schema())

    async def test_schema_and_migration_log(self):
        """migrate() creates every §5.2 table in the schema and records its version once."""
        persistence = self.make_persistence(pool_size=1)
        await persistence.migrate()
        await persistence.migrate()
        rows = await self.admin.runQuery(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (self.schema,),
        )
        self.assertEqual({row[0] for row in rows}, TABLES)
        rows = await self.admin.runQuery(f"SELECT version FROM {self.schema}.schema_migrations ORDER BY version")
        self.assertEqual(rows, MIGRATIONS)

    async def test_concurrent_migrate(self):
        """Two instances migrating the same empty schema at once both succeed."""
        first = self.make_persistence(pool_size=1)
        second = self.make_persistence(pool_size=1)
        await gatherResults([first.migrate(), second.migrate()])
        rows = await self.admin.runQuery(f"SELECT version FROM {self.schema}.schema_migrations ORDER BY version")
        self.assertEqual(rows, MIGRATIONS)

    async def test_types(self):
        """Timestamps are timestamptz and tenant ids are varchar(64) in PostgreSQL."""
        persistence = self.make_persistence(pool_size=1)
        await persistence.migrate()
        rows = await self.admin.runQuery(
            "SELECT table_name, column_name, data_type, character_maximum_length "
            "FROM information_schema.columns WHERE table_schema = %s",
            (self.schema,),
        )
        columns = {(r[0], r[1]): (r[2], r[3]) for r in rows}
        self.assertEqual(
            columns[("plugin_installations", "created_at")], ("timestamp with time zone", None)
        )
        self.assertEqual(
            columns[("plugin_installations", "tenant_id")], ("character varying", 64)
        )
        self.assertEqual(columns[("plugins", "id")], ("uuid", None))

    async def test_unreachable_server_fails(self):
        """An unreachable server fails the call with 'database unavailable' and the driver's reason, and close() works."""
        persistence = PostgresPersistence(
            self.reactor, "host=127.0.0.1 port=1 user=postgres dbname=test", pool_size=2,
        )
        failure = None
        try:
            await persistence.migrate()
        except DatabaseUnavailableError as e:
            failure = e
        self.assertIsInstance(failure, DatabaseUnavailableError)
        self.assertTrue(failure.message.startswith("database unavailable: cannot connect to 127.0.0.1:1/test: "))
        self.assertIn("Connection refused", failure.message)
        self.assertIsInstance(failure.__cause__, psycopg2.OperationalError)
        await persistence.close()

    async def test_read_only_operations_cannot_write(self):
        """An operation marked read_only runs in a READ ONLY transaction: a write in it is refused."""
        persistence = self.make_persistence(pool_size=1)
        await persistence.migrate()

        @read_only
        async def sneaky(tx):
            await tx.execute("DELETE FROM install_tasks")

        failure = None
        try:
            await persistence._transact(sneaky)
        except psycopg2.Error as e:
            failure = e
        self.assertEqual(failure.pgcode, "25006")  # read_only_sql_transaction
        # the connection is still good
        self.assertEqual(await persistence.list_tasks("t", 0, 1), [])


class MissingDatabaseTests(AsyncTestCase):
    """A missing database is created through DB_DEFAULT_DATABASE, as the Go daemon does."""

    async def _admin(self):
        from twisted.internet import reactor

        admin = txpostgres.Connection(reactor=reactor)
        await admin.connect(postgres_dsn())
        self.addCleanup(admin.close)
        return admin

    async def _drop_later(self, admin, name):
        async def drop():
            await admin.runOperation(f"DROP DATABASE IF EXISTS {quote_identifier(name)} WITH (FORCE)")

        self.addCleanup(lambda: Deferred.fromCoroutine(drop()))

    def _persistence(self, name, default_database):
        from twisted.internet import reactor

        persistence = PostgresPersistence(
            reactor, postgres_dsn(), pool_size=2, default_database=default_database, dbname=name
        )
        self.addCleanup(persistence.close)
        return persistence

    async def test_created_by_racing_replicas(self):
        """Two replicas starting together on a missing database (an awkward name) both create-or-find it and migrate."""
        admin = await self._admin()
        name = f'difydaemon test "{secrets.token_hex(4)}" Db'
        await self._drop_later(admin, name)
        first = self._persistence(name, "postgres")
        second = self._persistence(name, "postgres")
        await gatherResults([first.migrate(), second.migrate()])
        rows = await admin.runQuery("SELECT datname FROM pg_database WHERE datname = %s", (name,))
        self.assertEqual(rows, [(name,)])
        self.assertEqual(await first.list_tasks("t", 0, 1), [])

    async def test_not_created_without_default_database(self):
        """Without a default database a missing one is not created, and the error says it does not exist."""
        admin = await self._admin()
        name = "difydaemon_missing_" + secrets.token_hex(4)
        await self._drop_later(admin, name)
        failure = None
        try:
            await self._persistence(name, None).migrate()
        except DatabaseUnavailableError as e:
            failure = e
        self.assertIn("does not exist", failure.message)
        rows = await admin.runQuery("SELECT datname FROM pg_database WHERE datname = %s", (name,))
        self.assertEqual(rows, [])


class IdentifierTests(SynchronousTestCase):
    """quote_identifier makes any database name safe in SQL."""

    def test_quoting(self):
        """Names are double-quoted, inner double quotes doubled, case and spaces kept."""
        self.assertEqual(quote_identifier("dify_plugin"), '"dify_plugin"')
        self.assertEqual(quote_identifier('a "b"; DROP DATABASE x; --'), '"a ""b""; DROP DATABASE x; --"')
        self.assertEqual(quote_identifier("Mixed Case"), '"Mixed Case"')

    def test_unusable(self):
        """An empty name or one with NUL is refused."""
        self.assertRaises(ValueError, quote_identifier, "")
        self.assertRaises(ValueError, quote_identifier, "a\x00b")


class ConnectionGoneTests(SynchronousTestCase):
    """Which errors mean the connection is unusable."""

    def test_gone(self):
        """Interface errors, lost connections, and operational errors without state or of class 08 / shutdown are gone."""
        self.assertTrue(connection_gone(psycopg2.InterfaceError("connection already closed")))
        self.assertTrue(connection_gone(ConnectionLost()))
        self.assertTrue(connection_gone(psycopg2.OperationalError("server closed the connection unexpectedly")))

    def test_not_gone(self):
        """SQL errors on a healthy connection are not."""
        self.assertFalse(connection_gone(psycopg2.IntegrityError("duplicate key")))
        self.assertFalse(connection_gone(psycopg2.ProgrammingError("syntax error")))
        self.assertFalse(connection_gone(ValueError("bug")))


class PlaceholderTests(SynchronousTestCase):
    """The ``?`` -> ``%s`` conversion for psycopg2."""

    def test_placeholders_and_percent(self):
        """Question marks become %s and a literal percent sign is doubled."""
        self.assertEqual(
            to_pyformat("SELECT * FROM t WHERE a = ? AND b LIKE 'x%' AND c IN (?, ?)"),
            "SELECT * FROM t WHERE a = %s AND b LIKE 'x%%' AND c IN (%s, %s)",
        )
