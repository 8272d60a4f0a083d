"""
The serverless platform end to end with our own connector: the whole
daemon with ``PLATFORM=serverless`` pointed at ``dify-sri`` running in this
process on the real reactor, both on loopback; real SDK packages built by
the connector in real uv venvs and run as functions
(``INSTALL_METHOD=serverless``) calling back into the fake Dify inner API
through ``/backwards-invocation/transaction``; on SQLite and on PostgreSQL.

Every test starts a connector on one working path shared by the whole
module: a package is built once, and a connector started again brings its
functions back (as after an operator's restart), so later tests reuse them
through ``instances`` instead of building again.
"""

from __future__ import annotations

import atexit
import base64
import os
import shutil
import signal
import tempfile

import orjson
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred

from difydaemon import tap
from difydaemon.config import load_config
from difydaemon.sri.launcher import free_port
from difydaemon.sri.tap import Options, makeService
from difydaemon.testing import sri_client
from difydaemon.testing.endpoint_plugin import endpoint_plugin_files
from difydaemon.testing.http import http_client
from difydaemon.testing.inner_api import FakeDifyInnerAPI, base_url
from difydaemon.testing.openai import FakeOpenAIServer, full_text, listen
from difydaemon.testing.packages import build_package, echo_plugin_files
from difydaemon.testing.plugins import serverless_plugin_files
from difydaemon.testing.sdk import python312, test_uv_cache_dir
from difydaemon.testing.tiktoken_cache import tiktoken_cache_dir
from tests.daemon_postgres import fresh_database
from tests.runtimes.test_official_plugins import OPENAI_PACKAGE, prepared_venvs_dir
from tests.test_backwards_end_to_end import TOOL_AND_LLM, texts
from tests.test_dispatch_end_to_end import wait_until
from tests.test_end_to_end import TENANT, sse_items
from tests.test_serverless_end_to_end import ADMIN_KEY, INNER_KEY, ServerlessCase
from tests.test_tap import KEY

CONNECTOR_KEY = "sri-daemon-end-to-end-key"
TOOLS = build_package(serverless_plugin_files(TOOL_AND_LLM))
TOOLS_FILENAME = sri_client.package_filename(TOOLS)

_working: list[str] = []


def shared_working_path() -> str:
    """The connector's ``SRI_WORKING_PATH`` for this test process (removed at exit), using the tests' uv cache and prepared venvs."""
    if not _working:
        path = tempfile.mkdtemp(prefix="difydaemon-sri-e2e-")
        atexit.register(shutil.rmtree, path, True)
        os.symlink(test_uv_cache_dir(), os.path.join(path, ".uv-cache"))
        os.symlink(prepared_venvs_dir(), os.path.join(path, ".prepared-venvs"))
        _working.append(path)
    return _working[0]


class SRIDaemonCase(ServerlessCase):
    """A serverless daemon, our connector in process and the fake Dify inner API, all on loopback."""

    timeout = 600

    async def database_environment(self) -> dict:
        """The daemon's database variables (SQLite under the test's directory by default)."""
        return {}

    def connector_environment(self, daemon_url: str) -> dict:
        """What ``dify-sri`` reads: an operator's environment on loopback, functions calling back to ``daemon_url``."""
        self.connector_port = free_port("127.0.0.1", set())
        environ = dict(os.environ)
        environ.update({
            "SRI_API_KEY": CONNECTOR_KEY,
            "SRI_HOST": "127.0.0.1",
            "SRI_PORT": str(self.connector_port),
            "SRI_WORKING_PATH": shared_working_path(),
            "SRI_DAEMON_URL": daemon_url,
            "PYTHON_INTERPRETER_PATH": python312(),
            "PIP_VERBOSE": "false",
            # the OpenAI plugin's tokenizer files, without the internet
            "TIKTOKEN_CACHE_DIR": tiktoken_cache_dir(),
            "PLUGIN_ENV_PASSTHROUGH": "TIKTOKEN_CACHE_DIR",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        })
        return environ

    async def start_connector(self, daemon_url: str) -> None:
        """Start ``dify-sri`` (stopped at clean-up) and wait for the functions of earlier tests to be back."""
        options = Options()
        options.parseOptions(["--env-file", os.path.join(self.workdir, "missing.env")])
        self.sri = makeService(options, reactor, self.connector_environment(daemon_url))
        self.sri.startService()
        self.addCleanup(self.stop_connector)
        await self.sri.restored

    async def stop_connector(self) -> None:
        if self.sri.running:
            await self.sri.stopService()

    async def start_serverless(self, **environ) -> None:
        """The inner API, our connector, then the daemon (whose start pings the connector)."""
        self.dify = FakeDifyInnerAPI(reactor, INNER_KEY)
        inner_port = await self.dify.listen()
        self.addCleanup(self.dify.stop)
        database = await self.database_environment()
        variables = self.daemon_environment(
            PLATFORM="serverless",
            DIFY_INNER_API_URL=base_url(inner_port),
            DIFY_INNER_API_KEY=INNER_KEY,
            ADMIN_API_ENABLED="true",
            ADMIN_API_KEY=ADMIN_KEY,
            DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY=CONNECTOR_KEY,
            **database,
            **environ,
        )
        await self.start_connector(f"http://127.0.0.1:{self.port}")
        variables["DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL"] = f"http://127.0.0.1:{self.connector_port}"
        self.service = tap.build_daemon(reactor, load_config(variables))
        self.service.startService()
        self.addCleanup(self._stop)
        await self.service.ready
        self.http = http_client(self, reactor)

    async def install_ok(self, package: bytes) -> str:
        identifier = await self.install(package)
        self.assertEqual(self.task["status"], "success", self.task)
        return identifier

    async def installation_id(self, plugin_id: str) -> str:
        code, reply = await self.call("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=50")
        [installation] = [i for i in orjson.loads(reply)["data"]["list"] if i["plugin_id"] == plugin_id]
        return installation["id"]


class _Scenarios:
    """What a user does with a serverless daemon and our connector; run on each database."""

    async def test_tools(self):
        """Install launches on dify-sri; text, 1000 chunks, a blob, a failing tool, storage, a tool and an LLM called back through Dify."""
        await self.start_serverless()
        identifier = await self.install_ok(TOOLS)
        function = self.sri.table.get(TOOLS_FILENAME)
        self.assertIsNotNone(function, list(f.spec.filename for f in self.sri.table.functions()))
        row = await self.service.persistence.get_serverless_runtime(identifier)
        self.assertEqual((row.function_url, row.function_name), (function.spec.endpoint, function.spec.name))

        await self.assert_tools_work()

        items = sse_items(await self.tool("blob", {"size": "20000"}))
        self.assertTrue(all(i["code"] == 0 for i in items), items[-1])
        pieces = [i["data"]["message"] for i in items if i["data"]["type"] == "blob_chunk"]
        blob = b"".join(base64.b64decode(piece["blob"]) for piece in pieces if not piece["end"])
        self.assertEqual(blob, (b"0123456789" * 2000)[:20000])

        answer = texts(await self.tool("call_llm", {"text": "say hi"}))
        self.assertEqual(answer[-1], "done", answer)
        self.assertGreater(len(answer), 2)
        llm_call = [r for r in self.dify.received if r.path == "invoke/llm"][-1]
        self.assertEqual(llm_call.body["prompt_messages"][0]["content"], "say hi")
        self.assertEqual(len(self.service.serverless.sessions), 0)

    async def test_llm_model_plugin(self):
        """The official OpenAI model plugin as a dify-sri function streams an LLM answer from the fake OpenAI server."""
        server = FakeOpenAIServer(reactor, api_key="sk-test", chunk_count=5)
        listening = listen(reactor, server)
        self.addCleanup(listening.stop)
        await self.start_serverless()
        with open(OPENAI_PACKAGE, "rb") as f:
            await self.install_ok(f.read())
        code, body = await self.call(
            "POST",
            f"/plugin/{TENANT}/dispatch/llm/invoke",
            {"user_id": "u1", "data": {
                "provider": "openai", "model": "gpt-3.5-turbo", "model_type": "llm",
                "credentials": {"openai_api_key": "sk-test", "openai_api_base": listening.base_url},
                "prompt_messages": [{"role": "user", "content": "Hello, world!"}],
                "model_parameters": {"temperature": 0.5}, "stop": [], "tools": [], "stream": True,
            }},
            {"X-Plugin-ID": "langgenius/openai"},
        )
        self.assertEqual(code, 200, body)
        items = sse_items(body)
        self.assertTrue(all(i["code"] == 0 for i in items), items[-1])
        text = "".join(i["data"]["delta"]["message"]["content"] for i in items)
        self.assertEqual(text, full_text(5))
        self.assertEqual(items[-1]["data"]["delta"]["finish_reason"], "stop")
        [request] = server.requests
        self.assertEqual(request.body["messages"], [{"role": "user", "content": "Hello, world!"}])

    async def test_endpoint(self):
        """An endpoint plugin deployed on dify-sri answers a public /e/ call with its decrypted settings."""
        await self.start_serverless()
        identifier = await self.install_ok(build_package(endpoint_plugin_files()))
        await self.assert_endpoint_serves(identifier)

    async def test_uninstall_removes_the_function(self):
        """Uninstalling the last installation of a package asks dify-sri to remove its function, which stops."""
        await self.start_serverless()
        package = build_package(echo_plugin_files(name="leaving"))
        filename = sri_client.package_filename(package, name="leaving")
        await self.install_ok(package)
        function = self.sri.table.get(filename)
        self.assertIsNotNone(function)
        pid = function.pid
        code, reply = await self.call(
            "POST", f"/plugin/{TENANT}/management/uninstall",
            {"plugin_installation_id": await self.installation_id("acme/leaving")},
        )
        self.assertEqual(orjson.loads(reply)["data"], True, reply)
        await wait_until(lambda: self.sri.table.get(filename) is None, "the function is removed")
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)


class SQLiteTests(_Scenarios, SRIDaemonCase):
    """On the embedded SQLite database."""


class PostgresTests(_Scenarios, SRIDaemonCase):
    """On PostgreSQL, a database of the test's own."""

    async def database_environment(self) -> dict:
        return await fresh_database(self, "difydaemon_sri_e2e_")


class FaultTests(SRIDaemonCase):
    """What goes wrong between the daemon, dify-sri and its functions."""

    async def test_connector_down_during_install(self):
        """A connector that went away after the daemon started fails the install task, which says why."""
        await self.start_serverless()
        await self.sri.stopService()
        await self.install(TOOLS)
        self.assertEqual(self.task["status"], "failed", self.task)
        message = self.task["plugins"][0]["message"]
        self.assertIn("connector", message)
        self.assertIn("refused", message.lower())

    async def test_function_killed_mid_stream(self):
        """A function killed mid-stream ends the call with an error envelope; once dify-sri restarted it, the next call works."""
        await self.start_serverless()
        await self.install_ok(TOOLS)
        function = self.sri.table.get(TOOLS_FILENAME)
        response = await self.http.post(
            self.url(f"/plugin/{TENANT}/dispatch/tool/invoke"),
            data=orjson.dumps({"user_id": "u1", "data": {
                "provider": "echo", "tool": "sleep", "tool_parameters": {"seconds": "60"}, "credentials": {}}}),
            headers={"X-Api-Key": KEY, "X-Plugin-ID": "acme/echo",
                     "Content-Type": "application/json"},
            unbuffered=True,
        )
        received: list[bytes] = []
        first: Deferred = Deferred()

        def chunk(data: bytes) -> None:
            received.append(data)
            if b"sleeping" in b"".join(received) and not first.called:
                first.callback(None)

        reading = treq.collect(response, chunk)
        await first
        restarts = function.restarts
        os.kill(function.pid, signal.SIGKILL)
        await reading
        items = sse_items(b"".join(received))
        self.assertEqual(items[0]["data"]["message"]["text"], "sleeping")
        self.assertEqual(items[-1]["code"], -500, items[-1])

        await wait_until(lambda: function.restarts > restarts and function.state == "running", "the function is back")
        self.assertEqual(texts(await self.tool("echo", {"text": "back"})), ["back"])

    async def test_502_once_is_retried(self):
        """A gateway in front of a dify-sri function answering 502 once is retried, and the call succeeds."""
        await self.start_serverless()
        identifier = await self.install_ok(TOOLS)
        function = self.sri.table.get(TOOLS_FILENAME)
        gateway, code, body = await self.put_gateway_in_front(identifier, function.spec.name, function.spec.port)
        self.assertEqual(code, 200, body)
        self.assertEqual(texts(await self.tool("echo", {"text": "retried"})), ["retried"])
        self.assertEqual(gateway.requests, 2)
