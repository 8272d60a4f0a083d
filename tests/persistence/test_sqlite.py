"""SQLitePersistence against the IPersistence contract, inline and threaded."""

import os
import sqlite3
import stat

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock

from difydaemon.persistence.sqlite import SQLitePersistence, decode_time, encode_time, run_inline
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from tests.persistence.contract import ECHO_1, T1, FrozenTimeReactor, PersistenceContract

#: every table of http-api §5.2 plus the migration log
#: every migration shipped, in order
MIGRATIONS = [("0001_initial",), ("0002_debugging_keys",), ("0003_plugin_storage",)]

TABLES = {
    "plugins", "plugin_installations", "plugin_declarations", "tool_installations",
    "ai_model_installations", "agent_strategy_installations", "datasource_installations",
    "trigger_installations", "endpoints", "install_tasks", "serverless_runtimes",
    "tenant_storages", "plugin_readme_records", "schema_migrations", "debugging_keys",
    "plugin_storages",
}


class InlineSQLitePersistenceTests(PersistenceContract, SynchronousTestCase):
    """SQLite on ``:memory:``, run on the test's thread, keeps the contract."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        self.persistence = SQLitePersistence(self.clock, ":memory:", run_blocking=run_inline)
        self.successResultOf(self.persistence.migrate())
        self.addCleanup(lambda: self.successResultOf(self.persistence.close()))

    def run_check(self, check):
        self.successResultOfCoroutine(check)


class ThreadedSQLitePersistenceTests(PersistenceContract, AsyncTestCase):
    """SQLite on a real file, through its own worker thread, keeps the contract."""

    def setUp(self):
        from twisted.internet import reactor

        self.clock = FrozenTimeReactor(reactor)
        self.persistence = SQLitePersistence(self.clock, self.mktemp() + ".sqlite3")
        self.addCleanup(self.persistence.close)
        return self.persistence.migrate()

    def run_check(self, check):
        return Deferred.fromCoroutine(check)


class SQLiteFileTests(AsyncTestCase):
    """What only the file-backed SQLite database shows."""

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = FrozenTimeReactor(reactor)
        self.path = self.mktemp() + ".sqlite3"

    async def test_schema_and_migration_log(self):
        """migrate() creates every §5.2 table and records its version once."""
        persistence = SQLitePersistence(self.reactor, self.path)
        await persistence.migrate()
        await persistence.migrate()
        await persistence.close()
        connection = sqlite3.connect(self.path)
        try:
            tables = {row[0] for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            )}
            versions = connection.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
        finally:
            connection.close()
        self.assertEqual(tables, TABLES)
        self.assertEqual(versions, MIGRATIONS)

    async def test_data_survives_reopen(self):
        """Rows written before close() are read back by a new instance on the same file."""
        first = SQLitePersistence(self.reactor, self.path)
        await first.migrate()
        installation = await first.install_plugin(
            T1, ECHO_1, "acme/echo", "local", "marketplace", {}, {"tool": "echo"}
        )
        await first.close()
        second = SQLitePersistence(self.reactor, self.path)
        self.addCleanup(second.close)
        await second.migrate()
        self.assertEqual(await second.get_installation(T1, "acme/echo"), installation)

    async def test_files_are_private(self):
        """The database file and its -wal and -shm are created 0600, even under umask 000."""
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        persistence = SQLitePersistence(self.reactor, self.path)
        self.addCleanup(persistence.close)
        await persistence.migrate()
        modes = {name: stat.S_IMODE(os.stat(self.path + name).st_mode) for name in ("", "-wal", "-shm")}
        self.assertEqual(modes, {"": 0o600, "-wal": 0o600, "-shm": 0o600})

    async def test_readable_file_is_made_private(self):
        """A database file left readable by group and others is made 0600 when the daemon opens it."""
        with open(self.path, "wb"):
            pass
        os.chmod(self.path, 0o644)
        persistence = SQLitePersistence(self.reactor, self.path)
        self.addCleanup(persistence.close)
        await persistence.migrate()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    async def test_close_stops_worker(self):
        """close() stops the private worker thread and forgets the shutdown trigger."""
        persistence = SQLitePersistence(self.reactor, self.path)
        await persistence.migrate()
        pool = persistence._own_pool
        self.assertTrue(pool.started)
        await persistence.close()
        self.assertFalse(pool.started)
        self.assertEqual([t for t in pool.threads if t.is_alive()], [])
        self.assertIsNone(persistence._shutdown_trigger)


class SQLiteTimeTests(SynchronousTestCase):
    """The text form of timestamps in SQLite."""

    def test_round_trip_and_order(self):
        """Encoded times decode to the same aware UTC time and sort as text by time."""
        from difydaemon.ids import utc_from_timestamp

        moments = [utc_from_timestamp(t) for t in (1.0, 1.5, 1_700_000_000.000001, 2e9)]
        texts = [encode_time(m) for m in moments]
        self.assertEqual([decode_time(t) for t in texts], moments)
        self.assertEqual(sorted(texts), texts)
        self.assertEqual(texts[0], "1970-01-01T00:00:01.000000+00:00")
