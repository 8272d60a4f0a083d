"""
Tests for the remote debugging key: the route ``POST
/plugin/<tenant_id>/debugging/key`` (``http-api.md`` §2.7) and the
:class:`~difydaemon.management.debugging.DebuggingKeys` behind it.
"""

from __future__ import annotations

import uuid

import orjson
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from difydaemon.api.management import ManagementAPI
from difydaemon.management.debugging import DebuggingKeys
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.testing.cases import SynchronousTestCase
from tests.runtimes.test_debug import RecordingPersistence

TENANT = "0193a8a4-0000-7000-8000-000000000001"
OTHER_TENANT = "0193a8a4-0000-7000-8000-000000000002"
BASE = "http://daemon.test"


class KeyRouteTests(SynchronousTestCase):
    """The key route."""

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.persistence = MemoryPersistence(self.clock)
        self.keys = DebuggingKeys(self.clock, self.persistence)
        self.treq = StubTreq(ManagementAPI(None, None, self.persistence, debugging=self.keys).resource())

    def post(self, tenant_id=TENANT, treq=None):
        treq = treq or self.treq
        d = treq.post(f"{BASE}/plugin/{tenant_id}/debugging/key")
        treq.flush()
        response = self.successResultOf(d)
        body = treq.content(response)
        treq.flush()
        return response.code, orjson.loads(self.successResultOf(body))

    def tenant_of(self, key):
        return self.successResultOf(self.keys.tenant_of(key))

    def test_key(self):
        """The answer is a uuid4 key in the success envelope, HTTP 200."""
        code, body = self.post()
        self.assertEqual(code, 200)
        self.assertEqual((body["code"], body["message"]), (0, "success"))
        self.assertEqual(list(body["data"]), ["key"])
        self.assertEqual(uuid.UUID(body["data"]["key"]).version, 4)
        self.assertEqual(self.tenant_of(body["data"]["key"]), TENANT)

    def test_same_key_each_time(self):
        """Asking again gives the same key; another tenant gets its own."""
        _, first = self.post()
        _, again = self.post()
        _, other = self.post(OTHER_TENANT)
        self.assertEqual(first["data"]["key"], again["data"]["key"])
        self.assertNotEqual(first["data"]["key"], other["data"]["key"])
        self.assertEqual(self.tenant_of(other["data"]["key"]), OTHER_TENANT)

    def test_refreshed_by_asking(self):
        """Each request moves the expiry two hours ahead; using the key does not."""
        _, body = self.post()
        key = body["data"]["key"]
        self.clock.advance(5400)
        self.post()
        self.clock.advance(5400)
        self.assertEqual(self.tenant_of(key), TENANT)
        self.clock.advance(1801)
        self.assertIsNone(self.tenant_of(key))

    def test_expired_key_replaced(self):
        """After two hours without a request the key is dead and the next request makes a new one."""
        _, body = self.post()
        self.clock.advance(7201)
        _, renewed = self.post()
        self.assertNotEqual(renewed["data"]["key"], body["data"]["key"])
        self.assertIsNone(self.tenant_of(body["data"]["key"]))
        self.assertEqual(self.tenant_of(renewed["data"]["key"]), TENANT)

    def test_disabled(self):
        """Without remote debugging the route is unknown (404 envelope)."""
        treq = StubTreq(ManagementAPI(None, None, self.persistence).resource())
        code, body = self.post(treq=treq)
        self.assertEqual(code, 404)
        self.assertEqual(body["code"], "not_found")

    def test_get_not_allowed(self):
        """Only POST is routed."""
        d = self.treq.get(f"{BASE}/plugin/{TENANT}/debugging/key")
        self.treq.flush()
        self.assertEqual(self.successResultOf(d).code, 404)


class DebuggingKeysTests(SynchronousTestCase):
    """The key service's memory in front of the database."""

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.memory = MemoryPersistence(self.clock)
        self.persistence = RecordingPersistence(self.memory)
        self.keys = DebuggingKeys(self.clock, self.persistence)

    def key_for(self, keys, tenant_id=TENANT):
        return self.successResultOf(Deferred.fromCoroutine(keys.key_for(tenant_id)))

    def test_known_key_from_memory(self):
        """A key this process handed out is resolved without a lookup."""
        key = self.key_for(self.keys)
        self.persistence.calls.clear()
        for _ in range(3):
            self.assertEqual(self.successResultOf(self.keys.tenant_of(key)), TENANT)
        self.assertEqual(self.persistence.calls, [])

    def test_foreign_key_looked_up_once(self):
        """A key from another replica is looked up once, then remembered."""
        key = self.key_for(DebuggingKeys(self.clock, self.memory))
        for _ in range(3):
            self.assertEqual(self.successResultOf(self.keys.tenant_of(key)), TENANT)
        self.assertEqual(self.persistence.calls, ["get_debugging_key"])

    def test_not_a_uuid(self):
        """Garbage keys are refused without a lookup."""
        for key in ("", "x" * 10000, "'; DROP TABLE debugging_keys; --"):
            self.assertIsNone(self.successResultOf(self.keys.tenant_of(key)))
        self.assertEqual(self.persistence.calls, [])

    def test_unknown_uuid(self):
        """An unknown UUID costs one lookup per handshake."""
        key = str(uuid.uuid4())
        self.assertIsNone(self.successResultOf(self.keys.tenant_of(key)))
        self.assertEqual(self.persistence.calls, ["get_debugging_key"])

    def test_refresh_seen_by_memory(self):
        """A refresh through the service extends what memory trusts."""
        key = self.key_for(self.keys)
        self.clock.advance(7000)
        self.key_for(self.keys)
        self.clock.advance(7000)
        self.persistence.calls.clear()
        self.assertEqual(self.successResultOf(self.keys.tenant_of(key)), TENANT)
        self.assertEqual(self.persistence.calls, [])

    def test_expiry_in_memory(self):
        """A remembered key stops working at its expiry."""
        key = self.key_for(self.keys)
        self.clock.advance(7200)
        self.assertIsNone(self.successResultOf(self.keys.tenant_of(key)))
