"""The pure parts of the shared SQL layer: migration files and helpers."""

from pathlib import Path

from difydaemon.persistence.sql import is_uuid, load_migrations, split_statements
from difydaemon.testing.cases import SynchronousTestCase


class SplitStatementsTests(SynchronousTestCase):
    """Migration scripts are cut into statements."""

    def test_split(self):
        """Comment lines are dropped and statements end at a line-ending semicolon."""
        script = (
            "-- a comment; with a semicolon\n"
            "CREATE TABLE a (\n  x text DEFAULT 'y'\n);\n\n"
            "CREATE INDEX i ON a (x);\n"
            "-- trailing comment\n"
        )
        self.assertEqual(
            split_statements(script),
            ("CREATE TABLE a (\n  x text DEFAULT 'y'\n)", "CREATE INDEX i ON a (x)"),
        )

    def test_last_statement_without_semicolon(self):
        """A final statement without its semicolon is kept."""
        self.assertEqual(split_statements("SELECT 1;\nSELECT 2\n"), ("SELECT 1", "SELECT 2"))


class LoadMigrationsTests(SynchronousTestCase):
    """Migration files are found, ordered and overridden per dialect."""

    def test_order_and_override(self):
        """Files sort by version and a <dialect>.sql file replaces the common one."""
        folder = Path(self.mktemp())
        folder.mkdir()
        (folder / "0002_more.sql").write_text("CREATE TABLE common2 (x text);\n")
        (folder / "0001_initial.sql").write_text("CREATE TABLE common (x text);\n")
        (folder / "0001_initial.postgres.sql").write_text("CREATE TABLE pg (x text);\n")
        (folder / "README.txt").write_text("not a migration")
        sqlite = load_migrations("sqlite", folder)
        postgres = load_migrations("postgres", folder)
        self.assertEqual([m.version for m in sqlite], ["0001_initial", "0002_more"])
        self.assertEqual(sqlite[0].statements, ("CREATE TABLE common (x text)",))
        self.assertEqual(postgres[0].statements, ("CREATE TABLE pg (x text)",))
        self.assertEqual(postgres[1].statements, ("CREATE TABLE common2 (x text)",))

    def test_shipped_migrations(self):
        """The package ships 0001_initial, creating the thirteen §5.2 tables."""
        migrations = load_migrations("sqlite")
        self.assertEqual(migrations[0].version, "0001_initial")
        creates = [s for s in migrations[0].statements if s.startswith("CREATE TABLE")]
        self.assertEqual(len(creates), 13)


class IsUuidTests(SynchronousTestCase):
    """Ids are checked before they reach a uuid column."""

    def test_is_uuid(self):
        """Canonical UUID text passes; anything else does not."""
        self.assertTrue(is_uuid("0190a4b8-6c1e-7c6e-9a0b-1234567890ab"))
        self.assertFalse(is_uuid("nonsense"))
        self.assertFalse(is_uuid(""))
        self.assertFalse(is_uuid(None))
