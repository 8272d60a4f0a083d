"""
The whole daemon on the embedded default, on the real reactor, with a real
SDK plugin in a real uv venv: upload, install, invoke over HTTP (SSE),
misbehaving plugins, uninstall and shutdown.
"""

from __future__ import annotations

import os

import orjson
from twisted.internet import reactor, task
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from difydaemon import tap
from difydaemon.api.dispatch_channel import DispatchChannel
from difydaemon.config import load_config
from difydaemon.testing.cases import AsyncTestCase
from difydaemon.testing.http import http_client
from difydaemon.testing.packages import build_package
from difydaemon.testing.plugins import behaviour_plugin_files
from difydaemon.testing.sdk import python312, test_uv_cache_dir
from tests.api.harness import encode_form
from tests.test_tap import KEY, environment, free_port

TENANT = "0193a8a4-0000-7000-8000-00000000e2e1"


def sse_items(body: bytes) -> list:
    """The envelopes of an SSE body, checking the exact framing."""
    items = []
    for block in body.split(b"\n\n"):
        if not block:
            continue
        assert block.startswith(b"data: "), block
        items.append(orjson.loads(block[len(b"data: "):]))
    return items


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class DaemonCase(AsyncTestCase):
    """A whole daemon on the real reactor, with helpers to call it."""

    timeout = 300

    def daemon_environment(self, **extra_environ) -> dict:
        """
        A fresh working directory (``self.workdir``) and port (``self.port``),
        and the daemon's variables for them; ``extra_environ`` adds or
        overrides variables.
        """
        self.workdir = workdir = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(workdir, "cwd"))
        os.symlink(test_uv_cache_dir(), os.path.join(workdir, "cwd", ".uv-cache"))
        self.port = free_port()
        environ = environment(workdir, self.port)
        environ.update(
            {
                "FORCE_VERIFYING_SIGNATURE": "false",
                "PYTHON_INTERPRETER_PATH": python312(),
                "PLUGIN_MAX_EXECUTION_TIMEOUT": "60",
                "PYTHON_ENV_INIT_TIMEOUT": "60",
            }
        )
        environ.update(extra_environ)
        return environ

    async def _start(self, **extra_environ):
        """Start the daemon; ``extra_environ`` adds or overrides variables."""
        await self._boot(self.daemon_environment(**extra_environ))

    async def _boot(self, environ: dict):
        """Start a daemon with exactly ``environ`` (a restart passes the same one again)."""
        self.service = tap.build_daemon(reactor, load_config(environ))
        self.service.startService()
        self.addCleanup(self._stop)
        await self.service.ready
        self.http = http_client(self, reactor)

    async def _stop(self):
        if self.service.running:
            await self.service.stopService()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def call(self, method, path, body=None, headers=None):
        hdrs = {"X-Api-Key": KEY}
        hdrs.update(headers or {})
        if isinstance(body, dict):
            body = orjson.dumps(body)
            hdrs["Content-Type"] = "application/json"
        response = await self.http.request(method, self.url(path), data=body, headers=hdrs)
        return response.code, await response.content()

    async def start_install(self, files) -> tuple[str, str]:
        """Upload a package (its files, or its bytes) and start installing it: its identifier and install task id."""
        package = files if isinstance(files, bytes) else build_package(files)
        content_type, body = encode_form({"verify_signature": "false"}, {"dify_pkg": package})
        code, reply = await self.call(
            "POST", f"/plugin/{TENANT}/management/install/upload/package", body, {"Content-Type": content_type}
        )
        envelope = orjson.loads(reply)
        self.assertEqual(envelope["code"], 0, envelope)
        identifier = envelope["data"]["unique_identifier"]
        code, reply = await self.call(
            "POST",
            f"/plugin/{TENANT}/management/install/identifiers",
            {"plugin_unique_identifiers": [identifier], "source": "package", "metas": [{}]},
        )
        return identifier, orjson.loads(reply)["data"]["task_id"]

    async def install(self, files) -> str:
        """Upload and install a package, waiting for its task to end (``self.task``)."""
        identifier, task_id = await self.start_install(files)
        while True:
            code, reply = await self.call("GET", f"/plugin/{TENANT}/management/install/tasks/{task_id}")
            found = orjson.loads(reply)["data"]
            if found["status"] in ("success", "failed"):
                self.task = found
                return identifier
            await task.deferLater(reactor, 0.1, lambda: None)

    async def tool(self, tool: str, parameters: dict):
        code, body = await self.call(
            "POST",
            f"/plugin/{TENANT}/dispatch/tool/invoke",
            {"user_id": "u1", "data": {"provider": "echo", "tool": tool, "tool_parameters": parameters, "credentials": {}}},
            {"X-Plugin-ID": "acme/echo"},
        )
        self.assertEqual(code, 200, body)
        return body


class EndToEndTests(DaemonCase):
    """A real plugin through the daemon's HTTP API."""

    async def test_plugin_lifecycle_over_http(self):
        """Upload, install, echo, long stream, plugin errors, a crash, a flood, uninstall and shutdown."""
        await self._start()
        identifier = await self.install(behaviour_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)

        body = await self.tool("echo", {"text": "hi"})
        self.assertEqual(
            body,
            b'data: {"code":0,"message":"success","data":{"type":"text","message":{"text":"hi"},"meta":null}}\n\n'
            b'data: {"code":0,"message":"success","data":{"type":"json","message":{"json_object":{"echo":"hi","length":2}},"meta":null}}\n\n',
        )

        items = sse_items(await self.tool("stream", {"count": "1000"}))
        self.assertEqual([i["data"]["message"]["text"] for i in items], [f"chunk-{i}" for i in range(1000)])

        items = sse_items(await self.tool("fail", {}))
        self.assertEqual(items[-1]["code"], -500)
        outer = orjson.loads(items[-1]["message"])
        self.assertEqual(outer["error_type"], "PluginInvokeError")
        inner = orjson.loads(outer["message"])
        self.assertEqual((inner["error_type"], inner["message"]), ("ValueError", "planned failure"))

        runtime = self.service.runtimes.get(identifier)
        first_pid = runtime.instances[0].pid if hasattr(runtime.instances[0], "pid") else None
        items = sse_items(await self.tool("crash", {}))
        self.assertEqual(items[0]["data"]["message"]["text"], "before the crash")
        self.assertEqual(items[-1]["code"], -500)
        self.assertEqual(orjson.loads(orjson.loads(items[-1]["message"])["message"])["error_type"], "ConnectionClosedError")

        # the crashed instance is restarted and serves again
        for _ in range(100):
            if runtime.is_ready():
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        body = await self.tool("echo", {"text": "again"})
        self.assertIn(b'"again"', body)
        if first_pid is not None:
            self.assertNotEqual(runtime.instances[0].pid, first_pid)

        items = sse_items(await self.tool("flood", {"size": str(6 * 1024 * 1024)}))
        self.assertEqual(items[-1]["code"], -500)

        for _ in range(100):
            if runtime.is_ready():
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        code, reply = await self.call("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=10")
        installation = orjson.loads(reply)["data"]["list"][0]
        pids = [p for p in (getattr(i, "pid", None) for i in runtime.instances) if p]
        code, reply = await self.call(
            "POST", f"/plugin/{TENANT}/management/uninstall", {"plugin_installation_id": installation["id"]}
        )
        self.assertEqual(orjson.loads(reply)["data"], True)
        self.assertIsNone(self.service.runtimes.get(identifier))
        for pid in pids:
            self.assertFalse(_alive(pid), f"plugin process {pid} outlived its uninstall")
        code, body = await self.call(
            "POST",
            f"/plugin/{TENANT}/dispatch/tool/invoke",
            {"user_id": "u1", "data": {"provider": "echo", "tool": "echo", "tool_parameters": {"text": "x"}}},
            {"X-Plugin-ID": "acme/echo"},
        )
        self.assertEqual(code, 404)

    async def test_one_pooled_connection_for_every_call(self):
        """
        Upload, install, task polling, list and dispatch calls on one
        keep-alive connection, as Dify's pooled client sends them: the
        connection stays open and on the dispatch channel throughout.
        """
        await self._start()
        accepted = []
        build = self.service.site.buildProtocol

        def counting(addr):
            protocol = build(addr)
            accepted.append(protocol)
            return protocol

        self.service.site.buildProtocol = counting
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 1
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        await self.install(behaviour_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)
        for text in ("one", "two"):
            self.assertIn(b'"%s"' % text.encode(), await self.tool("echo", {"text": text}))
            code, reply = await self.call("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=10")
            self.assertEqual(len(orjson.loads(reply)["data"]["list"]), 1)
        self.assertEqual(len(accepted), 1)
        self.assertIsInstance(accepted[0], DispatchChannel)
        self.assertIsNone(accepted[0]._inner)

    async def test_failed_install_leaves_nothing(self):
        """A plugin whose dependency does not exist fails its task with uv's words; nothing stays."""
        await self._start()
        files = behaviour_plugin_files(extra_requirements=("difydaemon-no-such-package-xyz==1.0",))
        await self.install(files)
        self.assertEqual(self.task["status"], "failed")
        message = self.task["plugins"][0]["message"]
        self.assertIn("installing dependencies from requirements.txt failed", message)
        self.assertIn("difydaemon-no-such-package-xyz", message)
        code, reply = await self.call("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=10")
        self.assertEqual(orjson.loads(reply)["data"]["total"], 0)
        working = self.service.config.local_runtime.plugin_working_path
        self.assertEqual(os.listdir(os.path.join(working, "acme")), [])

    async def test_plugins_come_back_and_stop_with_daemon(self):
        """After a restart the installed plugin answers again; after shutdown no plugin process remains."""
        await self._start()
        identifier = await self.install(behaviour_plugin_files())
        runtime = self.service.runtimes.get(identifier)
        pids = [p for p in (getattr(i, "pid", None) for i in runtime.instances) if p]
        config = self.service.config
        await self.service.stopService()
        for pid in pids:
            self.assertFalse(_alive(pid), f"plugin process {pid} outlived the daemon")
        self.service = tap.build_daemon(reactor, config)
        self.service.startService()
        await self.service.ready
        for _ in range(200):
            restored = self.service.runtimes.get(identifier)
            if restored is not None and restored.is_ready():
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        body = await self.tool("echo", {"text": "back"})
        self.assertIn(b'"back"', body)


class ScaffoldToDaemonTests(DaemonCase):
    """What ``dify plugin init`` makes runs in the daemon as made."""

    async def test_scaffolded_plugin_installs_and_answers(self):
        """dify plugin init + dify plugin package -> upload, install and invoke its tool over HTTP."""
        import io

        from difydaemon.cli.main import main as dify

        await self._start()
        parent = os.path.abspath(self.mktemp())
        os.makedirs(parent)
        out = io.StringIO()
        argv = ["plugin", "init", "--quick", "--author", "acme", "--name", "hello",
                "--description", "Says hello", "--category", "tool", "-o", parent]
        self.assertEqual(dify(argv, stdout=out, stderr=out), 0, out.getvalue())
        package_path = os.path.join(parent, "hello.difypkg")
        argv = ["plugin", "package", os.path.join(parent, "hello"), "-o", package_path]
        self.assertEqual(dify(argv, stdout=out, stderr=out), 0, out.getvalue())
        with open(package_path, "rb") as f:
            data = f.read()
        content_type, body = encode_form({"verify_signature": "false"}, {"dify_pkg": data})
        code, reply = await self.call(
            "POST", f"/plugin/{TENANT}/management/install/upload/package", body, {"Content-Type": content_type}
        )
        identifier = orjson.loads(reply)["data"]["unique_identifier"]
        self.assertIn(identifier, out.getvalue())
        code, reply = await self.call(
            "POST",
            f"/plugin/{TENANT}/management/install/identifiers",
            {"plugin_unique_identifiers": [identifier], "source": "package", "metas": [{}]},
        )
        task_id = orjson.loads(reply)["data"]["task_id"]
        for _ in range(600):
            code, reply = await self.call("GET", f"/plugin/{TENANT}/management/install/tasks/{task_id}")
            found = orjson.loads(reply)["data"]
            if found["status"] in ("success", "failed"):
                break
            await task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(found["status"], "success", found)
        code, reply = await self.call("GET", f"/plugin/{TENANT}/management/tools?page=1&page_size=10")
        provider = orjson.loads(reply)["data"][0]
        tool_name = provider["declaration"]["tools"][0]["identity"]["name"]
        code, body = await self.call(
            "POST",
            f"/plugin/{TENANT}/dispatch/tool/invoke",
            {"user_id": "u1", "data": {"provider": provider["provider"], "tool": tool_name,
                                       "tool_parameters": {"query": "world"}, "credentials": {}}},
            {"X-Plugin-ID": "acme/hello"},
        )
        self.assertEqual(code, 200, body)
        items = sse_items(body)
        self.assertTrue(items, body)
        self.assertTrue(all(item["code"] == 0 for item in items), body)
        self.assertIn(b"world", body)
