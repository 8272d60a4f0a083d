"""
Upgrades under load, end to end: the whole daemon on the real reactor, a
real SDK plugin in real uv venvs, 20 calls a second through the upgrade.
"""

from __future__ import annotations

import orjson
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList

from difydaemon.testing.packages import build_package, echo_plugin_files
from difydaemon.testing.plugins import behaviour_plugin_files
from tests.api.harness import encode_form
from tests.test_end_to_end import TENANT, DaemonCase, sse_items

CALLS_PER_SECOND = 20


class UpgradeUnderLoadTests(DaemonCase):
    """Upgrading a plugin while calls keep coming."""

    timeout = 400

    async def upload(self, files) -> str:
        content_type, body = encode_form({"verify_signature": "false"}, {"dify_pkg": build_package(files)})
        code, reply = await self.call(
            "POST", f"/plugin/{TENANT}/management/install/upload/package", body, {"Content-Type": content_type}
        )
        envelope = orjson.loads(reply)
        self.assertEqual(envelope["code"], 0, envelope)
        return envelope["data"]["unique_identifier"]

    async def upgrade(self, original: str, new: str) -> dict:
        """Upgrade and wait for the task; the task's final state."""
        code, reply = await self.call(
            "POST",
            f"/plugin/{TENANT}/management/install/upgrade",
            {"original_plugin_unique_identifier": original, "new_plugin_unique_identifier": new,
             "source": "package", "meta": {}},
        )
        answer = orjson.loads(reply)
        self.assertEqual(answer["code"], 0, answer)
        task_id = answer["data"]["task_id"]
        while True:
            code, reply = await self.call("GET", f"/plugin/{TENANT}/management/install/tasks/{task_id}")
            found = orjson.loads(reply)["data"]
            if found["status"] in ("success", "failed"):
                return found
            await task.deferLater(reactor, 0.1, lambda: None)

    async def installed(self) -> list[str]:
        code, reply = await self.call("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=10")
        return [p["plugin_unique_identifier"] for p in orjson.loads(reply)["data"]["list"]]

    async def echo(self, results: list) -> None:
        """One echo call; its outcome (None for success, else what went wrong) goes in ``results``."""
        try:
            code, body = await self.call(
                "POST",
                f"/plugin/{TENANT}/dispatch/tool/invoke",
                {"user_id": "u1", "data": {"provider": "echo", "tool": "echo",
                                           "tool_parameters": {"text": "hi"}, "credentials": {}}},
                {"X-Plugin-ID": "acme/echo"},
            )
            items = sse_items(body)
            ok = code == 200 and items and all(item["code"] == 0 for item in items) and b'"hi"' in body
            results.append(None if ok else (code, body[:300]))
        except Exception as exc:
            results.append(repr(exc))

    def load(self, results: list, calls: list):
        """Start a call every 1/20 s, none awaited by the next; a LoopingCall to stop."""
        loop = task.LoopingCall(lambda: calls.append(Deferred.fromCoroutine(self.echo(results))))
        loop.clock = reactor
        loop.start(1 / CALLS_PER_SECOND)
        self.addCleanup(lambda: loop.stop() if loop.running else None)
        return loop

    async def test_upgrade_under_load(self):
        """20 calls a second through an upgrade all succeed, a long call open on the old version finishes, and the new version serves afterwards."""
        await self._start()
        old = await self.install(behaviour_plugin_files(version="0.0.1"))
        self.assertEqual(self.task["status"], "success", self.task)
        new = await self.upload(behaviour_plugin_files(version="0.0.2"))
        results, calls = [], []
        loop = self.load(results, calls)
        await task.deferLater(reactor, 1, lambda: None)
        before = len(calls)
        long_call = Deferred.fromCoroutine(self.call(
            "POST",
            f"/plugin/{TENANT}/dispatch/tool/invoke",
            {"user_id": "u1", "data": {"provider": "echo", "tool": "paced",
                                       "tool_parameters": {"delay": 6, "count": 2}, "credentials": {}}},
            {"X-Plugin-ID": "acme/echo"},
        ))
        outcome = await self.upgrade(old, new)
        during = len(calls) - before
        self.assertFalse(long_call.called)  # still open on the old version when the upgrade is done
        await task.deferLater(reactor, 2, lambda: None)
        loop.stop()
        await DeferredList(calls)
        code, body = await long_call
        self.assertEqual(code, 200, body)
        self.assertTrue(all(item["code"] == 0 for item in sse_items(body)), body)
        self.assertEqual(outcome["status"], "success", outcome)
        self.assertEqual(await self.installed(), [new])
        self.assertEqual([r for r in results if r is not None], [])
        # The upgrade really ran under load: calls kept starting while it ran. Its length is not
        # the test's to fix (a quick one took 0.95 s in a CI run); the new version's start alone
        # takes longer than a quarter second, so fewer calls than that mean the load had stalled.
        self.assertGreaterEqual(during, CALLS_PER_SECOND // 4)
        self.assertIsNone(self.service.runtimes.get(old))

    async def test_failed_upgrade_keeps_old_version(self):
        """An upgrade whose dependency cannot install fails, and the old version keeps serving every call."""
        await self._start()
        old = await self.install(echo_plugin_files(version="0.0.1"))
        broken = await self.upload(
            echo_plugin_files(version="0.0.2", extra_requirements=("/nonexistent/missing-1.0-py3-none-any.whl",))
        )
        results, calls = [], []
        loop = self.load(results, calls)
        outcome = await self.upgrade(old, broken)
        await task.deferLater(reactor, 1, lambda: None)
        loop.stop()
        await DeferredList(calls)
        self.assertEqual(outcome["status"], "failed", outcome)
        self.assertIn("missing-1.0-py3-none-any.whl", outcome["plugins"][0]["message"])
        self.assertEqual(await self.installed(), [old])
        self.assertEqual([r for r in results if r is not None], [])
        self.assertGreater(len(results), CALLS_PER_SECOND // 2)
        self.assertIsNone(self.service.runtimes.get(broken))
