"""Tests for difydaemon.api.admin: the serverless admin routes (serverless.md §6)."""

from __future__ import annotations

import orjson
from treq.testing import StubTreq
from twisted.internet.task import Clock

from difydaemon.api.admin import REINSTALLED_MESSAGE, AdminAPI
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.runtimes.serverless.connector import FunctionInfo, SRIClient
from difydaemon.runtimes.serverless.invoke import InvokeClient
from difydaemon.runtimes.serverless.runtime import ServerlessRuntimeFactory
from difydaemon.runtimes.serverless.sessions import MemoryServerlessSessions
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.sri import FakeSRIConnector, scripted

KEY = "admin-key-0123456789"
IDENTIFIER = "acme/echo:0.0.1@" + "a" * 64
DECLARATION = {"author": "acme", "name": "echo", "version": "0.0.1", "verified": True}


class _Packages:
    async def declaration(self, identifier):
        return DECLARATION if identifier == IDENTIFIER else None

    async def package_bytes(self, identifier):
        return b"package"


class _Registry:
    def __init__(self, runtime=None):
        self.runtime = runtime

    def get(self, identifier):
        return self.runtime


class AdminTests(SynchronousTestCase):
    """Key check, switch-endpoint and reinstall."""

    def setUp(self):
        self.clock = Clock()
        self.persistence = MemoryPersistence(self.clock)
        self.connector = FakeSRIConnector(self.clock, "ck")
        connector_stub = StubTreq(self.connector.resource())
        self.connector_stub = connector_stub
        self.factory = ServerlessRuntimeFactory(
            self.clock, self.persistence, SRIClient(self.clock, connector_stub, "http://c", "ck"),
            InvokeClient(self.clock, connector_stub), MemoryServerlessSessions(self.clock),
        )
        self.runtime = self.factory.runtime(IDENTIFIER, DECLARATION, FunctionInfo("old", "http://old"))
        self.api = AdminAPI(KEY, self.persistence, _Packages(), _Registry(self.runtime), self.factory)
        self.stub = StubTreq(self.api.resource())

    def post(self, route: str, body: dict, key: str = KEY):
        d = self.stub.post(
            f"http://daemon/admin/plugin/serverless/{route}", data=orjson.dumps(body),
            headers={"X-Admin-Api-Key": key, "Content-Type": "application/json"},
        )
        for _ in range(3):
            self.stub.flush()
            self.connector_stub.flush()
        response = self.successResultOf(d)
        content = self.stub.content(response)
        self.stub.flush()
        return response.code, self.successResultOf(content)

    def test_wrong_key(self):
        """A wrong X-Admin-Api-Key answers the 401 envelope and changes nothing."""
        code, body = self.post("switch-endpoint", {}, key="nope")
        self.assertEqual(code, 401)
        answer = orjson.loads(body)
        self.assertNotEqual(answer["code"], 0)
        self.assertIn("unauthorized", answer["message"])

    def test_switch_endpoint(self):
        """Switching records the new function and points the live runtime at it."""
        self.successResultOf(self.persistence.upsert_serverless_runtime(IDENTIFIER, "http://old", "old", "a" * 64))
        code, body = self.post(
            "switch-endpoint",
            {"plugin_unique_identifier": IDENTIFIER, "function_name": "new", "function_url": "http://new"},
        )
        self.assertEqual((code, orjson.loads(body)["data"]), (200, True))
        row = self.successResultOf(self.persistence.get_serverless_runtime(IDENTIFIER))
        self.assertEqual((row.function_name, row.function_url), ("new", "http://new"))
        self.assertEqual(self.runtime.function, FunctionInfo("new", "http://new"))

    def test_switch_unknown(self):
        """Switching an identifier without a function row is an error envelope."""
        code, body = self.post(
            "switch-endpoint", {"plugin_unique_identifier": IDENTIFIER, "function_name": "n", "function_url": "u"}
        )
        self.assertNotEqual(orjson.loads(body)["code"], 0)

    def test_reinstall(self):
        """Reinstall launches again without looking for an existing function and streams done."""
        self.connector.functions["acme@echo@0.0.1@" + "a" * 64 + ".difypkg"] = FunctionInfo("old", "http://old")
        code, body = self.post("reinstall", {"plugin_unique_identifier": IDENTIFIER})
        self.assertEqual(len(self.connector.launches), 1)
        self.assertEqual(self.connector.launches[0].verified, "true")
        items = [orjson.loads(line[len(b"data: "):]) for line in body.split(b"\n\n") if line]
        self.assertEqual(items[-1]["data"], {"event": "done", "data": REINSTALLED_MESSAGE})
        self.assertNotEqual(self.runtime.function.name, "old")

    def test_reinstall_failure(self):
        """A failed rebuild streams an error item with the connector's message."""
        self.connector.launcher = scripted([b'{"Stage":"build","State":"failed","Message":"disk full"}'])
        code, body = self.post("reinstall", {"plugin_unique_identifier": IDENTIFIER})
        items = [orjson.loads(line[len(b"data: "):]) for line in body.split(b"\n\n") if line]
        self.assertEqual(items[-1]["data"]["event"], "error")
        self.assertIn("disk full", items[-1]["data"]["data"])

    def test_local_platform(self):
        """Without the serverless platform both routes answer an error envelope."""
        api = AdminAPI(KEY, self.persistence, _Packages(), _Registry(), None)
        self.stub = StubTreq(api.resource())
        for route in ("reinstall", "switch-endpoint"):
            code, body = self.post(route, {"plugin_unique_identifier": IDENTIFIER})
            self.assertIn("PLATFORM=serverless", orjson.loads(body)["message"])
