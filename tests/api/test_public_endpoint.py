"""
The public endpoint entrypoint ``/e/<hook_id>/<path>`` (http-api §2.6) over
the in-memory daemon: a FakeRuntime plays the plugin, the fake Dify inner
API decrypts settings.  StubTreq drives most calls; a Site over a
StringTransport shows the wire where streaming or a disconnection matters.
"""

from __future__ import annotations

import binascii

import orjson
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site
from zope.interface.verify import verifyObject

from difydaemon.api.admission import FrontDoor
from difydaemon.api.endpoint import UNKNOWN_HOOK, EndpointRelay, parse_chunk, unhex, ChunkError
from difydaemon.errors import DatabaseUnavailableError
from difydaemon.interfaces import ISessionListener
from difydaemon.invocation.session import MalformedInvokeError, parse_invoke
from difydaemon.testing.cases import SynchronousTestCase

from .endpoint_harness import EXECUTION_TIMEOUT, EndpointHarness
from .harness import TENANT, error_of


def hexed(data: bytes) -> str:
    return binascii.hexlify(data).decode()


def raw_request_of(plugin_request: dict) -> bytes:
    """The raw HTTP request a session was opened with."""
    return binascii.unhexlify(plugin_request["data"]["raw_http_request"])


class RecordingBackwards:
    """Records what it is handed; refuses malformed invokes as the real dispatcher does."""

    def __init__(self) -> None:
        self.handled = []

    def handle(self, session, data) -> None:
        parse_invoke(data)
        self.handled.append((session, data))


class RawHTTP:
    """One HTTP/1.1 connection to the daemon's Site over a StringTransport."""

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        site = Site(daemon.root, reactor=daemon.clock)
        self.protocol = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def get(self, path: str) -> None:
        """Send one GET and let the daemon work on it."""
        self.protocol.dataReceived(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: hooks.example\r\n\r\n")
        self.daemon.pump()

    def disconnect(self) -> None:
        """The client closes the connection."""
        self.protocol.connectionLost(Failure(ConnectionDone()))

    def head(self) -> bytes:
        return self.transport.value().partition(b"\r\n\r\n")[0]

    def chunks(self) -> list:
        """The HTTP chunks of the chunked response body so far."""
        _, _, body = self.transport.value().partition(b"\r\n\r\n")
        out = []
        while body:
            size_line, _, body = body.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out.append(body[:size])
            body = body[size + 2:]
        return out


class EndpointCase(SynchronousTestCase):
    """An installed endpoint plugin with one endpoint and a ready FakeRuntime."""

    backwards = None

    def setUp(self):
        super().setUp()
        self.daemon = EndpointHarness(self, backwards=self.backwards)
        self.identifier = self.daemon.install_endpoint_plugin()
        self.endpoint = self.daemon.setup_endpoint(self.identifier)
        self.hook = self.endpoint["hook_id"]
        self.runtime = self.daemon.runtime(self.identifier)

    def script(self, *replies):
        """The plugin answers every session with these (kind, data) pairs."""
        self.runtime.script(None, list(replies))

    def call(self, method="GET", path="/echo/x", **kw):
        """One /e/ call that finishes; (response, body)."""
        return self.daemon.request(method, f"/e/{self.hook}{path}", key=None, **kw)

    def start(self, method="GET", path="/echo/x", **kw):
        """Start one /e/ call; (response Deferred, session id)."""
        d = self.daemon.send(method, f"/e/{self.hook}{path}", **kw)
        self.assertTrue(self.runtime.requests, "no session was opened")
        return d, self.runtime.last_session_id

    def envelope_error(self, body: bytes) -> tuple:
        env = orjson.loads(body)
        self.assertIsNone(env["data"])
        return env["code"], error_of(env)


class ForwardingTests(EndpointCase):
    """What the plugin is sent, and how its answer is written."""

    def test_session_request(self):
        """The session is endpoint/invoke_endpoint with the endpoint id, no user and decrypted settings."""
        self.script(("stream", {"status": 200, "headers": {}, "result": ""}), ("end", {}))
        self.call(path="/echo/a%20b?z=1&a=2")
        [request] = self.runtime.requests
        self.assertEqual(
            list(request),
            ["session_id", "conversation_id", "message_id", "app_id", "endpoint_id", "context", "event", "data"],
        )
        self.assertEqual(request["endpoint_id"], self.endpoint["id"])
        self.assertEqual(request["event"], "request")
        self.assertIsNone(request["context"])
        data = request["data"]
        self.assertEqual((data["type"], data["action"], data["user_id"]), ("endpoint", "invoke_endpoint", ""))
        self.assertEqual(data["settings"], {"api_key": "supersecret", "greeting": "hello"})
        raw = raw_request_of(request)
        self.assertTrue(raw.startswith(b"GET /echo/a%20b?a=2&z=1 HTTP/1.1\r\nHost: daemon.test\r\n"), raw)
        self.assertIn(b"\r\nDify-Hook-Id: " + self.hook.encode() + b"\r\n", raw)
        self.assertIn(b"\r\nDify-Hook-Url: http://daemon.test/e/" + self.hook.encode() + b"/echo/a b\r\n", raw)

    def test_post_body_forwarded(self):
        """A POST body reaches the plugin with its length."""
        self.script(("stream", {"status": 204, "headers": {}}), ("end", {}))
        response, body = self.call("POST", "/json", data=b'{"k": [1, 2]}', headers={"Content-Type": "application/json"})
        self.assertEqual(response.code, 204)
        raw = raw_request_of(self.runtime.requests[0])
        self.assertTrue(raw.startswith(b"POST /json HTTP/1.1\r\nHost: daemon.test\r\nContent-Length: 13\r\n"), raw)
        self.assertIn(b"\r\nContent-Type: application/json\r\n", raw)
        self.assertTrue(raw.endswith(b'/json\r\n\r\n{"k": [1, 2]}'), raw)

    def test_answer_written(self):
        """Status, headers and hex-decoded body of the plugin make the response."""
        self.script(
            ("stream", {"status": 201, "headers": {"Content-Type": "application/json", "X-Thing": "one"},
                        "result": hexed(b'{"ok": true}')}),
            ("end", {}),
        )
        response, body = self.call()
        self.assertEqual(response.code, 201)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(response.headers.getRawHeaders("x-thing"), ["one"])
        self.assertEqual(body, b'{"ok": true}')

    def test_status_and_headers_gather(self):
        """Status and headers of several chunks add up; the first value of a header wins."""
        self.script(
            ("stream", {"status": 202}),
            ("stream", {"headers": {"x-first": "a"}}),
            ("stream", {"status": 203, "headers": {"X-First": "b", "X-Second": "c"}}),
            ("stream", {"result": hexed(b"one")}),
            ("stream", {"status": 500, "headers": {"X-Late": "ignored"}, "result": hexed(b"two")}),
            ("end", {}),
        )
        response, body = self.call()
        self.assertEqual(response.code, 203)
        self.assertEqual(response.headers.getRawHeaders("x-first"), ["a"])
        self.assertEqual(response.headers.getRawHeaders("x-second"), ["c"])
        self.assertIsNone(response.headers.getRawHeaders("x-late"))
        self.assertEqual(body, b"onetwo")

    def test_no_status_is_200(self):
        """Without a status (or with an informational one) the response is 200."""
        self.script(("stream", {"result": hexed(b"x")}), ("end", {}))
        self.assertEqual(self.call()[0].code, 200)
        self.script(("stream", {"status": 100, "result": hexed(b"x")}), ("end", {}))
        self.assertEqual(self.call()[0].code, 200)

    def test_end_without_body(self):
        """A session that ends after status and headers only answers them with an empty body."""
        self.script(("stream", {"status": 404, "headers": {"X-Why": "gone"}}), ("end", {}))
        response, body = self.call()
        self.assertEqual((response.code, body), (404, b""))
        self.assertEqual(response.headers.getRawHeaders("x-why"), ["gone"])
        self.assertIsNone(response.headers.getRawHeaders("content-type"))

    def test_head(self):
        """HEAD is forwarded and answered without a body."""
        self.script(("stream", {"status": 200, "headers": {"Content-Length": "5"}, "result": hexed(b"hello")}), ("end", {}))
        response, body = self.call("HEAD")
        self.assertEqual((response.code, body), (200, b""))
        self.assertTrue(raw_request_of(self.runtime.requests[0]).startswith(b"HEAD /echo/x HTTP/1.1"))

    def test_body_streamed_as_it_comes(self):
        """Each result chunk is written when it arrives, before the session ends."""
        http = RawHTTP(self.daemon)
        http.get(f"/e/{self.hook}/stream")
        session = self.runtime.last_session_id
        self.runtime.stream(session, {"status": 200, "headers": {"Content-Type": "text/plain"}})
        self.assertEqual(http.transport.value(), b"")
        self.runtime.stream(session, {"result": hexed(b"line-0\n")})
        self.assertIn(b"HTTP/1.1 200 OK", http.head())
        self.assertEqual(http.chunks(), [b"line-0\n"])
        self.runtime.stream(session, {"result": hexed(b"line-1\n")})
        self.assertEqual(http.chunks(), [b"line-0\n", b"line-1\n"])
        self.runtime.end(session)
        self.assertTrue(http.transport.value().endswith(b"0\r\n\r\n"))

    def test_disconnect_closes_session(self):
        """A client that goes away closes the plugin session; nothing more is written."""
        before = set(self.daemon.clock.getDelayedCalls())
        http = RawHTTP(self.daemon)
        http.get(f"/e/{self.hook}/stream")
        session = self.runtime.last_session_id
        self.runtime.stream(session, {"status": 200, "result": hexed(b"a")})
        written = http.transport.value()
        http.disconnect()
        self.assertFalse(self.runtime.is_open(session))
        # the timeout timer went with the session
        self.assertEqual(
            [c for c in set(self.daemon.clock.getDelayedCalls()) - before if c.active()], []
        )
        self.runtime.stream(session, {"result": hexed(b"late")})
        self.daemon.clock.advance(EXECUTION_TIMEOUT * 2)
        self.assertEqual(http.transport.value(), written)

    def test_content_length_respected(self):
        """No more body than the plugin's Content-Length is written; a short body drops the connection."""
        http = RawHTTP(self.daemon)
        http.get(f"/e/{self.hook}/x")
        session = self.runtime.last_session_id
        self.runtime.stream(session, {"status": 200, "headers": {"Content-Length": "4"}, "result": hexed(b"abcdef")})
        self.runtime.end(session)
        self.assertTrue(http.transport.value().endswith(b"\r\n\r\nabcd"))
        self.assertFalse(http.transport.disconnecting)
        http = RawHTTP(self.daemon)
        http.get(f"/e/{self.hook}/x")
        session = self.runtime.last_session_id
        self.runtime.stream(session, {"status": 200, "headers": {"Content-Length": "10"}, "result": hexed(b"abc")})
        self.runtime.end(session)
        self.assertTrue(http.transport.value().endswith(b"\r\n\r\nabc"))
        self.assertTrue(http.transport.disconnecting)

    def test_transfer_encoding_not_copied(self):
        """A Transfer-Encoding header of the plugin is not copied: framing is the server's."""
        http = RawHTTP(self.daemon)
        http.get(f"/e/{self.hook}/x")
        session = self.runtime.last_session_id
        self.runtime.stream(session, {"status": 200, "headers": {"Transfer-Encoding": "chunked"}, "result": hexed(b"ab")})
        self.runtime.end(session)
        self.assertEqual(http.head().lower().count(b"transfer-encoding"), 1)
        self.assertEqual(http.chunks(), [b"ab"])


class FailureTests(EndpointCase):
    """Refusals and failures, before and after the body started."""

    def test_unknown_hook(self):
        """An unknown hook id is 404 with the -400 'endpoint not found' envelope."""
        response, body = self.daemon.request("GET", "/e/abcdefghijklmnop/x", key=None)
        self.assertEqual(response.code, 404)
        self.assertEqual(self.envelope_error(body), (-400, {
            "message": "endpoint not found", "error_type": "PluginDaemonBadRequestError", "args": None}))

    def test_disabled(self):
        """A disabled endpoint is 404 with the -404 'endpoint not found' envelope; enabled again it answers."""
        self.daemon.ok("POST", f"/plugin/{TENANT}/endpoint/disable", json={"endpoint_id": self.endpoint["id"]})
        response, body = self.call()
        self.assertEqual(response.code, 404)
        self.assertEqual(self.envelope_error(body)[0], -404)
        self.assertEqual(self.runtime.requests, [])
        self.daemon.ok("POST", f"/plugin/{TENANT}/endpoint/enable", json={"endpoint_id": self.endpoint["id"]})
        self.script(("stream", {"status": 200, "result": hexed(b"back")}), ("end", {}))
        self.assertEqual(self.call()[1], b"back")

    def test_uninstalled(self):
        """An endpoint whose plugin is uninstalled is 404 'plugin installation not found'."""
        listing = self.daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 10})
        self.daemon.ok("POST", f"/plugin/{TENANT}/management/uninstall",
                       json={"plugin_installation_id": listing["list"][0]["id"]})
        response, body = self.call()
        self.assertEqual(response.code, 404)
        self.assertEqual(self.envelope_error(body)[1]["message"], "plugin installation not found")

    def test_removed(self):
        """A removed endpoint's hook is unknown."""
        self.daemon.ok("POST", f"/plugin/{TENANT}/endpoint/remove", json={"endpoint_id": self.endpoint["id"]})
        self.assertEqual(self.call()[0].code, 404)

    def test_routes_not_served(self):
        """PATCH, other methods and /e/ without a hook id are the route-not-found 404."""
        for method, path in (("PATCH", f"/e/{self.hook}/x"), ("TRACE", f"/e/{self.hook}/x"), ("GET", "/e/"), ("GET", "/e")):
            response, body = self.daemon.request(method, path, key=None)
            self.assertEqual(response.code, 404, (method, path))
            self.assertEqual(orjson.loads(body), {"code": "not_found", "message": "route not found"})

    def test_no_runtime(self):
        """When no runtime appears within the wait, the call is 404 PluginNotFoundError saying why."""
        self.daemon.registry.unregister(self.runtime)
        d = self.daemon.send("GET", f"/e/{self.hook}/x")
        self.assertNoResult(d)
        self.daemon.wait(2.4)
        self.assertNoResult(d)
        self.daemon.wait(3)
        response, body = self.daemon._finish(d)
        self.assertEqual(response.code, 404)
        code, error = self.envelope_error(body)
        self.assertEqual((code, error["error_type"]), (-404, "PluginNotFoundError"))
        self.assertTrue(error["message"].startswith("failed to get plugin runtime"), error)

    def test_database_unavailable(self):
        """A database outage answers a 500 envelope that says so, and logs no failure."""
        self.daemon.persistence.get_endpoint_by_hook_id = lambda hook_id: fail(
            DatabaseUnavailableError("cannot connect")
        )
        response, body = self.call()
        self.assertEqual(response.code, 500)
        code, error = self.envelope_error(body)
        self.assertEqual((code, error["message"]), (-500, "database unavailable: cannot connect"))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_runtime_that_starts_meanwhile(self):
        """A runtime that becomes ready during the wait serves the call."""
        self.runtime.ready = False
        self.script(("stream", {"status": 200, "result": hexed(b"late")}), ("end", {}))
        d = self.daemon.send("GET", f"/e/{self.hook}/x")
        self.daemon.wait(1)
        self.assertEqual(self.runtime.requests, [])
        self.runtime.ready = True
        self.daemon.wait(0.5)
        response, body = self.daemon._finish(d)
        self.assertEqual((response.code, body), (200, b"late"))

    def test_runtime_never_ready(self):
        """A runtime that stays unready is 500 'failed to get plugin runtime'."""
        self.runtime.ready = False
        d = self.daemon.send("GET", f"/e/{self.hook}/x")
        self.daemon.wait(5)
        response, body = self.daemon._finish(d)
        self.assertEqual(response.code, 500)
        self.assertTrue(self.envelope_error(body)[1]["message"].startswith("failed to get plugin runtime"), body)

    def test_decrypt_failure(self):
        """When Dify cannot decrypt the settings the call is 500 'failed to decrypt settings: ...'."""
        self.daemon.inner.error("invoke/encrypt", "no key")
        response, body = self.call()
        self.assertEqual(response.code, 500)
        self.assertEqual(self.envelope_error(body)[1]["message"], "failed to decrypt settings: no key")
        self.assertEqual(self.runtime.requests, [])

    def test_plugin_error_before_body(self):
        """A plugin error before any body is a 500 envelope carrying the plugin's error JSON."""
        self.script(("error", {"error_type": "ValueError", "message": "bad", "args": {}}), ("end", {}))
        response, body = self.call()
        self.assertEqual(response.code, 500)
        code, inner = self.envelope_error(body)
        self.assertEqual((code, inner["error_type"]), (-500, "PluginDaemonInternalServerError"))
        self.assertEqual(orjson.loads(inner["message"]), {"args": {}, "error_type": "ValueError", "message": "bad"})

    def test_plugin_error_mid_body(self):
        """A plugin error after the body started is appended to the body."""
        self.script(
            ("stream", {"status": 200, "result": hexed(b"partial:")}),
            ("error", {"error_type": "ValueError", "message": "bad", "args": None}),
        )
        response, body = self.call()
        self.assertEqual(response.code, 200)
        self.assertEqual(body, b'partial:{"args":null,"error_type":"ValueError","message":"bad"}')

    def test_timeout_before_body(self):
        """No body within PLUGIN_MAX_EXECUTION_TIMEOUT: 500 'killed by timeout' and the session closed."""
        d, session = self.start()
        self.daemon.clock.advance(EXECUTION_TIMEOUT)
        response, body = self.daemon._finish(d)
        self.assertEqual(response.code, 500)
        self.assertEqual(self.envelope_error(body)[1]["message"], "killed by timeout")
        self.assertFalse(self.runtime.is_open(session))

    def test_timeout_mid_body(self):
        """A timeout after the body started appends the timeout envelope and ends the response."""
        d, session = self.start()
        self.runtime.stream(session, {"status": 200, "result": hexed(b"so far ")})
        self.daemon.clock.advance(EXECUTION_TIMEOUT)
        response, body = self.daemon._finish(d)
        self.assertEqual(response.code, 200)
        prefix, envelope_json = body[:7], body[7:]
        self.assertEqual(prefix, b"so far ")
        self.assertEqual(error_of(orjson.loads(envelope_json))["message"], "killed by timeout")
        self.assertFalse(self.runtime.is_open(session))

    def test_runtime_own_timeout(self):
        """A runtime that times sessions out itself gets no second timer; its timeout is a 500."""
        self.daemon.registry.unregister(self.runtime)
        runtime = self.daemon.runtime(self.identifier, session_timeout=5.0)
        before = set(self.daemon.clock.getDelayedCalls())
        d = self.daemon.send("GET", f"/e/{self.hook}/x")
        self.assertEqual(len(runtime.requests), 1)
        # the runtime's own timer is the only new one
        self.assertEqual(len(set(self.daemon.clock.getDelayedCalls()) - before), 1)
        self.daemon.clock.advance(5.0)
        response, body = self.daemon._finish(d)
        self.assertEqual(response.code, 500)
        self.assertEqual(self.envelope_error(body)[1]["message"], "killed by timeout")
        self.assertEqual(set(self.daemon.clock.getDelayedCalls()) - before, set())

    def test_bad_chunks(self):
        """A malformed chunk or hex before the body is a 500; bad hex mid-body just ends the body."""
        for chunk in ({"status": "200"}, {"headers": {"a": 1}}, {"result": 5}, {"status": 42}, {"result": "zz"}):
            self.script(("stream", chunk), ("end", {}))
            response, body = self.call()
            self.assertEqual(response.code, 500, chunk)
            self.assertEqual(self.envelope_error(body)[0], -500)
            self.assertFalse(self.runtime.is_open(self.runtime.last_session_id))
        self.script(("stream", {"status": 200, "result": hexed(b"ok")}), ("stream", {"result": "xyz"}),
                    ("stream", {"result": hexed(b"never")}), ("end", {}))
        response, body = self.call()
        self.assertEqual((response.code, body), (200, b"ok"))


class BackwardsRefusedTests(EndpointCase):
    """Without a backwards dispatcher, invocations are refused at once."""

    def test_refused(self):
        """An invoke gets an error and an end naming that backwards invocation is not available."""
        d, session = self.start()
        self.runtime.invoke(session, {"type": "tool", "backwards_request_id": "b1", "request": {}})
        [(_, error), (_, end)] = self.runtime.sent
        self.assertEqual(error["event"], "backwards_response")
        self.assertEqual(error["endpoint_id"], self.endpoint["id"])
        self.assertEqual(error["data"], {"backwards_request_id": "b1", "event": "error",
                                         "message": "backwards invocation is not available", "data": None})
        self.assertEqual(end["data"]["event"], "end")
        self.runtime.stream(session, {"status": 200, "result": hexed(b"fine")})
        self.runtime.end(session)
        self.assertEqual(self.daemon._finish(d)[1], b"fine")


class BackwardsTests(EndpointCase):
    """With a backwards dispatcher, invocations are handed over with their session."""

    def setUp(self):
        self.backwards = RecordingBackwards()
        super().setUp()

    def test_handed_over(self):
        """The dispatcher gets the endpoint session: tenant, no user, plugin, type and declaration."""
        d, session_id = self.start()
        invoke = {"type": "storage", "backwards_request_id": "b1", "request": {"opt": "get", "key": "k"}}
        self.runtime.invoke(session_id, invoke)
        [(session, data)] = self.backwards.handled
        self.assertEqual(data, invoke)
        self.assertEqual(
            (session.tenant_id, session.user_id, session.plugin_id, session.access_type, session.session_id),
            (TENANT, "", "acme/hooks", "endpoint", session_id),
        )
        self.assertIs(session.runtime, self.runtime)
        self.assertIn("endpoint", session.declaration)
        self.assertEqual(session.session_request, self.runtime.requests[-1])
        self.runtime.stream(session_id, {"status": 200, "result": hexed(b"x")})
        self.runtime.end(session_id)
        self.assertEqual(self.daemon._finish(d)[0].code, 200)

    def test_malformed_invoke_closes(self):
        """A malformed invoke closes the session with an invoke_dify_error."""
        d, session_id = self.start()
        self.runtime.invoke(session_id, {"type": "tool"})
        response, body = self.daemon._finish(d)
        self.assertEqual(response.code, 500)
        inner = orjson.loads(self.envelope_error(body)[1]["message"])
        self.assertEqual(inner, {"error_type": "invoke_dify_error", "message": "invoke dify failed: malformed invoke request"})
        self.assertFalse(self.runtime.is_open(session_id))
        self.assertRaises(MalformedInvokeError, parse_invoke, {"type": "tool"})


class PieceTests(SynchronousTestCase):
    """The pure pieces of the relay."""

    def test_relay_is_listener(self):
        """EndpointRelay provides ISessionListener."""
        self.assertTrue(verifyObject(ISessionListener, EndpointRelay(None, None)))

    def test_parse_chunk(self):
        """Chunks parse into (status, headers, result), nulls as absent."""
        self.assertEqual(parse_chunk({"status": 200, "headers": {"a": "b"}, "result": "00"}), (200, {"a": "b"}, "00"))
        self.assertEqual(parse_chunk({"status": None, "extra": 1}), (None, None, None))
        for bad in ([], {"status": True}, {"status": 70000}, {"status": 1.5}, {"headers": []}, {"result": []}):
            self.assertRaises(ChunkError, parse_chunk, bad)

    def test_unhex(self):
        """Hex decodes; odd length and bad digits fail in Go's words."""
        self.assertEqual(unhex("6869"), b"hi")
        self.assertEqual(str(self.assertRaises(ValueError, unhex, "686")), "encoding/hex: odd length hex string")
        self.assertEqual(str(self.assertRaises(ValueError, unhex, "zz")), "encoding/hex: invalid byte")
        self.assertRaises(ValueError, unhex, "é1")


class WiringTests(SynchronousTestCase):
    """build_daemon mounts /e/ only when PLUGIN_ENDPOINT_ENABLED; the endpoint routes always."""

    def build(self, **variables):
        from twisted.internet.testing import MemoryReactorClock

        from difydaemon import tap
        from difydaemon.config import load_config
        from tests.test_tap import environment

        environ = environment(self.mktemp(), 5002)
        environ.update(variables)
        return tap.build_daemon(MemoryReactorClock(), load_config(environ))

    def child(self, service, name: bytes):
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b"hook", b"x"])
        request.prepath = [name]
        # the root routes on the canonical form of the request's target
        request.uri = b"/" + name + b"/hook/x"
        return service.site.resource.getChildWithDefault(name, request)

    def test_enabled_by_default(self):
        """By default /e/ is served by the EndpointResource, wired with the backwards dispatcher."""
        from difydaemon.api.endpoint import EndpointResource
        from difydaemon.management.endpoints import Endpoints

        service = self.build()
        self.assertIsInstance(service.public_endpoints, EndpointResource)
        self.assertIs(self.child(service, b"e"), service.public_endpoints)
        self.assertIs(service.public_endpoints._backwards, service.backwards)
        self.assertIsInstance(service.endpoints, Endpoints)

    def test_disabled(self):
        """With PLUGIN_ENDPOINT_ENABLED=false, /e/ falls through to the 404 of unknown routes."""
        from treq.testing import StubTreq

        service = self.build(PLUGIN_ENDPOINT_ENABLED="false")
        self.assertIsNone(service.public_endpoints)
        self.assertIsNotNone(service.endpoints)
        stub = StubTreq(service.site.resource)
        d = stub.get("http://daemon.test/e/abcdefghijklmnop/x")
        stub.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 404)
        body = stub.content(response)
        stub.flush()
        self.assertEqual(orjson.loads(self.successResultOf(body)), {"code": "not_found", "message": "route not found"})


class BeforeBodyTests(EndpointCase):
    """The check the HTTP channels make on an /e/ call's head, before its body is read."""

    def decision(self, target: bytes):
        """What before_body answers for ``target`` (Deferred fired at once: in-memory persistence)."""
        result = self.daemon.public.before_body(FrontDoor(b"k").admit(b"POST", target, None, None))
        if result is None:
            return "not asked"
        return self.successResultOf(result)

    def test_unknown_hook_refused(self):
        """A hook id no endpoint has is the endpoint's 404 envelope; a known one passes."""
        refused = self.decision(b"/e/no-such-hook/x")
        self.assertIs(refused, UNKNOWN_HOOK)
        self.assertEqual(refused.status, 404)
        self.assertEqual(error_of(orjson.loads(refused.body))["message"], "endpoint not found")
        self.assertIsNone(self.decision(f"/e/{self.hook}/x".encode()))

    def test_impossible_hook_ids(self):
        """An over-long hook id (wider than the column) is refused without asking the database."""
        for target in (b"/e/" + b"h" * 128 + b"/x", b"/e/" + b"h" * 128):
            self.assertIs(self.decision(target), UNKNOWN_HOOK, target)

    def test_other_routes_not_asked(self):
        """Requests that are no endpoint call are not held."""
        for target in (b"/e", b"/nowhere", b"/health/check"):
            self.assertEqual(self.decision(target), "not asked", target)
