"""Tests for difydaemon.api.transaction: POST /backwards-invocation/transaction (serverless.md §5)."""

from __future__ import annotations

import orjson
from treq.testing import StubTreq
from twisted.internet.defer import fail
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import Resource

from difydaemon.api.admission import FrontDoor, Refused
from difydaemon.api.transaction import TransactionResource
from difydaemon.errors import CoordinationUnavailableError
from difydaemon.invocation.dispatcher import BackwardsInvocations
from difydaemon.invocation.inner_api import DifyInnerAPI
from difydaemon.invocation.storage import PluginStorage
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.runtimes.serverless.sessions import MemoryServerlessSessions, ServerlessSession
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.inner_api import FakeDifyInnerAPI

SID = "0e8d1f9a-1111-4222-8333-444455556666"
URL = "http://daemon.test/backwards-invocation/transaction"
INNER_KEY = "inner-key"
PERMISSIONS = {"tool": {"enabled": True}, "storage": {"enabled": True, "size": 1024}}


def live_session(access_type: str = "tool", permission=PERMISSIONS) -> ServerlessSession:
    return ServerlessSession(
        tenant_id="tenant-1",
        user_id="user-1",
        plugin_id="acme/echo",
        plugin_unique_identifier="acme/echo:0.0.1@" + "a" * 64,
        access_type=access_type,
        declaration={"resource": {"permission": permission}},
        session_request={
            "session_id": SID, "conversation_id": "c", "message_id": None, "app_id": None,
            "endpoint_id": None, "context": {"k": 1}, "event": "request", "data": {},
        },
    )


def transaction(invoke_type: str, request: dict, session_id: str = SID, backwards_id: str = "b" * 32) -> bytes:
    """A transaction body as the SDK writes it."""
    event = {
        "event": "session",
        "session_id": session_id,
        "data": {"type": "invoke", "data": {"type": invoke_type, "backwards_request_id": backwards_id, "request": request}},
    }
    return orjson.dumps(event) + b"\n\n"


class TransactionTests(SynchronousTestCase):
    """The route's answers and refusals."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.sessions = MemoryServerlessSessions(self.reactor)
        self.persistence = MemoryPersistence(self.reactor)
        self.dify = FakeDifyInnerAPI(self.reactor, INNER_KEY)
        inner_api = DifyInnerAPI(self.reactor, StubTreq(self.dify.resource()), "http://dify.test", INNER_KEY,
                                 5.0, 240.0, 1 << 20)
        self.backwards = BackwardsInvocations(inner_api, PluginStorage(self.persistence, 1 << 20))
        self.resource = TransactionResource(self.reactor, self.sessions, self.backwards, timeout=300.0)
        root = Resource()
        root.putChild(b"backwards-invocation", self.resource)
        self.stub = StubTreq(root)
        self.successResultOf(self.sessions.register(live_session(), 1800))

    def post(self, body: bytes, session_header: str | None = SID):
        headers = {} if session_header is None else {b"Dify-Plugin-Session-ID": [session_header.encode()]}
        d = self.stub.post(URL, data=body, headers=headers)
        self.stub.flush()
        response = self.successResultOf(d)
        content = self.stub.content(response)
        self.stub.flush()
        return response, self.successResultOf(content)

    def items(self, body: bytes) -> list:
        return [orjson.loads(line) for line in body.split(b"\n\n") if line.strip()]

    def test_storage(self):
        """A storage set and get of a live session answer the §0.2 backwards_response stream, ending with end."""
        value = b"hello".hex()
        response, body = self.post(transaction("storage", {"opt": "set", "key": "k", "value": value}))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        first, end = self.items(body)
        self.assertEqual(first["event"], "backwards_response")
        self.assertEqual((first["session_id"], first["conversation_id"], first["context"]), (SID, "c", {"k": 1}))
        self.assertEqual(first["data"]["event"], "response")
        self.assertEqual(first["data"]["backwards_request_id"], "b" * 32)
        self.assertEqual(end["data"]["event"], "end")
        self.assertEqual(self.successResultOf(self.persistence.storage_get("tenant-1", "acme/echo", "k")), b"hello")

    def test_tool_through_inner_api(self):
        """A tool call goes to Dify's inner API with the session's tenant and user, and streams back."""
        response, body = self.post(
            transaction("tool", {"tool_type": "builtin", "provider": "p", "tool": "t", "tool_parameters": {"text": "x"}})
        )
        items = self.items(body)
        self.assertEqual(items[-1]["data"]["event"], "end")
        self.assertTrue(all(item["data"]["event"] == "response" for item in items[:-1]))
        [call] = [r for r in self.dify.received if r.path == "invoke/tool"]
        self.assertEqual((call.body["tenant_id"], call.body["user_id"]), ("tenant-1", "user-1"))

    def test_permission_denied(self):
        """A call the manifest does not allow answers error then end (200), as local plugins get."""
        self.successResultOf(self.sessions.register(live_session(permission={}), 1800))
        response, body = self.post(transaction("storage", {"opt": "get", "key": "k"}))
        self.assertEqual(response.code, 200)
        error, end = self.items(body)
        self.assertEqual(error["data"]["event"], "error")
        self.assertIn("permission denied", error["data"]["message"])
        self.assertEqual(end["data"]["event"], "end")

    def test_unknown_session(self):
        """A session that is not live is refused 400 with Go's SessionNotFound body."""
        other = "11111111-0000-4000-8000-000000000000"
        response, body = self.post(transaction("storage", {"opt": "get", "key": "k"}, session_id=other), other)
        self.assertEqual(response.code, 400)
        answer = orjson.loads(body)
        self.assertEqual(answer["data"]["error_type"], "SessionNotFound")
        self.assertEqual(answer["message"], "failed to get session info from cache")
        self.assertEqual(answer["backwards_request_id"], "b" * 32)

    def test_sessions_unavailable(self):
        """With Redis down the session lookup fails at once: 500 with the 'redis unavailable' envelope, no hang."""

        class Down:
            def lookup(self, session_id):
                return fail(CoordinationUnavailableError("connection refused"))

        self.resource._sessions = Down()
        response, body = self.post(transaction("storage", {"opt": "get", "key": "k"}))
        self.assertEqual(response.code, 500)
        answer = orjson.loads(body)
        self.assertEqual(answer["code"], -500)
        self.assertIn("redis unavailable: connection refused", answer["message"])
        self.assertEqual(self.dify.received, [])

    def test_header_must_match(self):
        """A live session named in the body but not in the header is refused."""
        for header in (None, "", "someone-else"):
            response, body = self.post(transaction("storage", {"opt": "get", "key": "k"}), header)
            self.assertEqual(response.code, 400, header)
            self.assertEqual(orjson.loads(body)["data"]["error_type"], "SessionNotFound")

    def test_expired_session(self):
        """A session past its ttl is no longer served."""
        self.reactor.advance(1800)
        response, _ = self.post(transaction("storage", {"opt": "get", "key": "k"}))
        self.assertEqual(response.code, 400)

    def test_malformed_bodies(self):
        """Bodies that are not a session event, or whose invoke lacks its fields, are refused 400 at once."""
        bodies = [
            b"not json",
            b"[]",
            b'{"event":"log","session_id":"x","data":{}}',
            b'{"event":"session","data":{"type":"invoke","data":{}}}',
            b'{"event":"session","session_id":"%s","data":"nope"}' % SID.encode(),
            b'{"event":"session","session_id":"%s","data":{"type":"invoke","data":{"type":"tool"}}}' % SID.encode(),
        ]
        for body in bodies:
            response, _ = self.post(body)
            self.assertEqual(response.code, 400, body)
        self.assertEqual(self.dify.received, [])

    def test_oversized_body(self):
        """A body over the route's limit is refused 413, nothing served."""
        self.resource.body_limit = 1000
        response, _ = self.post(transaction("storage", {"opt": "set", "key": "k", "value": "00" * 1000}))
        self.assertEqual(response.code, 413)
        self.assertIsNone(self.successResultOf(self.persistence.storage_get("tenant-1", "acme/echo", "k")))

    def test_keepalive_and_timeout(self):
        """A slow Dify call gets blank-line keep-alives every 25 s and ends with an error at the transaction timeout."""
        self.resource.timeout = 60.0
        self.dify.slow("invoke/tool", 1000.0)
        d = self.stub.post(URL, data=transaction("tool", {"tool_type": "builtin", "provider": "p", "tool": "t",
                                                           "tool_parameters": {}}),
                           headers={b"Dify-Plugin-Session-ID": [SID.encode()]})
        self.stub.flush()
        # the head goes out with the first write: the first keep-alive
        self.assertNoResult(d)
        self.reactor.advance(25)
        self.stub.flush()
        response = self.successResultOf(d)
        chunks = []
        response.deliverBody(_Collect(chunks))
        self.stub.flush()
        self.assertEqual(b"".join(chunks), b"\n\n")
        self.reactor.advance(35)
        self.stub.flush()
        error, end = self.items(b"".join(chunks))
        self.assertEqual(error["data"]["message"], "backwards invocation transaction timed out")
        self.assertEqual(end["data"]["event"], "end")


class _Collect:
    def __init__(self, chunks):
        self.chunks = chunks

    def makeConnection(self, transport):
        pass

    def dataReceived(self, data):
        self.chunks.append(data)

    def connectionLost(self, reason):
        pass


class AdmissionTests(SynchronousTestCase):
    """The front door's bound of the route."""

    def test_declared_length_over_6_mib(self):
        """A declared body over 6 MiB is refused 413 at the head; 6 MiB passes."""
        door = FrontDoor(b"key")
        target = b"/backwards-invocation/transaction"
        refused = door.admit(b"POST", target, None, 6 * 1024 * 1024 + 1)
        self.assertIsInstance(refused, Refused)
        self.assertEqual(refused.status, 413)
        self.assertNotIsInstance(door.admit(b"POST", target, None, 6 * 1024 * 1024), Refused)
