"""
The whole daemon on a private PostgreSQL cluster that goes down and comes
back, with a real SDK plugin in a real uv venv: clear errors while the
database is down, dispatch to a cached installation throughout, and
recovery without restarting the daemon.
"""

from __future__ import annotations

import orjson
from twisted.internet import reactor

from difydaemon.testing.packages import build_package
from difydaemon.testing.plugins import behaviour_plugin_files
from difydaemon.testing.postgres import private_postgres_for
from tests.api.harness import encode_form
from tests.test_end_to_end import TENANT, DaemonCase

OTHER_TENANT = "0193a8a4-0000-7000-8000-00000000e2e2"


class DatabaseOutageEndToEndTests(DaemonCase):
    """A daemon whose database is stopped and started under it."""

    async def _dispatch(self, tenant: str):
        return await self.call(
            "POST",
            f"/plugin/{tenant}/dispatch/tool/invoke",
            {"user_id": "u1", "data": {"provider": "echo", "tool": "echo", "tool_parameters": {"text": "x"}, "credentials": {}}},
            {"X-Plugin-ID": "acme/echo"},
        )

    def assert_unavailable(self, reply: bytes) -> None:
        """``reply`` is a -500 envelope saying the database is unavailable."""
        envelope = orjson.loads(reply)
        self.assertEqual(envelope["code"], -500, envelope)
        inner = orjson.loads(envelope["message"])
        self.assertEqual(inner["error_type"], "PluginDaemonInternalServerError")
        self.assertTrue(inner["message"].startswith("database unavailable: "), inner["message"])

    async def test_outage_and_recovery(self):
        """Install; stop the database: clear errors, cached dispatch works; start it: the next calls succeed."""
        cluster = await private_postgres_for(self, reactor)
        await self._start(
            DB_TYPE="postgresql",
            DB_HOST=cluster.host,
            DB_PORT=str(cluster.port),
            DB_USERNAME=cluster.user,
            DB_DATABASE="dify_plugin",
            DB_CONNECT_TIMEOUT="2s",
            DB_READ_TIMEOUT="5s",
        )
        await self.install(behaviour_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)
        self.assertIn(b'"hi"', await self.tool("echo", {"text": "hi"}))

        await cluster.stop()
        code, reply = await self.call("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=10")
        self.assertEqual(code, 200)
        self.assert_unavailable(reply)
        content_type, form = encode_form({"verify_signature": "false"}, {"dify_pkg": build_package(behaviour_plugin_files())})
        code, reply = await self.call(
            "POST", f"/plugin/{TENANT}/management/install/upload/package", form, {"Content-Type": content_type}
        )
        self.assert_unavailable(reply)
        # the installation is cached: dispatch needs no database
        self.assertIn(b'"still here"', await self.tool("echo", {"text": "still here"}))
        code, reply = await self._dispatch(OTHER_TENANT)
        self.assertEqual(code, 500)
        self.assert_unavailable(reply)
        code, reply = await self.call("GET", "/health/check")
        self.assertEqual((code, orjson.loads(reply)["status"]), (200, "ok"))

        await cluster.start()
        code, reply = await self.call("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=10")
        self.assertEqual(orjson.loads(reply)["data"]["total"], 1, reply)
        code, reply = await self._dispatch(OTHER_TENANT)
        self.assertEqual(code, 404, reply)
        self.assertIn(b'"back"', await self.tool("echo", {"text": "back"}))
