"""
Two replicas on ``PLATFORM=serverless`` sharing real PostgreSQL and a
Redis (a private ``redis-server`` the test stops), the fake SRI connector
on a real port and a real SDK function in a real uv venv: a function whose
``DIFY_PLUGIN_DAEMON_URL`` names replica B calls back there while the call
that opened its session came through replica A.
"""

from __future__ import annotations

import os

import orjson
from twisted.internet import reactor

from difydaemon.testing.inner_api import FakeDifyInnerAPI, base_url
from difydaemon.testing.plugins import serverless_plugin_files
from difydaemon.testing.redis import private_redis
from difydaemon.testing.serverless import SDKFunctionLauncher
from difydaemon.testing.sri import FakeSRIConnector
from tests.test_backwards_end_to_end import TOOL_AND_LLM, texts
from tests.test_cluster_end_to_end import ClusterCase
from tests.test_end_to_end import TENANT, sse_items
from tests.test_serverless_end_to_end import CONNECTOR_KEY, INNER_KEY


class ServerlessReplicasTests(ClusterCase):
    """Serverless callbacks are served by whichever replica they land on."""

    async def test_callback_on_another_replica(self):
        """A call through A whose function calls back to B is served (storage, a Dify tool call); with Redis down both fail at once with 'redis unavailable'."""
        redis = await private_redis(self, reactor)
        await self.cluster(redis_port=redis.port)
        dify = FakeDifyInnerAPI(reactor, INNER_KEY)
        inner_port = await dify.listen()
        self.addCleanup(dify.stop)
        workdir = os.path.abspath("serverless-functions-replicas")
        os.makedirs(workdir, exist_ok=True)
        launcher = SDKFunctionLauncher(reactor, workdir, "")
        self.addCleanup(launcher.stop_all)
        connector = FakeSRIConnector(reactor, CONNECTOR_KEY, launcher)
        connector_port = await connector.listen()
        self.addCleanup(connector.stop)
        self.shared.update(
            {
                "PLATFORM": "serverless",
                "DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL": base_url(connector_port),
                "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY": CONNECTOR_KEY,
                "DIFY_INNER_API_URL": base_url(inner_port),
                "DIFY_INNER_API_KEY": INNER_KEY,
            }
        )
        a = await self.start(self.replica("a"))
        b = await self.start(self.replica("b"))
        # the functions call back to B only
        launcher.daemon_url = b.url("")

        await self.install(a, serverless_plugin_files(TOOL_AND_LLM))
        code, body = await self.tool(a, "kv", {"op": "set", "key": "greeting", "text": "hello"})
        self.assertEqual(texts(body), ["set"])
        code, body = await self.tool(a, "kv", {"op": "get", "key": "greeting"})
        self.assertEqual(texts(body), ["hello"])
        code, body = await self.tool(a, "call_tool", {"provider": "time", "tool": "now", "text": "from b"})
        self.assertIn("from b", "".join(texts(body)))
        call = [r for r in dify.received if r.path == "invoke/tool"][-1]
        self.assertEqual((call.body["tenant_id"], call.body["user_id"]), (TENANT, "u1"))
        # every session was forgotten in Redis when its call ended
        connection = a.service.coordination.kv._connection
        self.assertEqual(await connection.execute("KEYS", "*serverless-session:*"), [])

        await redis.stop()
        # a dispatch cannot share its session: it fails before calling the function
        code, body = await self.tool(a, "kv", {"op": "get", "key": "greeting"})
        [item] = sse_items(body)
        self.assertEqual(item["code"], -500, item)
        self.assertIn("redis unavailable", item["message"])
        # a callback cannot find its session: a clear error at once
        response = await self.http.post(
            b.url("/backwards-invocation/transaction"),
            data=orjson.dumps({"event": "session", "session_id": "s-1",
                               "data": {"type": "invoke", "data": {"type": "storage", "backwards_request_id": "x",
                                                                  "request": {"opt": "get", "key": "k"}}}}),
            headers={"Dify-Plugin-Session-ID": "s-1"},
        )
        answer = orjson.loads(await response.content())
        self.assertEqual(response.code, 500, answer)
        self.assertIn("redis unavailable", answer["message"])
