"""
Backwards invocations end to end: the whole daemon on the real reactor, a
real SDK plugin in a real uv venv calling back into Dify through the
daemon, and the fake Dify inner API listening on a real port.
"""

from __future__ import annotations

import orjson

from difydaemon.testing.inner_api import FakeDifyInnerAPI, base_url
from difydaemon.testing.plugins import callback_plugin_files
from tests.test_end_to_end import TENANT, DaemonCase, sse_items

INNER_KEY = "inner-api-key"

TOOL_AND_LLM = """\
    tool:
      enabled: true
    model:
      enabled: true
      llm: true
    storage:
      enabled: true
      size: 1024
"""

STORAGE_ONLY = """\
    storage:
      enabled: true
      size: 1024
"""


def texts(body: bytes) -> list[str]:
    """The texts of a tool's SSE answer (every item must be a success)."""
    out = []
    for item in sse_items(body):
        assert item["code"] == 0, item
        if item["data"]["type"] == "text":
            out.append(item["data"]["message"]["text"])
    return out


class BackwardsCase(DaemonCase):
    """A daemon whose DIFY_INNER_API_URL is a fake Dify inner API."""

    async def start_with_plugin(self, permission: str, **environ):
        from twisted.internet import reactor

        self.dify = FakeDifyInnerAPI(reactor, INNER_KEY)
        port = await self.dify.listen()
        self.addCleanup(self.dify.stop)
        await self._start(
            DIFY_INNER_API_URL=base_url(port), DIFY_INNER_API_KEY=INNER_KEY, **environ
        )
        await self.install(callback_plugin_files(permission))
        self.assertEqual(self.task["status"], "success", self.task)


class BackwardsEndToEndTests(BackwardsCase):
    """A real plugin calls Dify through the daemon."""

    async def test_tool_and_llm_through_dify(self):
        """A tool invokes another tool and streams an LLM call; Dify gets the typed requests."""
        await self.start_with_plugin(TOOL_AND_LLM)
        answer = texts(await self.tool("call_tool", {"provider": "time", "tool": "now", "text": "hello"}))
        self.assertTrue(answer and not answer[0].startswith("error"), answer)
        self.assertIn("hello", "".join(answer))
        tool_call = [r for r in self.dify.received if r.path == "invoke/tool"][-1]
        self.assertEqual(tool_call.headers.get("x-inner-api-key"), INNER_KEY)
        self.assertEqual(
            (tool_call.body["tenant_id"], tool_call.body["user_id"], tool_call.body["type"]), (TENANT, "u1", "tool")
        )
        self.assertEqual(
            (tool_call.body["tool_type"], tool_call.body["provider"], tool_call.body["tool"]), ("builtin", "time", "now")
        )
        self.assertNotIn("app_id", tool_call.body)

        answer = texts(await self.tool("call_llm", {"text": "say hi"}))
        self.assertEqual(answer[-1], "done", answer)
        self.assertGreater(len(answer), 2)
        llm_call = [r for r in self.dify.received if r.path == "invoke/llm"][-1]
        self.assertEqual(llm_call.body["model"], "gpt-3.5-turbo")
        self.assertEqual(llm_call.body["prompt_messages"][0]["content"], "say hi")
        self.assertTrue(llm_call.body["stream"])

    async def test_dify_failures_reach_the_plugin(self):
        """A 500, garbage frames, a slow answer and a stopped inner API each reach the plugin as an error."""
        await self.start_with_plugin(TOOL_AND_LLM, DIFY_BACKWARDS_INVOCATION_READ_TIMEOUT="1500")
        call = {"provider": "time", "tool": "now", "text": "x"}
        self.dify.fail("invoke/tool", 500, b"dify broke")
        answer = texts(await self.tool("call_tool", call))
        self.assertEqual(len(answer), 1, answer)
        self.assertIn("500", answer[0])
        self.assertTrue(answer[0].startswith("error: "), answer)

        self.dify.garbage("invoke/tool", b"\x01\x02 not a frame")
        answer = texts(await self.tool("call_tool", call))
        self.assertTrue(answer[0].startswith("error: "), answer)

        self.dify.slow("invoke/tool", 5)
        answer = texts(await self.tool("call_tool", call))
        self.assertTrue(answer[0].startswith("error: ") and "timed out" in answer[0], answer)

        await self.dify.stop()
        answer = texts(await self.tool("call_tool", call))
        self.assertTrue(answer[0].startswith("error: ") and "failed to call dify inner api" in answer[0], answer)

        # and the daemon keeps serving
        self.assertEqual(texts(await self.tool("echo", {"text": "still here"})), ["still here"])

    async def test_storage_across_calls_and_quota(self):
        """Values persist across sessions; a value past storage.size is refused; a deleted key is gone."""
        await self.start_with_plugin(STORAGE_ONLY)
        self.assertEqual(texts(await self.tool("kv", {"op": "set", "key": "greeting", "text": "hello"})), ["set"])
        self.assertEqual(texts(await self.tool("kv", {"op": "get", "key": "greeting"})), ["hello"])
        self.assertEqual(texts(await self.tool("kv", {"op": "exist", "key": "greeting"})), ["True"])
        big = "x" * 1020  # with "hello", 1025 bytes: one past storage.size
        answer = texts(await self.tool("kv", {"op": "set", "key": "big", "text": big}))
        self.assertTrue(answer[0].startswith("error: "), answer)
        self.assertEqual(texts(await self.tool("kv", {"op": "exist", "key": "big"})), ["False"])
        self.assertEqual(texts(await self.tool("kv", {"op": "del", "key": "greeting"})), ["deleted"])
        self.assertEqual(texts(await self.tool("kv", {"op": "exist", "key": "greeting"})), ["False"])
        answer = texts(await self.tool("kv", {"op": "get", "key": "greeting"}))
        self.assertTrue(answer[0].startswith("error: "), answer)
        self.assertEqual([r.path for r in self.dify.received], [])

    async def test_plugin_without_permission(self):
        """A plugin without tool or model permission gets the spec's refusal, and Dify is never called."""
        await self.start_with_plugin(STORAGE_ONLY)
        answer = texts(await self.tool("call_tool", {"provider": "time", "tool": "now", "text": "x"}))
        self.assertEqual(answer, ["error: permission denied, you need to enable tool access in plugin manifest"])
        answer = texts(await self.tool("call_llm", {"text": "x"}))
        self.assertEqual(answer, ["error: permission denied, you need to enable llm access in plugin manifest"])
        self.assertEqual(self.dify.received, [])


class DebugBackwardsTests(BackwardsCase):
    """The same dispatcher serves a plugin connected over the debug port."""

    async def test_debug_plugin_uses_storage_and_tools(self):
        """A remote-debug plugin keeps data and calls a tool through the daemon."""
        from twisted.internet import reactor, task

        from tests.runtimes.test_debug import start_remote_plugin
        from tests.test_tap import free_port

        self.dify = FakeDifyInnerAPI(reactor, INNER_KEY)
        port = await self.dify.listen()
        self.addCleanup(self.dify.stop)
        debug_port = free_port()
        await self._start(
            DIFY_INNER_API_URL=base_url(port),
            DIFY_INNER_API_KEY=INNER_KEY,
            PLUGIN_REMOTE_INSTALLING_ENABLED="true",
            PLUGIN_REMOTE_INSTALLING_HOST="127.0.0.1",
            PLUGIN_REMOTE_INSTALLING_PORT=str(debug_port),
        )
        code, reply = await self.call("POST", f"/plugin/{TENANT}/debugging/key")
        key = orjson.loads(reply)["data"]["key"]

        plugin = await start_remote_plugin(self, reactor, callback_plugin_files(TOOL_AND_LLM), debug_port, key)
        for _ in range(600):
            code, reply = await self.call("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=10")
            if orjson.loads(reply)["data"]["list"]:
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        else:
            self.fail(plugin.output.decode("utf-8", "replace"))

        self.assertEqual(texts(await self.tool("kv", {"op": "set", "key": "k", "text": "from debug"})), ["set"])
        self.assertEqual(texts(await self.tool("kv", {"op": "get", "key": "k"})), ["from debug"])
        answer = texts(await self.tool("call_tool", {"provider": "time", "tool": "now", "text": "remote"}))
        self.assertIn("remote", "".join(answer))
        self.assertEqual([r.path for r in self.dify.received], ["invoke/tool"])
