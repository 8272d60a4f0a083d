"""
The dispatch path end to end over fakes: RootResource with a
DispatchResource, an InstallationCache over MemoryPersistence, a
RuntimeRegistry holding a FakeRuntime, driven with StubTreq (and, where the
exact HTTP framing or a disconnection matters, a Site over a
StringTransport).
"""

from __future__ import annotations

import base64

import orjson
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from difydaemon.api import envelope, sse
from difydaemon.api.dispatch import DispatchResource, PollingRelay, StreamRelay, build_plugin_request
from difydaemon.dispatch_routes import MAX_BLOB_FILE, ROUTES, route_table
from difydaemon.api.root import RequestCounter, RootResource, StaticJSONResource
from difydaemon.interfaces import ISessionListener
from difydaemon.invocation.messages import backwards_error, backwards_response
from difydaemon.management.installations import InstallationCache
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.runtimes.registry import RuntimeRegistry
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.http import http_chunks
from difydaemon.testing.launchers import FakeRuntimeFactory
from difydaemon.testing.runtimes import FakeRuntime

KEY = "test-server-key"
TENANT = "0193a8a4-0000-7000-8000-000000000001"
OTHER_TENANT = "0193a8a4-0000-7000-8000-000000000002"
PLUGIN_ID = "acme/echo"
IDENTIFIER = "acme/echo:0.0.1@" + "a" * 64
BASE = "http://daemon.test"
TOOL_DATA = {"provider": "echo", "tool": "echo", "tool_parameters": {"text": "hi"}, "credentials": {}}
TEXT_HI = {"type": "text", "message": {"text": "hi"}, "meta": None}
TEXT_HO = {"type": "text", "message": {"text": "ho"}, "meta": None}
LLM_CHUNK = {
    "model": "gpt",
    "delta": {"index": 0, "message": {"role": "assistant", "content": "hello"}, "usage": None},
}
LLM_DATA = {"provider": "openai", "model": "gpt", "model_type": "llm", "credentials": {}, "prompt_messages": []}


def error_of(env: dict) -> dict:
    """The decoded inner error of an error envelope."""
    return orjson.loads(env["message"])


def items_of(body: bytes) -> list:
    """The envelopes of an SSE body, checking its framing on the way."""
    assert body.endswith(b"\n\n") or body == b"", body
    out = []
    for part in body.split(b"\n\n")[:-1]:
        assert part.startswith(b"data: "), part
        out.append(orjson.loads(part[len(b"data: "):]))
    return out


class HeldLookups:
    """
    Installation lookups that resolve only when the test says so, as a
    lookup that waits on a slow database does.

    :param installations: what answers them once released.
    :ivar pending: ``(Deferred, tenant_id, plugin_id)`` of the unanswered lookups.
    """

    def __init__(self, installations) -> None:
        self._installations = installations
        self.pending: list = []

    def get(self, tenant_id: str, plugin_id: str) -> Deferred:
        """A lookup that waits for :meth:`release` or :meth:`fail`."""
        waiter: Deferred = Deferred()
        self.pending.append((waiter, tenant_id, plugin_id))
        return waiter

    def release(self) -> None:
        """Answer every pending lookup from the installations."""
        pending, self.pending = self.pending, []
        for waiter, tenant_id, plugin_id in pending:
            self._installations.get(tenant_id, plugin_id).chainDeferred(waiter)

    def fail(self, exception: Exception) -> None:
        """Fail every pending lookup with ``exception``."""
        pending, self.pending = self.pending, []
        for waiter, _, _ in pending:
            waiter.errback(exception)


class DispatchHarness:
    """
    The dispatch path wired over fakes.

    :param test: the SynchronousTestCase using it.
    :param hold_lookups: installation lookups wait in :attr:`lookups` (a
        :class:`HeldLookups`) until released.
    """

    def __init__(self, test, install: bool = True, runtime: bool = True, session_timeout=None, factory=None,
                 hold_lookups: bool = False, **dispatch_options) -> None:
        self.test = test
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.persistence = MemoryPersistence(self.clock)
        if install:
            self.install(TENANT)
        self.installations = InstallationCache(self.clock, self.persistence)
        self.lookups = HeldLookups(self.installations) if hold_lookups else self.installations
        self.registry = RuntimeRegistry(self.clock, factory)
        self.runtime = FakeRuntime(self.clock, IDENTIFIER, session_timeout=session_timeout)
        if runtime:
            self.registry.register(self.runtime)
        self.dispatch = DispatchResource(self.clock, self.lookups, self.registry, **dispatch_options)
        self.root = RootResource(
            KEY, StaticJSONResource(404, envelope.ROUTE_NOT_FOUND), None, RequestCounter(), dispatch=self.dispatch
        )
        self.treq = StubTreq(self.root)

    def install(self, tenant: str, identifier: str = IDENTIFIER, plugin_id: str = PLUGIN_ID) -> None:
        """Install a plugin row for ``tenant``."""
        self.test.successResultOf(
            self.persistence.install_plugin(tenant, identifier, plugin_id, "local", "package", {}, {"tool": "echo"})
        )

    def post(self, route: str, data=None, *, body=None, raw=None, plugin_id=PLUGIN_ID, key=KEY,
             tenant=TENANT, content_type="application/json", method="POST"):
        """Send one request; returns the response Deferred (requests are flushed)."""
        headers = {}
        if key is not None:
            headers["X-Api-Key"] = key
        if plugin_id is not None:
            headers["X-Plugin-ID"] = plugin_id
        if content_type is not None:
            headers["Content-Type"] = content_type
        if raw is None:
            if body is None:
                body = {"user_id": "user-1", "data": data if data is not None else {}}
            raw = orjson.dumps(body)
        d = self.treq.request(method, f"{BASE}/plugin/{tenant}/dispatch/{route}", headers=headers, data=raw)
        self.treq.flush()
        return d

    def result(self, d):
        """(response, body) of a finished request."""
        self.clock.advance(0)
        self.treq.flush()
        response = self.test.successResultOf(d)
        content = self.treq.content(response)
        self.treq.flush()
        return response, self.test.successResultOf(content)

    def request(self, route: str, data=None, **kw):
        """One request that finishes without the plugin; (response, body)."""
        return self.result(self.post(route, data, **kw))

    def open(self, route: str, data=None, **kw):
        """Send a request that opens a session; (Deferred, session id)."""
        count = len(self.runtime.requests)
        d = self.post(route, data, **kw)
        self.test.assertEqual(len(self.runtime.requests), count + 1, "no session was opened")
        return d, self.runtime.last_session_id


class RawHTTP:
    """
    One HTTP/1.1 connection to a Site over a StringTransport: the exact
    bytes on the wire, and a client that can go away.
    """

    def __init__(self, root, clock) -> None:
        site = Site(root, reactor=clock, parsePOSTFormSubmission=False)
        self.protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def post(self, path: str, body: bytes, plugin_id: str = PLUGIN_ID) -> None:
        """Send one POST."""
        self.protocol.dataReceived(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: daemon.test\r\n"
            b"X-Api-Key: " + KEY.encode() + b"\r\nX-Plugin-ID: " + plugin_id.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )

    def disconnect(self) -> None:
        """The client closes the connection."""
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def chunks(self) -> list[bytes]:
        """The HTTP chunks of the (chunked) response body so far."""
        return http_chunks(self.transport.value().partition(b"\r\n\r\n")[2])


# -- refusals before any session --------------------------------------------------------


class RefusalTests(SynchronousTestCase):
    """Everything that is answered before a session is opened."""

    def setUp(self):
        super().setUp()
        self.daemon = DispatchHarness(self)

    def test_missing_key_is_401(self):
        """A dispatch request without X-Api-Key answers 401 with the unauthorized envelope."""
        response, body = self.daemon.request("tool/invoke", TOOL_DATA, key=None)
        self.assertEqual(response.code, 401)
        self.assertEqual(error_of(orjson.loads(body))["error_type"], "PluginDaemonUnauthorizedError")
        self.assertEqual(self.daemon.runtime.requests, [])

    def test_missing_plugin_id_is_400(self):
        """Without X-Plugin-ID the answer is 400 / -400 'plugin_id is required'."""
        response, body = self.daemon.request("tool/invoke", TOOL_DATA, plugin_id=None)
        self.assertEqual(response.code, 400)
        self.assertEqual(
            orjson.loads(body),
            {
                "code": -400,
                "message": '{"message":"plugin_id is required","error_type":"PluginDaemonBadRequestError","args":null}',
                "data": None,
            },
        )

    def test_not_installed_is_404(self):
        """A plugin the tenant has not installed is 404 / -404 PluginNotFoundError."""
        response, body = self.daemon.request("tool/invoke", TOOL_DATA, plugin_id="acme/other")
        self.assertEqual(response.code, 404)
        env = orjson.loads(body)
        self.assertEqual(env["code"], -404)
        self.assertEqual(error_of(env), {"message": "plugin not found", "error_type": "PluginNotFoundError", "args": None})

    def test_other_tenants_plugin_is_404(self):
        """A plugin installed only by another tenant is not found: tenants are isolated."""
        daemon = DispatchHarness(self, install=False)
        daemon.install(OTHER_TENANT)
        response, body = daemon.request("tool/invoke", TOOL_DATA)
        self.assertEqual(response.code, 404)
        self.assertEqual(error_of(orjson.loads(body))["error_type"], "PluginNotFoundError")
        self.assertEqual(daemon.runtime.requests, [])

    def test_unknown_route_is_404_body(self):
        """An unknown dispatch route answers the route-not-found body of §1.1."""
        response, body = self.daemon.request("tool/nope", TOOL_DATA)
        self.assertEqual(response.code, 404)
        self.assertEqual(body, envelope.ROUTE_NOT_FOUND)

    def test_get_is_404_body(self):
        """Dispatch routes are POST only; other methods get the route-not-found body."""
        response, body = self.daemon.request("tool/invoke", TOOL_DATA, method="GET")
        self.assertEqual(response.code, 404)
        self.assertEqual(orjson.loads(body), {"code": "not_found", "message": "route not found"})

    def test_trailing_slash_is_404(self):
        """A route with a trailing slash is not the route."""
        response, body = self.daemon.request("tool/invoke/", TOOL_DATA)
        self.assertEqual(response.code, 404)
        self.assertEqual(body, envelope.ROUTE_NOT_FOUND)

    def test_missing_required_field_is_400(self):
        """A missing required data field is 400 / -400 with the validator's text."""
        response, body = self.daemon.request("tool/invoke", {"provider": "echo"})
        self.assertEqual(response.code, 400)
        env = orjson.loads(body)
        self.assertEqual(env["code"], -400)
        self.assertEqual(
            error_of(env),
            {
                "message": "Key: 'InvokePluginRequest[requests.RequestInvokeTool].Data.Tool' "
                "Error:Field validation for 'Tool' failed on the 'required' tag",
                "error_type": "PluginDaemonBadRequestError",
                "args": None,
            },
        )
        self.assertEqual(self.daemon.runtime.requests, [])

    def test_every_failure_is_reported(self):
        """All failing fields are listed, one per line, as go-playground joins them."""
        _, body = self.daemon.request("tool/invoke", {})
        lines = error_of(orjson.loads(body))["message"].split("\n")
        self.assertEqual(len(lines), 2)
        self.assertIn("'Provider'", lines[0])
        self.assertIn("'Tool'", lines[1])

    def test_not_json_body_is_400(self):
        """A body that is not JSON binds nothing, so required fields fail."""
        response, body = self.daemon.request("tool/invoke", raw=b"{not json")
        self.assertEqual(response.code, 400)
        self.assertEqual(error_of(orjson.loads(body))["error_type"], "PluginDaemonBadRequestError")

    def test_non_json_content_type_is_400(self):
        """As with gin, a JSON body is only bound when Content-Type says JSON."""
        response, _ = self.daemon.request("tool/invoke", TOOL_DATA, content_type="text/plain")
        self.assertEqual(response.code, 400)

    def test_json_content_type_with_charset_is_accepted(self):
        """application/json with a charset parameter is still JSON."""
        d, _ = self.daemon.open("tool/invoke", TOOL_DATA, content_type="application/json; charset=utf-8")
        self.daemon.runtime.end(self.daemon.runtime.last_session_id)
        response, _ = self.daemon.result(d)
        self.assertEqual(response.code, 200)

    def test_model_type_must_equal_route_type(self):
        """/llm/invoke refuses a valid model type that is not llm ('eq' tag)."""
        response, body = self.daemon.request("llm/invoke", dict(LLM_DATA, model_type="rerank"))
        self.assertEqual(response.code, 400)
        self.assertIn("failed on the 'eq' tag", error_of(orjson.loads(body))["message"])

    def test_model_type_vocabulary(self):
        """An unknown model type fails the 'model_type' tag."""
        response, body = self.daemon.request("model/schema", dict(LLM_DATA, model_type="vision"))
        self.assertEqual(response.code, 400)
        self.assertIn("'ModelType' failed on the 'model_type' tag", error_of(orjson.loads(body))["message"])

    def test_multimodal_model_type_is_any_string(self):
        """multimodal_embedding accepts any non-empty model_type (Dify sends text-embedding)."""
        data = {"provider": "p", "model": "m", "model_type": "text-embedding", "input_type": "query",
                "documents": [{"content": "x", "content_type": "text"}]}
        self.daemon.open("multimodal_embedding/invoke", data)

    def test_tool_choice_rules(self):
        """tool_choice needs a known mode, and mode 'tool' needs a name."""
        for choice, tag in (({}, "required"), ({"mode": "maybe"}, "oneof"), ({"mode": "tool"}, "required_for_tool")):
            response, body = self.daemon.request("llm/invoke", dict(LLM_DATA, tool_choice=choice))
            self.assertEqual(response.code, 400, choice)
            self.assertIn(f"failed on the '{tag}' tag", error_of(orjson.loads(body))["message"])
        self.daemon.open("llm/invoke", dict(LLM_DATA, tool_choice={"mode": "tool", "name": "search"}))

    def test_tools_need_names(self):
        """Each entry of tools needs a name (validated with 'dive')."""
        response, body = self.daemon.request("llm/invoke", dict(LLM_DATA, tools=[{"name": "a"}, {"description": "b"}]))
        self.assertEqual(response.code, 400)
        self.assertIn(".Data.Tools[1].Name'", error_of(orjson.loads(body))["message"])

    def test_empty_plugin_state_fails_min(self):
        """/model/polling/check needs a non-empty plugin_state."""
        response, body = self.daemon.request("model/polling/check", dict(LLM_DATA, plugin_state={}))
        self.assertEqual(response.code, 400)
        self.assertIn("'PluginState' failed on the 'min' tag", error_of(orjson.loads(body))["message"])

    def test_invalid_stored_identifier_is_400(self):
        """An installation whose identifier does not parse is 400 PluginUniqueIdentifierError."""
        daemon = DispatchHarness(self, install=False)
        daemon.install(TENANT, identifier="not an identifier")
        response, body = daemon.request("tool/invoke", TOOL_DATA)
        self.assertEqual(response.code, 400)
        self.assertEqual(error_of(orjson.loads(body))["error_type"], "PluginUniqueIdentifierError")


class RuntimeWaitTests(SynchronousTestCase):
    """Waiting for a runtime that is missing or not ready yet."""

    def test_missing_runtime_waits_then_500(self):
        """With no runtime the request waits runtime_wait seconds, then answers 500."""
        daemon = DispatchHarness(self, runtime=False)
        d = daemon.post("tool/invoke", TOOL_DATA)
        daemon.clock.pump([0.3] * 19)
        daemon.treq.flush()
        self.assertNoResult(d)
        daemon.clock.advance(0.35)
        response, body = daemon.result(d)
        self.assertEqual(response.code, 500)
        self.assertEqual(
            error_of(orjson.loads(body)),
            {"message": "failed to get plugin runtime", "error_type": "PluginDaemonInternalServerError", "args": None},
        )
        self.assertEqual(daemon.clock.getDelayedCalls(), [])

    def test_not_ready_runtime_waits_then_500(self):
        """A runtime that stays not ready is looked at again and never opened."""
        daemon = DispatchHarness(self)
        daemon.runtime.ready = False
        d = daemon.post("tool/invoke", TOOL_DATA)
        # 20 x 0.3 falls short of 6 s by a rounding error
        daemon.clock.pump([0.3] * 20 + [0.01])
        response, _ = daemon.result(d)
        self.assertEqual(response.code, 500)
        self.assertEqual(daemon.runtime.requests, [])

    def test_runtime_ready_during_wait(self):
        """A runtime that becomes ready while the request waits serves it."""
        daemon = DispatchHarness(self)
        daemon.runtime.ready = False
        d = daemon.post("tool/invoke", TOOL_DATA)
        daemon.clock.advance(1.0)
        daemon.runtime.ready = True
        daemon.clock.advance(0.3)
        self.assertEqual(len(daemon.runtime.requests), 1)
        daemon.runtime.stream(daemon.runtime.last_session_id, TEXT_HI)
        daemon.runtime.end(daemon.runtime.last_session_id)
        response, body = daemon.result(d)
        self.assertEqual(response.code, 200)
        self.assertEqual([item["data"] for item in items_of(body)], [TEXT_HI])

    def test_runtime_registered_during_wait(self):
        """A runtime registered while the request waits (a plugin that just launched) serves it."""
        daemon = DispatchHarness(self, runtime=False)
        d = daemon.post("tool/invoke", TOOL_DATA)
        daemon.clock.advance(2.0)
        daemon.registry.register(daemon.runtime)
        daemon.clock.advance(0.3)
        daemon.runtime.end(daemon.runtime.last_session_id)
        response, _ = daemon.result(d)
        self.assertEqual(response.code, 200)

    def test_disconnect_during_wait_stops_waiting(self):
        """A client that goes away while waiting leaves no retry behind."""
        daemon = DispatchHarness(self, runtime=False)
        http = RawHTTP(daemon.root, daemon.clock)
        http.post(f"/plugin/{TENANT}/dispatch/tool/invoke", orjson.dumps({"data": TOOL_DATA}))
        self.assertEqual(len(daemon.clock.getDelayedCalls()), 1)
        http.disconnect()
        self.assertEqual(daemon.clock.getDelayedCalls(), [])
        daemon.registry.register(daemon.runtime)
        daemon.clock.advance(10)
        self.assertEqual(daemon.runtime.requests, [])


class SupervisedRuntimeWaitTests(SynchronousTestCase):
    """Waiting for a local plugin the registry supervises: starting, backing off, shutting down."""

    def harness(self) -> DispatchHarness:
        self.factory = FakeRuntimeFactory(installed=[IDENTIFIER])
        daemon = DispatchHarness(self, runtime=False, factory=self.factory, runtime_wait=120)
        self.successResultOf(daemon.registry.start())
        return daemon

    def test_plugin_still_starting_is_waited_for(self):
        """A call for a plugin restored at start and not up yet waits, then is served."""
        daemon = self.harness()
        d = daemon.post("tool/invoke", TOOL_DATA)
        daemon.clock.advance(60)
        self.assertNoResult(d)
        self.factory.succeed(IDENTIFIER, daemon.runtime)
        daemon.runtime.end(daemon.runtime.last_session_id)
        response, _ = daemon.result(d)
        self.assertEqual(response.code, 200)

    def test_failed_plugin_is_retried_and_the_500_says_why(self):
        """A call for a plugin backing off triggers an attempt; its failure is the 500's message, at once."""
        daemon = self.harness()
        self.factory.fail(IDENTIFIER, "starting the plugin failed: ModuleNotFoundError: No module named 'gevent'")
        daemon.clock.advance(0.5)
        d = daemon.post("tool/invoke", TOOL_DATA)
        daemon.clock.advance(4.5)
        self.assertEqual(self.factory.count(IDENTIFIER), 2)
        self.factory.fail(IDENTIFIER, "starting the plugin failed: ModuleNotFoundError: No module named 'gevent'")
        response, body = daemon.result(d)
        self.assertEqual(response.code, 500)
        self.assertEqual(
            error_of(orjson.loads(body)),
            {
                "message": "failed to get plugin runtime: starting the plugin failed:"
                " ModuleNotFoundError: No module named 'gevent'",
                "error_type": "PluginDaemonInternalServerError",
                "args": None,
            },
        )

    def test_fixed_plugin_serves_the_waiting_call(self):
        """When the attempt a call asked for succeeds (the cause was fixed), the call is served."""
        daemon = self.harness()
        self.factory.fail(IDENTIFIER, "no network")
        daemon.clock.advance(10)
        self.factory.fail(IDENTIFIER, "no network")
        d = daemon.post("tool/invoke", TOOL_DATA)
        daemon.clock.advance(5)
        self.factory.succeed(IDENTIFIER, daemon.runtime)
        daemon.runtime.end(daemon.runtime.last_session_id)
        response, _ = daemon.result(d)
        self.assertEqual(response.code, 200)

    def test_shutdown_ends_waiting_calls(self):
        """Calls waiting when the daemon stops get a 500 saying it is shutting down."""
        daemon = self.harness()
        d = daemon.post("tool/invoke", TOOL_DATA)
        daemon.registry.stop_all()
        response, body = daemon.result(d)
        self.assertEqual(response.code, 500)
        self.assertEqual(
            error_of(orjson.loads(body))["message"], "failed to get plugin runtime: the plugin daemon is shutting down"
        )


# -- the request sent to the plugin --------------------------------------------------


class PluginRequestTests(SynchronousTestCase):
    """The §0.2 request that opens the session."""

    def test_shape(self):
        """Eight keys in order; data is the route data plus user_id, type and action."""
        daemon = DispatchHarness(self)
        body = {
            "user_id": "u1",
            "conversation_id": "c1",
            "message_id": "m1",
            "app_id": "a1",
            "context": {"credentials": {"tool_credentials": {"echo": "cred"}}},
            "tenant_id": "ignored",
            "data": dict(TOOL_DATA, credential_type="oauth2"),
        }
        daemon.open("tool/invoke", body=body)
        request = daemon.runtime.requests[0]
        self.assertEqual(
            list(request),
            ["session_id", "conversation_id", "message_id", "app_id", "endpoint_id", "context", "event", "data"],
        )
        self.assertEqual(
            {k: v for k, v in request.items() if k != "session_id"},
            {
                "conversation_id": "c1",
                "message_id": "m1",
                "app_id": "a1",
                "endpoint_id": None,
                "context": {"credentials": {"tool_credentials": {"echo": "cred"}}},
                "event": "request",
                "data": dict(TOOL_DATA, credential_type="oauth2", user_id="u1", type="tool", action="invoke_tool"),
            },
        )

    def test_session_ids_are_fresh_uuids(self):
        """Each request gets its own uuid4 session id."""
        daemon = DispatchHarness(self)
        daemon.open("tool/invoke", TOOL_DATA)
        daemon.open("tool/invoke", TOOL_DATA)
        first, second = daemon.runtime.session_ids
        self.assertNotEqual(first, second)
        self.assertEqual((len(first), first[14]), (36, "4"))

    def test_empty_credential_type_dropped(self):
        """An empty credential_type is not sent, so the SDK uses its default."""
        route = route_table()[b"tool/invoke"]
        request = build_plugin_request("s", route, {}, dict(TOOL_DATA, credential_type=""))
        self.assertNotIn("credential_type", request["data"])
        self.assertEqual(request["data"]["user_id"], "")

    def test_routing_keys_win(self):
        """type and action come from the route even if data has such keys."""
        route = route_table()[b"tool/invoke"]
        request = build_plugin_request("s", route, {"user_id": "u"}, {"type": "x", "action": "y", "user_id": "z"})
        self.assertEqual(
            (request["data"]["type"], request["data"]["action"], request["data"]["user_id"]),
            ("tool", "invoke_tool", "u"),
        )


# -- streaming --------------------------------------------------------------------------


class StreamTests(SynchronousTestCase):
    """SSE relaying of a session's messages."""

    def setUp(self):
        super().setUp()
        self.daemon = DispatchHarness(self)
        self.runtime = self.daemon.runtime

    def test_two_chunk_tool_stream_bytes(self):
        """Two tool chunks become exactly two SSE items, and the response ends with the session."""
        d, session = self.daemon.open("tool/invoke", TOOL_DATA)
        self.runtime.stream(session, TEXT_HI)
        self.runtime.stream(session, TEXT_HO)
        self.runtime.end(session)
        response, body = self.daemon.result(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        self.assertEqual(
            body,
            b'data: {"code":0,"message":"success","data":{"type":"text","message":{"text":"hi"},"meta":null}}\n\n'
            b'data: {"code":0,"message":"success","data":{"type":"text","message":{"text":"ho"},"meta":null}}\n\n',
        )

    def test_raw_bytes_relayed(self):
        """The plugin's own chunk bytes are relayed, not a re-encoding of the parsed chunk."""
        d, session = self.daemon.open("tool/invoke", TOOL_DATA)
        raw = b'{"meta":null,"message":{"text":"hi"},"type":"text"}'
        self.runtime.stream(session, orjson.loads(raw), raw)
        self.runtime.end(session)
        _, body = self.daemon.result(d)
        self.assertEqual(body, sse.success_item(raw))

    def test_plugin_error_bytes(self):
        """A plugin error follows the chunks as one doubly encoded PluginInvokeError item."""
        d, session = self.daemon.open("tool/invoke", TOOL_DATA)
        self.runtime.stream(session, TEXT_HI)
        self.runtime.error(session, "ValueError", "bad input", {"traceback": "tb", "description": "d"})
        self.runtime.end(session)  # the SDK's end after an error is ignored
        _, body = self.daemon.result(d)
        self.assertEqual(
            body,
            b'data: {"code":0,"message":"success","data":{"type":"text","message":{"text":"hi"},"meta":null}}\n\n'
            b'data: {"code":-500,"message":"{\\"message\\":\\"{\\\\\\"args\\\\\\":{\\\\\\"description\\\\\\":'
            b'\\\\\\"d\\\\\\",\\\\\\"traceback\\\\\\":\\\\\\"tb\\\\\\"},\\\\\\"error_type\\\\\\":\\\\\\"ValueError'
            b'\\\\\\",\\\\\\"message\\\\\\":\\\\\\"bad input\\\\\\"}\\",\\"error_type\\":\\"PluginInvokeError\\",'
            b'\\"args\\":null}","data":null}\n\n',
        )
        last = items_of(body)[-1]
        outer = orjson.loads(last["message"])
        self.assertEqual((outer["error_type"], outer["args"]), ("PluginInvokeError", None))
        self.assertEqual(
            orjson.loads(outer["message"]),
            {"args": {"description": "d", "traceback": "tb"}, "error_type": "ValueError", "message": "bad input"},
        )

    def test_bad_tool_chunk_is_unmarshal_error(self):
        """A tool chunk of an unknown type ends the stream with an unmarshal_error and closes the session."""
        d, session = self.daemon.open("tool/invoke", TOOL_DATA)
        self.runtime.stream(session, TEXT_HI)
        self.runtime.stream(session, {"type": "poem", "message": {}, "meta": None})
        self.assertFalse(self.runtime.is_open(session))
        _, body = self.daemon.result(d)
        items = items_of(body)
        self.assertEqual(items[0]["data"], TEXT_HI)
        self.assertEqual(len(items), 2)
        self.assertEqual(items[1]["code"], -500)
        outer = orjson.loads(items[1]["message"])
        self.assertEqual(outer["error_type"], "PluginInvokeError")
        self.assertEqual(
            orjson.loads(outer["message"]),
            {
                "error_type": "unmarshal_error",
                "message": "unmarshal json failed: Key: 'ToolResponseChunk.Type' Error:Field validation for "
                "'Type' failed on the 'is_valid_tool_response_chunk_type' tag",
            },
        )

    def test_llm_chunk_gains_prompt_messages(self):
        """An LLM chunk is relayed with prompt_messages: [] appended to the plugin's bytes."""
        d, session = self.daemon.open("llm/invoke", LLM_DATA)
        raw = orjson.dumps(LLM_CHUNK)
        self.runtime.stream(session, LLM_CHUNK, raw)
        self.runtime.end(session)
        _, body = self.daemon.result(d)
        self.assertEqual(body, sse.success_item(raw[:-1] + b',"prompt_messages":[]}'))

    def test_llm_prompt_messages_replaced(self):
        """prompt_messages sent by the plugin are replaced by an empty list."""
        d, session = self.daemon.open("llm/invoke", LLM_DATA)
        self.runtime.stream(session, dict(LLM_CHUNK, prompt_messages=[{"role": "user", "content": "x"}]))
        self.runtime.end(session)
        _, body = self.daemon.result(d)
        self.assertEqual(items_of(body)[0]["data"], dict(LLM_CHUNK, prompt_messages=[]))

    def test_llm_chunk_checks(self):
        """LLM chunks without model, delta.index or message content are unmarshal errors."""
        bad_chunks = [
            {"delta": LLM_CHUNK["delta"]},
            {"model": "gpt", "delta": {"message": {"role": "assistant", "content": "x"}}},
            {"model": "gpt", "delta": {"index": 0, "message": {"role": "assistant", "content": None}}},
            {"model": "gpt", "delta": {"index": 0, "message": {"role": "assistant", "content": "x"},
                                       "usage": {"prompt_tokens": 1}}},
        ]
        for chunk in bad_chunks:
            d, session = self.daemon.open("llm/invoke", LLM_DATA)
            self.runtime.stream(session, chunk)
            _, body = self.daemon.result(d)
            items = items_of(body)
            self.assertEqual(len(items), 1, chunk)
            inner = orjson.loads(orjson.loads(items[0]["message"])["message"])
            self.assertEqual(inner["error_type"], "unmarshal_error", chunk)

    def test_zero_chunks(self):
        """A session that ends without chunks is an empty 200 event stream."""
        d, session = self.daemon.open("tool/invoke", TOOL_DATA)
        self.runtime.end(session)
        response, body = self.daemon.result(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        self.assertEqual(body, b"")

    def test_runtime_timeout_item(self):
        """A runtime that times sessions out gets no second timer, and its timeout is written as the Go daemon writes it."""
        daemon = DispatchHarness(self, session_timeout=600.0)
        d, session = daemon.open("tool/invoke", TOOL_DATA)
        self.assertEqual(len(daemon.clock.getDelayedCalls()), 1)
        daemon.runtime.stream(session, TEXT_HI)
        daemon.clock.advance(600)
        _, body = daemon.result(d)
        self.assertEqual(
            body,
            sse.success_item(orjson.dumps(TEXT_HI))
            + b'data: {"code":-500,"message":"{\\"message\\":\\"killed by timeout\\",\\"error_type\\":'
            b'\\"PluginDaemonInternalServerError\\",\\"args\\":null}","data":null}\n\n',
        )

    def test_dispatch_timeout_item(self):
        """For a runtime without its own timeout, dispatch kills the session after max_execution_timeout."""
        daemon = DispatchHarness(self, max_execution_timeout=30.0)
        d, session = daemon.open("tool/invoke", TOOL_DATA)
        daemon.clock.advance(29.9)
        daemon.treq.flush()
        self.assertNoResult(d)
        daemon.clock.advance(0.1)
        self.assertFalse(daemon.runtime.is_open(session))
        _, body = daemon.result(d)
        self.assertEqual(
            error_of(items_of(body)[-1]),
            {"message": "killed by timeout", "error_type": "PluginDaemonInternalServerError", "args": None},
        )

    def test_timer_cancelled_at_end(self):
        """A finished stream leaves no timer behind."""
        daemon = DispatchHarness(self)
        d, session = daemon.open("tool/invoke", TOOL_DATA)
        daemon.runtime.stream(session, TEXT_HI)
        daemon.runtime.end(session)
        daemon.result(d)
        self.assertEqual(daemon.clock.getDelayedCalls(), [])

    def test_connection_closed_is_plugin_invoke_error(self):
        """A runtime that goes away mid-session reaches Dify as a PluginInvokeError with an inner ConnectionClosedError."""
        d, session = self.daemon.open("tool/invoke", TOOL_DATA)
        self.runtime.stop()
        _, body = self.daemon.result(d)
        inner = orjson.loads(error_of(items_of(body)[-1])["message"])
        self.assertEqual(inner["error_type"], "ConnectionClosedError")

    def test_unknown_session_message_kind(self):
        """A session message of an unknown kind ends the stream with unknown_stream_message_type."""
        d, session = self.daemon.open("tool/invoke", TOOL_DATA)
        self.runtime.deliver(session, "mystery", {})
        _, body = self.daemon.result(d)
        inner = orjson.loads(error_of(items_of(body)[-1])["message"])
        self.assertEqual(inner["error_type"], "unknown_stream_message_type")

    def test_scripted_reply(self):
        """A scripted FakeRuntime answers a whole request with no test driving."""
        self.runtime.script("invoke_tool", [("stream", TEXT_HI), ("end", {})])
        response, body = self.daemon.request("tool/invoke", TOOL_DATA)
        self.assertEqual(body, sse.success_item(orjson.dumps(TEXT_HI)))


class BackwardsInvocationTests(SynchronousTestCase):
    """Backwards invocations are refused at once, for now."""

    def test_invoke_answered_with_error_and_end(self):
        """An invoke gets an error then an end backwards_response, and the stream goes on."""
        daemon = DispatchHarness(self)
        body = {"user_id": "u", "conversation_id": "c", "app_id": "a", "context": {"k": 1}, "data": TOOL_DATA}
        d, session = daemon.open("tool/invoke", body=body)
        daemon.runtime.invoke(session, {"type": "storage", "backwards_request_id": "b1", "request": {"opt": "get"}})
        header = {"session_id": session, "conversation_id": "c", "message_id": None, "app_id": "a",
                  "endpoint_id": None, "context": {"k": 1}, "event": "backwards_response"}
        self.assertEqual(
            daemon.runtime.sent,
            [
                (session, dict(header, data={"backwards_request_id": "b1", "event": "error",
                                             "message": "backwards invocation is not available", "data": None})),
                (session, dict(header, data={"backwards_request_id": "b1", "event": "end", "message": "",
                                             "data": None})),
            ],
        )
        self.assertEqual(list(daemon.runtime.sent[0][1]), list(daemon.runtime.requests[0]))
        daemon.runtime.stream(session, TEXT_HI)
        daemon.runtime.end(session)
        _, body = daemon.result(d)
        self.assertEqual(body, sse.success_item(orjson.dumps(TEXT_HI)))

    def test_malformed_invoke_fails_stream(self):
        """An invoke without backwards_request_id ends the stream with invoke_dify_error."""
        daemon = DispatchHarness(self)
        d, session = daemon.open("tool/invoke", TOOL_DATA)
        daemon.runtime.invoke(session, {"type": "storage", "request": {}})
        self.assertFalse(daemon.runtime.is_open(session))
        _, body = daemon.result(d)
        inner = orjson.loads(error_of(items_of(body)[-1])["message"])
        self.assertEqual(inner["error_type"], "invoke_dify_error")
        self.assertEqual(daemon.runtime.sent, [])

    def test_message_builders(self):
        """backwards_error builds the error and end messages of runtimes.md §4.3."""
        request = {"session_id": "s", "conversation_id": None, "message_id": None, "app_id": None,
                   "endpoint_id": None, "context": None, "event": "request", "data": {}}
        self.assertEqual(
            orjson.dumps(backwards_error(request, "b", "no")),
            b'[{"session_id":"s","conversation_id":null,"message_id":null,"app_id":null,"endpoint_id":null,'
            b'"context":null,"event":"backwards_response","data":{"backwards_request_id":"b","event":"error",'
            b'"message":"no","data":null}},{"session_id":"s","conversation_id":null,"message_id":null,'
            b'"app_id":null,"endpoint_id":null,"context":null,"event":"backwards_response","data":'
            b'{"backwards_request_id":"b","event":"end","message":"","data":null}}]',
        )
        self.assertEqual(
            backwards_response(request, "b", "response", "struct", {"x": 1})["data"],
            {"backwards_request_id": "b", "event": "response", "message": "struct", "data": {"x": 1}},
        )


class WireTests(SynchronousTestCase):
    """The HTTP framing and the client's departure, seen on a real Site."""

    def test_chunks_of_one_turn_share_one_write(self):
        """Chunks delivered in one reactor turn go out as one HTTP chunk."""
        daemon = DispatchHarness(self)
        http = RawHTTP(daemon.root, daemon.clock)
        http.post(f"/plugin/{TENANT}/dispatch/tool/invoke", orjson.dumps({"data": TOOL_DATA}))
        session = daemon.runtime.last_session_id
        daemon.runtime.stream(session, TEXT_HI)
        daemon.runtime.stream(session, TEXT_HO)
        daemon.clock.advance(0)
        daemon.runtime.stream(session, TEXT_HI)
        daemon.runtime.end(session)
        self.assertEqual(
            http.chunks(),
            [
                sse.success_item(orjson.dumps(TEXT_HI)) + sse.success_item(orjson.dumps(TEXT_HO)),
                sse.success_item(orjson.dumps(TEXT_HI)),
            ],
        )
        self.assertTrue(http.transport.value().endswith(b"\r\n0\r\n\r\n"))

    def test_uncoalesced_writes_each_chunk(self):
        """With coalesce_writes=False each chunk is its own write, and the bytes are the same."""
        daemon = DispatchHarness(self, coalesce_writes=False)
        http = RawHTTP(daemon.root, daemon.clock)
        http.post(f"/plugin/{TENANT}/dispatch/tool/invoke", orjson.dumps({"data": TOOL_DATA}))
        session = daemon.runtime.last_session_id
        daemon.runtime.stream(session, TEXT_HI)
        daemon.runtime.stream(session, TEXT_HO)
        daemon.runtime.end(session)
        self.assertEqual(
            http.chunks(), [sse.success_item(orjson.dumps(TEXT_HI)), sse.success_item(orjson.dumps(TEXT_HO))]
        )

    def test_disconnect_closes_session(self):
        """A client that goes away mid-stream closes the plugin session and nothing more is written."""
        daemon = DispatchHarness(self)
        http = RawHTTP(daemon.root, daemon.clock)
        http.post(f"/plugin/{TENANT}/dispatch/tool/invoke", orjson.dumps({"data": TOOL_DATA}))
        session = daemon.runtime.last_session_id
        daemon.runtime.stream(session, TEXT_HI)
        daemon.clock.advance(0)
        written = http.transport.value()
        daemon.runtime.stream(session, TEXT_HO)
        http.disconnect()
        self.assertFalse(daemon.runtime.is_open(session))
        daemon.runtime.stream(session, TEXT_HI)
        daemon.clock.advance(1000)
        self.assertEqual(http.transport.value(), written)
        self.assertEqual(daemon.clock.getDelayedCalls(), [])


# -- agent strategy blobs -------------------------------------------------------------------


def blob_chunk(blob_id: str, data: bytes, end: bool = False, meta=None, total: int = 0) -> dict:
    return {
        "type": "blob_chunk",
        "message": {"id": blob_id, "sequence": 0, "total_length": total, "blob": base64.b64encode(data).decode(),
                    "end": end},
        "meta": meta,
    }


AGENT_DATA = {"agent_strategy_provider": "p", "agent_strategy": "s", "agent_strategy_params": {}}


class BlobTests(SynchronousTestCase):
    """Reassembly of blob_chunk items on /agent_strategy/invoke (§3.4)."""

    def setUp(self):
        super().setUp()
        self.daemon = DispatchHarness(self)
        self.runtime = self.daemon.runtime

    def _items(self, route, chunks, data=AGENT_DATA):
        d, session = self.daemon.open(route, data)
        for chunk in chunks:
            self.runtime.stream(session, chunk)
        if self.runtime.is_open(session):
            self.runtime.end(session)
        return items_of(self.daemon.result(d)[1])

    def test_reassembled(self):
        """Pieces of one id become one blob item carrying the end piece's meta; others pass."""
        items = self._items(
            "agent_strategy/invoke",
            [
                blob_chunk("f", b"a" * 8192),
                TEXT_HI,
                blob_chunk("g", b"x"),
                blob_chunk("f", b"bc"),
                blob_chunk("f", b"", end=True, meta={"mime_type": "text/plain"}),
            ],
        )
        self.assertEqual(
            [item["data"] for item in items],
            [
                TEXT_HI,
                {"type": "blob", "message": {"blob": base64.b64encode(b"a" * 8192 + b"bc").decode()},
                 "meta": {"mime_type": "text/plain"}},
            ],
        )

    def test_piece_too_large(self):
        """A piece of more than 8192 bytes ends the stream with 'single file chunk is too large'."""
        items = self._items("agent_strategy/invoke", [blob_chunk("f", b"a" * 8193)])
        inner = orjson.loads(error_of(items[-1])["message"])
        self.assertEqual(inner["message"], "single file chunk is too large")

    def test_file_too_large(self):
        """A file past 15 MiB ends the stream with 'file is too large'."""
        piece = blob_chunk("f", b"a" * 8192)
        count = MAX_BLOB_FILE // 8192
        items = self._items("agent_strategy/invoke", [piece] * count + [blob_chunk("f", b"z")])
        self.assertEqual(len(items), 1)
        inner = orjson.loads(error_of(items[0])["message"])
        self.assertEqual(inner["message"], "file is too large")

    def test_file_at_limit_passes(self):
        """Exactly 15 MiB is still one blob."""
        piece = blob_chunk("f", b"a" * 8192)
        count = MAX_BLOB_FILE // 8192
        items = self._items("agent_strategy/invoke", [piece] * count + [blob_chunk("f", b"", end=True)])
        self.assertEqual(len(base64.b64decode(items[0]["data"]["message"]["blob"])), MAX_BLOB_FILE)

    def test_malformed_pieces_skipped(self):
        """blob_chunk items missing id, blob, end or total_length are skipped silently."""
        bad = blob_chunk("f", b"a")
        del bad["message"]["total_length"]
        items = self._items("agent_strategy/invoke", [bad, {"type": "blob_chunk", "message": None, "meta": None}])
        self.assertEqual(items, [])

    def test_tool_invoke_does_not_reassemble(self):
        """/tool/invoke relays blob_chunk items as they are (Dify merges them)."""
        chunk = blob_chunk("f", b"abc")
        items = self._items("tool/invoke", [chunk], data=TOOL_DATA)
        self.assertEqual([item["data"] for item in items], [chunk])


# -- polling -----------------------------------------------------------------------------------


class PollingTests(SynchronousTestCase):
    """The non-streaming /model/polling routes (§2.3)."""

    def setUp(self):
        super().setUp()
        self.daemon = DispatchHarness(self)
        self.runtime = self.daemon.runtime

    def test_start_last_chunk_wins(self):
        """start answers one JSON envelope holding the last result."""
        d, session = self.daemon.open("model/polling/start", LLM_DATA)
        self.assertEqual(self.runtime.requests[0]["data"]["action"], "start_polling")
        self.runtime.stream(session, {"status": "running", "plugin_state": {"job": 1}})
        last = b'{"status":"succeeded","result":{"text":"done"}}'
        self.runtime.stream(session, orjson.loads(last), last)
        self.runtime.end(session)
        response, body = self.daemon.result(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json; charset=utf-8"])
        self.assertEqual(body, b'{"code":0,"message":"success","data":' + last + b"}")

    def test_check(self):
        """check sends plugin_state to the plugin and answers its result."""
        d, session = self.daemon.open("model/polling/check", dict(LLM_DATA, plugin_state={"job": 1}))
        self.assertEqual(self.runtime.requests[0]["data"]["plugin_state"], {"job": 1})
        self.assertEqual(self.runtime.requests[0]["data"]["action"], "check_polling")
        self.runtime.stream(session, {"status": "failed", "error": "quota"})
        self.runtime.end(session)
        response, body = self.daemon.result(d)
        self.assertEqual(orjson.loads(body)["data"], {"status": "failed", "error": "quota"})

    def test_no_result(self):
        """No result chunk is a 500 PluginInvokeError 'no polling result received from plugin'."""
        d, session = self.daemon.open("model/polling/start", LLM_DATA)
        self.runtime.end(session)
        response, body = self.daemon.result(d)
        self.assertEqual(response.code, 500)
        self.assertEqual(
            error_of(orjson.loads(body)),
            {"message": "no polling result received from plugin", "error_type": "PluginInvokeError", "args": None},
        )

    def test_invalid_result(self):
        """A running result without plugin_state is a 500 unmarshal_error and closes the session."""
        d, session = self.daemon.open("model/polling/start", LLM_DATA)
        self.runtime.stream(session, {"status": "running"})
        self.assertFalse(self.runtime.is_open(session))
        response, body = self.daemon.result(d)
        self.assertEqual(response.code, 500)
        inner = orjson.loads(error_of(orjson.loads(body))["message"])
        self.assertEqual(inner["error_type"], "unmarshal_error")
        self.assertIn("required_for_running", inner["message"])

    def test_plugin_error(self):
        """A plugin error is a 500 doubly encoded PluginInvokeError."""
        d, session = self.daemon.open("model/polling/start", LLM_DATA)
        self.runtime.error(session, "PluginLLMPollingUnsupportedError", "no")
        response, body = self.daemon.result(d)
        self.assertEqual(response.code, 500)
        env = orjson.loads(body)
        self.assertEqual(error_of(env)["error_type"], "PluginInvokeError")
        self.assertEqual(
            orjson.loads(error_of(env)["message"]),
            {"args": None, "error_type": "PluginLLMPollingUnsupportedError", "message": "no"},
        )


# -- every route ---------------------------------------------------------------------------------

_M = {"provider": "p", "model": "m", "credentials": {}}
_TOOL_CHUNK = TEXT_HI
_LLM_OUT = dict(LLM_CHUNK, prompt_messages=[])

#: path -> (type, action, minimal valid data, a chunk, the chunk as relayed)
ROUTE_CASES = {
    "tool/invoke": ("tool", "invoke_tool", TOOL_DATA, _TOOL_CHUNK, _TOOL_CHUNK),
    "tool/validate_credentials": ("tool", "validate_tool_credentials", {"provider": "p"}, {"result": True}, None),
    "tool/get_runtime_parameters": ("tool", "get_tool_runtime_parameters", {"provider": "p", "tool": "t"},
                                    {"parameters": []}, None),
    "llm/invoke": ("model", "invoke_llm", LLM_DATA, LLM_CHUNK, _LLM_OUT),
    "llm/num_tokens": ("model", "get_llm_num_tokens", dict(_M, model_type="llm"), {"num_tokens": 3}, None),
    "text_embedding/invoke": ("model", "invoke_text_embedding",
                              dict(_M, model_type="text-embedding", texts=["a"], input_type="document"),
                              {"model": "m", "embeddings": [[0.1]], "usage": {}}, None),
    "multimodal_embedding/invoke": ("model", "invoke_multimodal_embedding",
                                    dict(_M, model_type="text-embedding", input_type="document",
                                         documents=[{"content": "a", "content_type": "image"}]),
                                    {"model": "m", "embeddings": [], "usage": {}}, None),
    "text_embedding/num_tokens": ("model", "get_text_embedding_num_tokens",
                                  dict(_M, model_type="text-embedding", texts=[]), {"num_tokens": [1]}, None),
    "rerank/invoke": ("model", "invoke_rerank", dict(_M, model_type="rerank", query="q", docs=["d"]),
                      {"model": "m", "docs": []}, None),
    "multimodal_rerank/invoke": ("model", "invoke_multimodal_rerank",
                                 dict(_M, model_type="rerank", query={"content": "q", "content_type": "text"},
                                      docs=[]), {"model": "m", "docs": []}, None),
    "tts/invoke": ("model", "invoke_tts", dict(_M, model_type="tts", content_text="hi", voice="v", tenant_id="t"),
                   {"result": "6869"}, None),
    "tts/model/voices": ("model", "get_tts_model_voices", dict(_M, model_type="tts", language="en"),
                         {"voices": []}, None),
    "speech2text/invoke": ("model", "invoke_speech2text", dict(_M, model_type="speech2text", file="00"),
                           {"result": "text"}, None),
    "moderation/invoke": ("model", "invoke_moderation", dict(_M, model_type="moderation", text="t"),
                          {"result": False}, None),
    "model/validate_provider_credentials": ("model", "validate_provider_credentials", {"provider": "p"},
                                            {"result": True, "credentials": None}, None),
    "model/validate_model_credentials": ("model", "validate_model_credentials", dict(_M, model_type="tts"),
                                         {"result": True}, None),
    "model/schema": ("model", "get_ai_model_schemas", dict(_M, model_type="llm"), {"model_schema": None}, None),
    "model/polling/start": ("model", "start_polling", LLM_DATA, {"status": "succeeded", "result": 1}, None),
    "model/polling/check": ("model", "check_polling", dict(_M, model_type="llm", plugin_state={"a": 1}),
                            {"status": "running", "plugin_state": {"a": 2}}, None),
    "agent_strategy/invoke": ("agent_strategy", "invoke_agent_strategy", AGENT_DATA, _TOOL_CHUNK, _TOOL_CHUNK),
    "oauth/get_authorization_url": ("oauth", "get_authorization_url", {"provider": "p", "redirect_uri": "u"},
                                    {"authorization_url": "x"}, None),
    "oauth/get_credentials": ("oauth", "get_credentials",
                              {"provider": "p", "redirect_uri": "u", "raw_http_request": "00"},
                              {"credentials": {}, "expires_at": -1}, None),
    "oauth/refresh_credentials": ("oauth", "refresh_credentials",
                                  {"provider": "p", "redirect_uri": "u", "credentials": {}},
                                  {"credentials": {}, "expires_at": -1}, None),
    "dynamic_select/fetch_parameter_options": ("dynamic_parameter", "fetch_parameter_options",
                                               {"provider": "p", "credentials": {}, "provider_action": "a",
                                                "parameter": "x"}, {"options": []}, None),
    "datasource/validate_credentials": ("datasource", "validate_datasource_credentials", {"provider": "p"},
                                        {"result": True}, None),
    "datasource/get_website_crawl": ("datasource", "invoke_website_datasource_get_crawl",
                                     {"provider": "p", "datasource": "d", "datasource_parameters": {}},
                                     {"result": {}}, None),
    "datasource/get_online_document_pages": ("datasource", "invoke_online_document_datasource_get_pages",
                                             {"provider": "p", "datasource": "d", "datasource_parameters": {}},
                                             {"result": []}, None),
    "datasource/get_online_document_page_content": ("datasource",
                                                    "invoke_online_document_datasource_get_page_content",
                                                    {"provider": "p", "datasource": "d", "page": {}},
                                                    _TOOL_CHUNK, _TOOL_CHUNK),
    "datasource/online_drive_browse_files": ("datasource", "invoke_online_drive_browse_files",
                                             {"provider": "p", "datasource": "d", "request": {"max_keys": 10}},
                                             {"result": []}, None),
    "datasource/online_drive_download_file": ("datasource", "invoke_online_drive_download_file",
                                              {"provider": "p", "datasource": "d", "request": {"id": "f"}},
                                              _TOOL_CHUNK, _TOOL_CHUNK),
    "trigger/invoke_event": ("trigger", "invoke_trigger_event",
                             {"provider": "p", "event": "e", "raw_http_request": "00", "subscription": {}},
                             {"variables": {}, "cancelled": False}, None),
    "trigger/validate_credentials": ("trigger", "validate_trigger_credentials", {"provider": "p"},
                                     {"result": True}, None),
    "trigger/dispatch_event": ("trigger", "dispatch_trigger_event",
                               {"provider": "p", "subscription": {}, "raw_http_request": "00"},
                               {"events": [], "response": ""}, None),
    "trigger/subscribe": ("trigger", "subscribe_trigger", {"provider": "p", "endpoint": "e"},
                          {"subscription": {}}, None),
    "trigger/unsubscribe": ("trigger", "unsubscribe_trigger", {"provider": "p", "subscription": {}},
                            {"subscription": {}}, None),
    "trigger/refresh": ("trigger", "refresh_trigger", {"provider": "p", "subscription": {}},
                        {"subscription": {}}, None),
}


class RouteTableTests(SynchronousTestCase):
    """Every route of §2.2 and §2.3, driven from one table."""

    def test_table_covers_every_route(self):
        """The route table holds exactly the routes of §2.2 and §2.3."""
        self.assertEqual(sorted(route.path for route in ROUTES), sorted(ROUTE_CASES))

    def test_every_route_sends_and_relays(self):
        """Each route sends its type, action and flattened data, and relays a chunk of its shape."""
        daemon = DispatchHarness(self)
        runtime = daemon.runtime
        for path, (access_type, action, data, chunk, relayed) in ROUTE_CASES.items():
            d, session = daemon.open(path, data)
            sent = runtime.requests[-1]["data"]
            self.assertEqual(sent, dict(data, user_id="user-1", type=access_type, action=action), path)
            runtime.stream(session, chunk)
            runtime.end(session)
            response, body = daemon.result(d)
            self.assertEqual(response.code, 200, path)
            expected = relayed if relayed is not None else chunk
            if path.startswith("model/polling/"):
                self.assertEqual(orjson.loads(body), {"code": 0, "message": "success", "data": expected}, path)
            else:
                self.assertEqual(items_of(body), [{"code": 0, "message": "success", "data": expected}], path)

    def test_every_route_validates(self):
        """Each route refuses an empty data object with 400."""
        daemon = DispatchHarness(self)
        for path in ROUTE_CASES:
            response, body = daemon.request(path, {})
            self.assertEqual(response.code, 400, path)
            self.assertEqual(error_of(orjson.loads(body))["error_type"], "PluginDaemonBadRequestError", path)
        self.assertEqual(daemon.runtime.requests, [])

    def test_non_object_chunk_refused(self):
        """A chunk that is not a JSON object is an unmarshal_error on every streaming route."""
        daemon = DispatchHarness(self)
        for path, (_, _, data, _, _) in ROUTE_CASES.items():
            if path.startswith("model/polling/"):
                continue
            d, session = daemon.open(path, data)
            daemon.runtime.stream(session, [1, 2])
            _, body = daemon.result(d)
            inner = orjson.loads(error_of(items_of(body)[-1])["message"])
            self.assertEqual(inner["error_type"], "unmarshal_error", path)


class ListenerInterfaceTests(SynchronousTestCase):
    """The relays are session listeners."""

    def test_relays_provide_interface(self):
        """StreamRelay and PollingRelay provide ISessionListener."""
        plugin_request = build_plugin_request("s", route_table()[b"tool/invoke"], {}, {})
        for relay_class in (StreamRelay, PollingRelay):
            self.assertTrue(verifyObject(ISessionListener, relay_class(Clock(), None, plugin_request, None)))


class ItemEncodingTests(SynchronousTestCase):
    """The pure SSE item functions."""

    def test_plugin_error_text_sorts_keys(self):
        """The plugin error's JSON has Go's sorted keys, nested ones included."""
        self.assertEqual(
            sse.plugin_error_text("E", "m", {"z": 1, "a": {"y": 2, "b": 3}}),
            '{"args":{"a":{"b":3,"y":2},"z":1},"error_type":"E","message":"m"}',
        )

    def test_protocol_error_text_has_no_args(self):
        """A daemon-detected failure's JSON has only error_type and message."""
        self.assertEqual(sse.protocol_error_text("unmarshal_error", "x"), '{"error_type":"unmarshal_error","message":"x"}')
