"""
Plugin endpoints end to end: the whole daemon on the real reactor, a real
SDK endpoint plugin in a real uv venv, the fake Dify inner API on a real
port encrypting the settings, and real HTTP calls to ``/e/<hook_id>/...``.
"""

from __future__ import annotations

import hashlib
import os

import orjson
from twisted.web.iweb import UNKNOWN_LENGTH

from difydaemon.testing.endpoint_plugin import endpoint_plugin_files
from difydaemon.testing.inner_api import FakeDifyInnerAPI, base_url
from tests.test_end_to_end import TENANT, DaemonCase

INNER_KEY = "inner-api-key"


class EndpointEndToEndTests(DaemonCase):
    """A real endpoint plugin answers public HTTP calls through the daemon."""

    async def start_with_plugin(self):
        from twisted.internet import reactor

        self.dify = FakeDifyInnerAPI(reactor, INNER_KEY)
        port = await self.dify.listen()
        self.addCleanup(self.dify.stop)
        await self._start(DIFY_INNER_API_URL=base_url(port), DIFY_INNER_API_KEY=INNER_KEY)
        self.identifier = await self.install(endpoint_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)

    async def ok(self, method, path, body=None, **query):
        """A management call that must succeed; its data."""
        if query:
            path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        code, reply = await self.call(method, path, body)
        envelope = orjson.loads(reply)
        self.assertEqual((code, envelope["code"]), (200, 0), envelope)
        return envelope["data"]

    async def public(self, method, path, body=None, headers=None):
        """A call to /e/ without any key; (response, body)."""
        response = await self.http.request(method, self.url(path), data=body, headers=headers or {})
        return response, await response.content()

    async def test_endpoint_calls(self):
        """Setup, then GET with path and query, POST JSON, a 3 MiB body, a stream, a custom status, disable."""
        await self.start_with_plugin()
        settings = {"api_key": "supersecret", "greeting": "hello"}
        created = await self.ok(
            "POST", f"/plugin/{TENANT}/endpoint/setup",
            {"plugin_unique_identifier": self.identifier, "user_id": "u1", "name": "hook", "settings": settings},
        )
        self.assertIs(created, True)
        [endpoint] = await self.ok("GET", f"/plugin/{TENANT}/endpoint/list", page=1, page_size=10, user_id="u1")
        self.assertEqual(endpoint["settings"], {"api_key": "su*******et", "greeting": "hello"})
        self.assertEqual(endpoint["plugin_id"], "acme/hooks")
        stored = await self.service.persistence.get_endpoint(TENANT, endpoint["id"])
        self.assertEqual(stored.settings["api_key"], "enc:supersecret")
        hook = endpoint["hook_id"]

        response, body = await self.public(
            "GET", f"/e/{hook}/echo/some/deep%20path?b=2&a=1&a=0", headers={"X-Forwarded-For": "10.1.2.3"}
        )
        self.assertEqual(response.code, 200, body)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        echoed = orjson.loads(body)
        self.assertEqual(echoed["method"], "GET")
        self.assertEqual(echoed["path"], "/echo/some/deep path")
        self.assertEqual(echoed["rest"], "some/deep path")
        self.assertEqual(echoed["query"], {"a": ["1", "0"], "b": ["2"]})
        self.assertEqual(echoed["hook_id"], hook)
        self.assertEqual(echoed["hook_url"], f"http://127.0.0.1:{self.port}/e/{hook}/echo/some/deep path")
        self.assertEqual(echoed["host"], f"127.0.0.1:{self.port}")
        self.assertIsNone(echoed["forwarded_for"])
        self.assertEqual(echoed["settings"], {"api_key": "supersecret", "greeting": "hello"})

        response, body = await self.public(
            "POST", f"/e/{hook}/json", orjson.dumps({"items": [1, 2, 3], "name": "ünïcode"}),
            {"Content-Type": "application/json"},
        )
        self.assertEqual(response.code, 201, body)
        self.assertEqual(orjson.loads(body), {"received": {"items": [1, 2, 3], "name": "ünïcode"}, "greeting": "hello"})

        large = os.urandom(3 * 1024 * 1024)
        response, body = await self.public(
            "POST", f"/e/{hook}/hash", large, {"Content-Type": "application/octet-stream"}
        )
        self.assertEqual(response.code, 200, body[:500])
        self.assertEqual(orjson.loads(body), {"sha256": hashlib.sha256(large).hexdigest(), "length": len(large)})

        response, body = await self.public("GET", f"/e/{hook}/stream?count=200")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, UNKNOWN_LENGTH)  # streamed (chunked), not buffered
        self.assertEqual(body, b"".join(f"line-{i}\n".encode() for i in range(200)))

        response, body = await self.public("GET", f"/e/{hook}/custom")
        self.assertEqual((response.code, body), (418, b"teapot"))
        self.assertEqual(response.headers.getRawHeaders("x-custom"), ["yes"])
        response, body = await self.public("HEAD", f"/e/{hook}/custom")
        self.assertEqual((response.code, body), (418, b""))

        response, body = await self.public("GET", f"/e/{hook}/no/such/route")
        self.assertEqual(response.code, 404)
        self.assertIn(b"Failed to dispatch endpoint request", body)

        await self.ok("POST", f"/plugin/{TENANT}/endpoint/disable", {"endpoint_id": endpoint["id"]})
        response, body = await self.public("GET", f"/e/{hook}/custom")
        self.assertEqual(response.code, 404)
        self.assertEqual(orjson.loads(body)["code"], -404)
        await self.ok("POST", f"/plugin/{TENANT}/endpoint/enable", {"endpoint_id": endpoint["id"]})
        response, body = await self.public("GET", f"/e/{hook}/custom")
        self.assertEqual(response.code, 418)

        response, body = await self.public("GET", "/e/abcdefghijklmnop/custom")
        self.assertEqual(response.code, 404)
        self.assertEqual(orjson.loads(body)["code"], -400)

    async def test_update_keeps_secret(self):
        """Updating with the masked secret keeps it: the plugin still sees the original."""
        await self.start_with_plugin()
        await self.ok(
            "POST", f"/plugin/{TENANT}/endpoint/setup",
            {"plugin_unique_identifier": self.identifier, "user_id": "u1", "name": "hook",
             "settings": {"api_key": "supersecret", "greeting": "hello"}},
        )
        [endpoint] = await self.ok("GET", f"/plugin/{TENANT}/endpoint/list/plugin",
                                   plugin_id="acme/hooks", page=1, page_size=10)
        await self.ok(
            "POST", f"/plugin/{TENANT}/endpoint/update",
            {"endpoint_id": endpoint["id"], "user_id": "u1", "name": "renamed",
             "settings": {"api_key": endpoint["settings"]["api_key"], "greeting": "bye", "mode": "loud"}},
        )
        response, body = await self.public("GET", f"/e/{endpoint['hook_id']}/echo/x")
        self.assertEqual(orjson.loads(body)["settings"], {"api_key": "supersecret", "greeting": "bye", "mode": "loud"})
        await self.ok("POST", f"/plugin/{TENANT}/endpoint/remove", {"endpoint_id": endpoint["id"], "user_id": "u1"})
        response, _ = await self.public("GET", f"/e/{endpoint['hook_id']}/echo/x")
        self.assertEqual(response.code, 404)
        [installation] = (await self.ok("GET", f"/plugin/{TENANT}/management/list", page=1, page_size=10))["list"]
        self.assertEqual((installation["endpoints_setups"], installation["endpoints_active"]), (0, 0))
