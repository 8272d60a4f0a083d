"""
A plugin whose declaration is over a megabyte of JSON, listed by the whole
daemon on the real PostgreSQL with a real SDK plugin in a real uv venv:
the list is right when the declaration was held since its upload, and after
a restart, when the daemon decodes the stored row (off the reactor) first.
"""

from __future__ import annotations

import orjson

from difydaemon.testing.plugins import large_declaration_plugin_files
from tests.daemon_postgres import connect, fresh_database
from tests.test_end_to_end import TENANT, DaemonCase

#: output-schema fields of the echo tool: ~1.2 MB of declaration JSON
FIELDS = 20_000


class LargeDeclarationEndToEndTests(DaemonCase):
    """management/list of a plugin with a large declaration, on PostgreSQL."""

    async def _list(self) -> bytes:
        code, reply = await self.call("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=10")
        self.assertEqual(code, 200, reply[:300])
        return reply

    async def test_large_declaration_listed(self):
        """The list embeds the stored declaration exactly, from the upload's copy and after a restart."""
        database = await fresh_database(self, "difydaemon_declarations_")
        environ = self.daemon_environment(**database)
        await self._boot(environ)
        identifier = await self.install(large_declaration_plugin_files(FIELDS))
        self.assertEqual(self.task["status"], "success", self.task)
        connection = await connect(database)
        self.addCleanup(connection.close)
        rows = await connection.runQuery(
            "SELECT declaration FROM plugin_declarations WHERE plugin_unique_identifier = %s", (identifier,)
        )
        stored = orjson.loads(rows[0][0])
        self.assertGreater(len(rows[0][0]), 1_000_000)

        first = await self._list()
        entity = orjson.loads(first)["data"]["list"][0]
        self.assertEqual(entity["plugin_unique_identifier"], identifier)
        self.assertEqual(entity["declaration"], stored)
        tool = entity["declaration"]["tool"]["tools"][0]
        self.assertEqual(len(tool["output_schema"]["properties"]), FIELDS)
        self.assertEqual(await self._list(), first)

        # another daemon on the same database, storage and port: nothing held
        await self._stop()
        await self._boot(environ)
        self.assertEqual(await self._list(), first)
        self.assertIn(b'"hi"', await self.tool("echo", {"text": "hi"}))
