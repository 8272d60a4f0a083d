"""
The serverless platform end to end: the whole daemon on SQLite with
``PLATFORM=serverless``, the fake SRI connector on a real port, and real SDK
plugins running as serverless functions (``INSTALL_METHOD=serverless``) in
real uv venvs on loopback, calling back through
``/backwards-invocation/transaction`` into the fake Dify inner API.
"""

from __future__ import annotations

import os

import orjson
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import Site

from difydaemon import tap
from difydaemon.config import load_config
from difydaemon.runtimes.serverless.connector import ConnectorError
from difydaemon.testing.endpoint_plugin import endpoint_plugin_files
from difydaemon.testing.http import http_client
from difydaemon.testing.inner_api import FakeDifyInnerAPI, base_url
from difydaemon.testing.plugins import serverless_plugin_files
from difydaemon.testing.serverless import SDKFunctionLauncher
from difydaemon.testing.sri import FakeSRIConnector
from tests.test_backwards_end_to_end import TOOL_AND_LLM, texts
from tests.test_end_to_end import TENANT, DaemonCase, sse_items

CONNECTOR_KEY = "connector-key"
INNER_KEY = "inner-api-key"
ADMIN_KEY = "admin-key-0123456789"


class _FailOnce(Resource):
    """A gateway in front of a function: the first request answers 502, the others go through."""

    isLeaf = True

    def __init__(self, port: int) -> None:
        super().__init__()
        self.requests = 0
        self._port = port

    def render(self, request):
        self.requests += 1
        if self.requests == 1:
            request.setResponseCode(502)
            return b"bad gateway"
        return ReverseProxyResource("127.0.0.1", self._port, request.path).render(request)


class ServerlessCase(DaemonCase):
    """A serverless daemon, a fake connector and real SDK functions (built once per class)."""

    launcher: SDKFunctionLauncher | None = None

    @classmethod
    def _launcher(cls) -> SDKFunctionLauncher:
        if cls.launcher is None:
            workdir = os.path.abspath(f"serverless-functions-{cls.__name__}")
            os.makedirs(workdir, exist_ok=True)
            cls.launcher = SDKFunctionLauncher(reactor, workdir, "")
        return cls.launcher

    async def start_serverless(self, **environ):
        self.dify = FakeDifyInnerAPI(reactor, INNER_KEY)
        inner_port = await self.dify.listen()
        self.addCleanup(self.dify.stop)
        launcher = self._launcher()
        self.addCleanup(launcher.stop_all)
        self.connector = FakeSRIConnector(reactor, CONNECTOR_KEY, launcher)
        connector_port = await self.connector.listen()
        self.addCleanup(self.connector.stop)
        variables = {
            "PLATFORM": "serverless",
            "DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL": base_url(connector_port),
            "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY": CONNECTOR_KEY,
            "DIFY_INNER_API_URL": base_url(inner_port),
            "DIFY_INNER_API_KEY": INNER_KEY,
            "ADMIN_API_ENABLED": "true",
            "ADMIN_API_KEY": ADMIN_KEY,
        }
        variables.update(environ)
        config_environ = self.daemon_environment(**variables)
        launcher.daemon_url = f"http://127.0.0.1:{self.port}"
        self.service = tap.build_daemon(reactor, load_config(config_environ))
        self.service.startService()
        self.addCleanup(self._stop)
        await self.service.ready
        self.http = http_client(self, reactor)

    async def install_function(self):
        identifier = await self.install(serverless_plugin_files(TOOL_AND_LLM))
        self.assertEqual(self.task["status"], "success", self.task)
        return identifier

    async def assert_tools_work(self) -> None:
        """The serverless plugin's tools through the daemon: text, 1000 chunks, a failing tool, storage, a tool called back through Dify."""
        self.assertEqual(texts(await self.tool("echo", {"text": "hi"})), ["hi"])
        items = sse_items(await self.tool("stream", {"count": "1000"}))
        self.assertEqual([i["data"]["message"]["text"] for i in items], [f"chunk-{i}" for i in range(1000)])

        items = sse_items(await self.tool("fail", {}))
        self.assertEqual(items[-1]["code"], -500)
        outer = orjson.loads(items[-1]["message"])
        inner = orjson.loads(outer["message"])
        self.assertEqual((inner["error_type"], inner["message"]), ("ValueError", "planned failure"))

        self.assertEqual(texts(await self.tool("kv", {"op": "set", "key": "greeting", "text": "hello"})), ["set"])
        self.assertEqual(texts(await self.tool("kv", {"op": "get", "key": "greeting"})), ["hello"])

        answer = texts(await self.tool("call_tool", {"provider": "time", "tool": "now", "text": "hello"}))
        self.assertIn("hello", "".join(answer))
        call = [r for r in self.dify.received if r.path == "invoke/tool"][-1]
        self.assertEqual((call.body["tenant_id"], call.body["user_id"]), (TENANT, "u1"))

    async def assert_endpoint_serves(self, identifier: str) -> None:
        """Set an endpoint of ``identifier`` up and check that a public /e/ call reaches it with its decrypted settings."""
        code, reply = await self.call(
            "POST",
            f"/plugin/{TENANT}/endpoint/setup",
            {"plugin_unique_identifier": identifier, "user_id": "u1", "name": "hook",
             "settings": {"api_key": "supersecret", "greeting": "hello"}},
        )
        self.assertEqual(orjson.loads(reply)["code"], 0, reply)
        code, reply = await self.call("GET", f"/plugin/{TENANT}/endpoint/list?page=1&page_size=10&user_id=u1")
        [endpoint] = orjson.loads(reply)["data"]
        response = await self.http.get(self.url(f"/e/{endpoint['hook_id']}/echo/x?a=1"))
        body = await response.content()
        self.assertEqual(response.code, 200, body)
        echoed = orjson.loads(body)
        self.assertEqual((echoed["method"], echoed["query"]), ("GET", {"a": ["1"]}))
        self.assertEqual(echoed["settings"], {"api_key": "supersecret", "greeting": "hello"})

    async def put_gateway_in_front(self, identifier: str, function_name: str, function_port: int):
        """
        Serve a :class:`_FailOnce` gateway in front of a function on loopback
        and repoint the identifier at it (``switch-endpoint``): (gateway,
        the admin call's status, its body).
        """
        gateway = _FailOnce(function_port)
        site = Site(gateway)
        site.log = lambda request: None
        listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        code, body = await self.admin(
            "switch-endpoint",
            {"plugin_unique_identifier": identifier, "function_name": function_name,
             "function_url": f"http://127.0.0.1:{listening.getHost().port}"},
        )
        return gateway, code, body

    async def admin(self, route: str, body: dict):
        response = await self.http.post(
            self.url(f"/admin/plugin/serverless/{route}"),
            data=orjson.dumps(body),
            headers={"X-Admin-Api-Key": ADMIN_KEY, "Content-Type": "application/json"},
        )
        return response.code, await response.content()


class ServerlessEndToEndTests(ServerlessCase):
    """Install and invoke real functions through the daemon."""

    async def test_install_and_invoke(self):
        """Install launches a function; text, 1000 chunks, a failing tool, storage and a tool call back through Dify work."""
        await self.start_serverless()
        identifier = await self.install_function()
        self.assertEqual(len(self.connector.launches), 1)
        row = await self.service.persistence.get_serverless_runtime(identifier)
        self.assertEqual(row.function_url, self.connector.functions[self.connector.launches[0].filename].url)

        await self.assert_tools_work()
        # every session was forgotten when it ended
        self.assertEqual(len(self.service.serverless.sessions), 0)

    async def test_function_killed_mid_stream_then_switched(self):
        """A function killed mid-stream ends the call with an error envelope; switching to a new function heals it."""
        await self.start_serverless()
        await self.install_function()
        name = self.connector.launches and next(iter(self.connector.functions.values())).name
        process = self._launcher().processes[name]
        calling = Deferred.fromCoroutine(self.tool("sleep", {"seconds": "60"}))
        while b"sleeping" not in process.output and not calling.called:
            await _pause()
        # the SDK logs its access line only at the end: wait for the first chunk on the wire instead
        await _pause(0.5)
        await process.kill()
        items = sse_items(await calling)
        self.assertEqual(items[0]["data"]["message"]["text"], "sleeping")
        self.assertEqual(items[-1]["code"], -500)
        self.assertIn("failed to read response body", items[-1]["message"])

        restarted = await self._launcher().restart(name)
        identifier = self.connector.launches[0].metadata["plugin_unique_identifier"]
        code, body = await self.admin(
            "switch-endpoint",
            {"plugin_unique_identifier": identifier, "function_name": name, "function_url": restarted.url},
        )
        self.assertEqual((code, orjson.loads(body)["data"]), (200, True), body)
        self.assertEqual(texts(await self.tool("echo", {"text": "back"})), ["back"])

    async def test_502_once_is_retried(self):
        """A gateway answering 502 once in front of the function is retried and the call succeeds."""
        await self.start_serverless()
        identifier = await self.install_function()
        function = next(iter(self.connector.functions.values()))
        gateway, code, body = await self.put_gateway_in_front(identifier, function.name, int(function.url.rsplit(":", 1)[1]))
        self.assertEqual(code, 200, body)
        self.assertEqual(texts(await self.tool("echo", {"text": "retried"})), ["retried"])
        self.assertEqual(gateway.requests, 2)

    async def test_connector_down_during_install(self):
        """A connector that goes away after start fails the install task, which says why."""
        await self.start_serverless()
        await self.connector.stop()
        await self.install(serverless_plugin_files(TOOL_AND_LLM))
        self.assertEqual(self.task["status"], "failed", self.task)
        message = self.task["plugins"][0]["message"]
        self.assertIn("connector", message)
        self.assertIn("refused", message.lower())


class ServerlessEndpointTests(ServerlessCase):
    """Public endpoints (/e/) work unchanged on a serverless function."""

    async def test_endpoint_call(self):
        """An endpoint plugin deployed as a function answers a public call with its decrypted settings."""
        await self.start_serverless()
        identifier = await self.install(endpoint_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)
        await self.assert_endpoint_serves(identifier)


class ServerlessStartTests(DaemonCase):
    """The connector must answer its ping for the daemon to start."""

    async def start_expecting_failure(self, **environ):
        config_environ = self.daemon_environment(PLATFORM="serverless", **environ)
        self.service = tap.build_daemon(reactor, load_config(config_environ))
        self.service.startService()
        self.addCleanup(self._stop)
        try:
            await self.service.ready
        except ConnectorError as exc:
            # the start's own log line said why
            self.assertEqual(len(self.flushLoggedErrors(ConnectorError)), 1)
            return exc
        self.fail("the daemon started")

    async def test_connector_down(self):
        """A connector nobody answers for stops the start, naming the ping."""
        error = await self.start_expecting_failure(
            DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL="http://127.0.0.1:1", DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY="k"
        )
        self.assertIn("connector POST ping failed", str(error))

    async def test_wrong_key(self):
        """A connector refusing the key stops the start, naming the key variable."""
        connector = FakeSRIConnector(reactor, CONNECTOR_KEY)
        port = await connector.listen()
        self.addCleanup(connector.stop)
        error = await self.start_expecting_failure(
            DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL=base_url(port), DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY="wrong"
        )
        self.assertIn("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY", str(error))


def _pause(seconds: float = 0.05) -> Deferred:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
