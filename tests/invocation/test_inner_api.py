"""
Tests for difydaemon.invocation.inner_api: the Dify inner API client, over
StubTreq against the fake inner API on a fake clock, over an Agent on a
MemoryReactorClock for connection failures, and once over real loopback.
"""

from __future__ import annotations

import orjson
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import Agent

from difydaemon.invocation.frames import encode_frame
from difydaemon.invocation.inner_api import QUOTED_BODY_SIZE, DifyInnerAPI, InnerAPIError
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from difydaemon.testing.http import http_client
from difydaemon.testing.inner_api import LLM_PIECES, FakeDifyInnerAPI, base_url, default_values

KEY = "inner-api-key"
BASE = "http://dify.test:5001/"
WRITE_TIMEOUT = 5.0
READ_TIMEOUT = 240.0
MAX_FRAME = 4096
LLM_BODY = {"tenant_id": "t1", "user_id": "u1", "type": "llm", "provider": "openai", "model": "gpt-x", "stream": True}
SECRET_CONFIG = [
    {"name": "api_key", "type": "secret-input", "required": True},
    {"name": "region", "type": "text-input", "required": False},
]


def frame_of(value) -> bytes:
    """One frame carrying ``{"data": value, "error": ""}``."""
    return encode_frame(orjson.dumps({"data": value, "error": ""}))


class _Endpoints:
    """An Agent endpoint factory connecting with TCP4ClientEndpoint on a memory reactor."""

    def __init__(self, memory_reactor) -> None:
        self.reactor = memory_reactor

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(self.reactor, uri.host.decode("ascii"), uri.port)


class StubbedTests(SynchronousTestCase):
    """The client against the fake inner API through StubTreq."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.fake = FakeDifyInnerAPI(self.clock, KEY)
        self.stub = StubTreq(self.fake.resource())
        self.api = self.client()

    def client(self, key: str = KEY, max_frame_size: int = MAX_FRAME) -> DifyInnerAPI:
        return DifyInnerAPI(self.clock, self.stub, BASE, key, WRITE_TIMEOUT, READ_TIMEOUT, max_frame_size)

    def stream(self, path: str, body: dict, api: DifyInnerAPI | None = None):
        """Start a stream call; returns (its Deferred, the items list it fills)."""
        items: list = []
        d = Deferred.fromCoroutine((api or self.api).stream(path, body, items.append))
        return d, items

    def stream_error(self, path: str, body: dict | None = None, api: DifyInnerAPI | None = None):
        """The InnerAPIError of a stream call that fails at once, and the items seen before."""
        d, items = self.stream(path, body or LLM_BODY, api)
        return self.failureResultOf(d, InnerAPIError).value, items

    def single_error(self, path: str, body: dict | None = None, api: DifyInnerAPI | None = None) -> InnerAPIError:
        """The InnerAPIError of a single call that fails at once."""
        return self.failureResultOfCoroutine((api or self.api).single(path, body or {}), InnerAPIError).value

    def assertClean(self):
        """No timer is left on the clock (the client's deadline nor the fake's delays)."""
        self.stub.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    # -- what is sent -----------------------------------------------------------

    def test_url(self):
        """The URL is the base without its trailing slash, /inner/api/, then the path."""
        self.assertEqual(self.api.url("invoke/llm"), "http://dify.test:5001/inner/api/invoke/llm")

    def test_request(self):
        """A call POSTs the body as JSON with the key and a JSON content type."""
        d, _ = self.stream("invoke/llm", LLM_BODY)
        self.successResultOf(d)
        [received] = self.fake.received
        self.assertEqual(received.path, "invoke/llm")
        self.assertEqual(received.body, LLM_BODY)
        self.assertEqual(received.headers["x-inner-api-key"], KEY)
        self.assertEqual(received.headers["content-type"], "application/json")
        self.assertClean()

    # -- streams ----------------------------------------------------------------

    def test_stream_items_in_order(self):
        """Each frame's data is handed to on_item, in order, and the call ends with the stream."""
        d, items = self.stream("invoke/llm", LLM_BODY)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(items, default_values("invoke/llm", LLM_BODY))
        self.assertEqual([i["delta"]["message"]["content"] for i in items], list(LLM_PIECES))

    def test_stream_items_as_they_arrive(self):
        """Items are handed over as their frames arrive, before the stream ends."""
        self.fake.slow("invoke/tool", 3.0, after=1)
        body = {"tool_type": "builtin", "provider": "p", "tool": "t", "tool_parameters": {"q": "x"}}
        d, items = self.stream("invoke/tool", body)
        self.stub.flush()
        self.assertNoResult(d)
        self.assertEqual(items, default_values("invoke/tool", body)[:1])
        self.clock.advance(3.0)
        self.stub.flush()
        self.successResultOf(d)
        self.assertEqual(items, default_values("invoke/tool", body))
        self.assertClean()

    def test_empty_stream(self):
        """A 200 answer with no frames at all is an empty stream."""
        self.fake.garbage("invoke/app", b"")
        d, items = self.stream("invoke/app", {})
        self.successResultOf(d)
        self.assertEqual(items, [])

    def test_stream_error_frame(self):
        """A frame whose error is set fails the call with that exact message, after the items before it."""
        self.fake.error("invoke/llm", "model gpt-x not found", items=[{"n": 1}])
        error, items = self.stream_error("invoke/llm")
        self.assertEqual(error.message, "model gpt-x not found")
        self.assertEqual(str(error), "model gpt-x not found")
        self.assertEqual(items, [{"n": 1}])

    def test_stream_null_data(self):
        """A frame with null data and no error is an error."""
        self.fake.answer("invoke/llm", [{"n": 1}, None])
        error, items = self.stream_error("invoke/llm")
        self.assertIn("no data", error.message)
        self.assertEqual(items, [{"n": 1}])

    def test_stream_garbage(self):
        """A body that is not frames (an HTML page with status 200) is an error naming the bad frame."""
        self.fake.garbage("invoke/llm", b"<html>oops</html>")
        error, items = self.stream_error("invoke/llm")
        self.assertIn("bad frame", error.message)
        self.assertEqual(items, [])

    def test_stream_invalid_json_frame(self):
        """A well-formed frame whose payload is not JSON is an error quoting the payload."""
        self.fake.garbage("invoke/llm", frame_of({"n": 1}) + encode_frame(b"not json"))
        error, items = self.stream_error("invoke/llm")
        self.assertIn("invalid JSON: not json", error.message)
        self.assertEqual(items, [{"n": 1}])

    def test_stream_truncated(self):
        """A body that ends inside a frame is an error, after the complete frames."""
        self.fake.garbage("invoke/llm", frame_of({"n": 1}) + frame_of({"n": 2})[:-3])
        error, items = self.stream_error("invoke/llm")
        self.assertIn("ended inside a frame", error.message)
        self.assertEqual(items, [{"n": 1}])

    def test_stream_oversize_frame(self):
        """A frame over max_frame_size is refused without being handed over."""
        self.fake.answer("invoke/llm", [{"n": 1}, {"big": "x" * 200}])
        error, items = self.stream_error("invoke/llm", api=self.client(max_frame_size=100))
        self.assertIn("over the limit of 100", error.message)
        self.assertEqual(items, [{"n": 1}])

    def test_on_item_raises(self):
        """An exception from on_item stops the call and propagates unchanged."""

        class Refused(Exception):
            pass

        seen = []

        def on_item(item):
            seen.append(item)
            raise Refused("no more")

        d = Deferred.fromCoroutine(self.api.stream("invoke/llm", LLM_BODY, on_item))
        self.failureResultOf(d, Refused)
        self.assertEqual(len(seen), 1)
        self.assertClean()

    # -- singles ----------------------------------------------------------------

    def test_single_plain(self):
        """A plain JSON answer gives its data."""
        body = {"model": "emb", "texts": ["a", "b c"]}
        result = self.successResultOfCoroutine(self.api.single("invoke/text-embedding", body))
        self.assertEqual(result, default_values("invoke/text-embedding", body)[0])
        self.assertClean()

    def test_single_framed(self):
        """An answer made of one frame gives the same data as the plain one."""
        fake = FakeDifyInnerAPI(self.clock, KEY, framed_singles=True)
        api = DifyInnerAPI(self.clock, StubTreq(fake.resource()), BASE, KEY, WRITE_TIMEOUT, READ_TIMEOUT, MAX_FRAME)
        body = {"model": "rr", "docs": ["a", "b"], "query": "q"}
        result = self.successResultOfCoroutine(api.single("invoke/rerank", body))
        self.assertEqual(result, default_values("invoke/rerank", body)[0])

    def test_single_two_frames(self):
        """A framed single answer with two frames is an error."""
        self.fake.answer("invoke/rerank", [{"a": 1}, {"b": 2}], framed=True)
        self.assertIn("2 frames, expected one", self.single_error("invoke/rerank").message)

    def test_single_error(self):
        """A plain answer whose error is set fails with that message, framed or not."""
        self.fake.error("invoke/moderation", "quota exceeded")
        self.assertEqual(self.single_error("invoke/moderation").message, "quota exceeded")
        self.fake.error("invoke/moderation", "quota exceeded again", framed=True)
        self.assertEqual(self.single_error("invoke/moderation").message, "quota exceeded again")

    def test_single_null_data(self):
        """A plain answer with null data and no error is an error."""
        self.fake.answer("invoke/summary", [None])
        self.assertIn("no data", self.single_error("invoke/summary").message)

    def test_single_garbage(self):
        """A body that is neither JSON nor frames is an error quoting it."""
        self.fake.garbage("invoke/summary", b"<html>oops</html>")
        self.assertIn("invalid JSON: <html>oops</html>", self.single_error("invoke/summary").message)

    def test_single_not_an_object(self):
        """JSON that is not an object is an error."""
        self.fake.garbage("invoke/summary", b"[1, 2]")
        self.assertIn("not an object", self.single_error("invoke/summary").message)

    def test_single_too_big(self):
        """A single answer over the frame limit (plus framing) is refused."""
        self.fake.answer("invoke/summary", [{"summary": "x" * 300}])
        error = self.single_error("invoke/summary", api=self.client(max_frame_size=100))
        self.assertIn("more than 114 bytes", error.message)

    # -- HTTP errors --------------------------------------------------------------

    def test_status_500(self):
        """A status other than 200 is an error naming it and quoting the body."""
        self.fake.fail("invoke/llm", 500, b"Internal Server Error: boom")
        error, items = self.stream_error("invoke/llm")
        self.assertIn("status code 500", error.message)
        self.assertIn("Internal Server Error: boom", error.message)
        self.assertEqual(items, [])
        self.fake.fail("invoke/summary", 502, b"bad gateway")
        self.assertIn("status code 502: bad gateway", self.single_error("invoke/summary").message)
        self.assertClean()

    def test_status_body_quote_bounded(self):
        """Only the head of a long error body is quoted."""
        self.fake.fail("invoke/summary", 500, b"e" * (QUOTED_BODY_SIZE * 20))
        error = self.single_error("invoke/summary")
        self.assertTrue(error.message.endswith("e..."), error.message[-20:])
        self.assertLess(len(error.message), QUOTED_BODY_SIZE + 100)

    def test_wrong_key(self):
        """A wrong key gets Dify's 404, reported as such."""
        error, _ = self.stream_error("invoke/llm", api=self.client(key="wrong"))
        self.assertIn("status code 404", error.message)
        self.assertIn("Not Found", error.message)

    # -- timeouts and cancellation ----------------------------------------------

    def test_read_timeout_before_answer(self):
        """A server silent for the whole read timeout fails the call as timed out and is hung up on."""
        self.fake.slow("invoke/llm", 1000.0)
        d, items = self.stream("invoke/llm", LLM_BODY)
        self.clock.advance(READ_TIMEOUT - 1)
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(1)
        error = self.failureResultOf(d, InnerAPIError).value
        self.assertEqual(error.message, "call to dify inner api invoke/llm timed out after 240 seconds")
        self.assertEqual(items, [])
        # Klein saw the client go and cancelled the fake's delayed answer.
        self.assertClean()

    def test_read_timeout_inside_body(self):
        """The read timeout covers the body too: a stream stalled after some frames is cut off."""
        self.fake.slow("invoke/llm", 1000.0, after=2)
        d, items = self.stream("invoke/llm", LLM_BODY)
        self.stub.flush()
        self.assertEqual(len(items), 2)
        self.clock.advance(READ_TIMEOUT)
        self.assertIn("timed out", self.failureResultOf(d, InnerAPIError).value.message)
        self.assertEqual(len(items), 2)
        self.assertClean()

    def test_single_read_timeout(self):
        """A single call is bounded by the read timeout as well."""
        self.fake.slow("invoke/summary", 1000.0)
        d = Deferred.fromCoroutine(self.api.single("invoke/summary", {"text": "t"}))
        self.clock.advance(READ_TIMEOUT)
        self.assertIn("timed out", self.failureResultOf(d, InnerAPIError).value.message)
        self.assertClean()

    def test_slow_but_in_time(self):
        """An answer that comes before the read timeout succeeds and leaves no timer behind."""
        self.fake.slow("invoke/summary", READ_TIMEOUT - 1)
        d = Deferred.fromCoroutine(self.api.single("invoke/summary", {"text": "t"}))
        self.clock.advance(READ_TIMEOUT - 1)
        self.stub.flush()
        self.assertEqual(self.successResultOf(d), {"summary": "summary: t"})
        self.assertClean()

    def test_cancel(self):
        """Cancelling a call in its body closes the connection and cancels the deadline."""
        self.fake.slow("invoke/llm", 1000.0, after=1)
        d, items = self.stream("invoke/llm", LLM_BODY)
        self.stub.flush()
        self.assertEqual(len(items), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertClean()

    # -- encrypt ----------------------------------------------------------------

    def test_encrypt_skipped_without_secrets(self):
        """Without a secret-input field, encrypt returns the data itself and calls nobody."""
        data = {"region": "eu"}
        config = [{"name": "region", "type": "text-input"}]
        for opt in ("encrypt", "decrypt", "clear"):
            result = self.successResultOfCoroutine(self.api.encrypt("t1", "u1", opt, "endpoint", "e1", data, config))
            self.assertIs(result, data)
        self.assertEqual(self.fake.received, [])

    def test_encrypt_call(self):
        """With a secret-input field, encrypt POSTs invoke/encrypt and returns the inner data."""
        data = {"api_key": "sk-1", "region": "eu"}
        result = self.successResultOfCoroutine(
            self.api.encrypt("t1", "u1", "encrypt", "endpoint", "e1", data, SECRET_CONFIG)
        )
        self.assertEqual(result, {"api_key": "enc:sk-1", "region": "eu"})
        [received] = self.fake.received
        self.assertEqual(received.path, "invoke/encrypt")
        self.assertEqual(
            received.body,
            {
                "tenant_id": "t1",
                "user_id": "u1",
                "type": "encrypt",
                "opt": "encrypt",
                "namespace": "endpoint",
                "identity": "e1",
                "data": data,
                "config": SECRET_CONFIG,
            },
        )
        back = self.successResultOfCoroutine(
            self.api.encrypt("t1", "u1", "decrypt", "endpoint", "e1", result, SECRET_CONFIG)
        )
        self.assertEqual(back, data)

    def test_encrypt_malformed_answer(self):
        """An encrypt answer without an inner data object is an error."""
        self.fake.answer("invoke/encrypt", [{"nothing": 1}])
        d = Deferred.fromCoroutine(self.api.encrypt("t1", "u1", "encrypt", "endpoint", "e1", {}, SECRET_CONFIG))
        self.assertIn("no data object", self.failureResultOf(d, InnerAPIError).value.message)


class ConnectionTests(SynchronousTestCase):
    """Connection failures, over a real Agent on a MemoryReactorClock."""

    def setUp(self):
        super().setUp()
        self.reactor = MemoryReactorClock()
        agent = Agent.usingEndpointFactory(self.reactor, _Endpoints(self.reactor))
        self.api = DifyInnerAPI(
            self.reactor, HTTPClient(agent), "http://127.0.0.1:5001", KEY, WRITE_TIMEOUT, READ_TIMEOUT, MAX_FRAME
        )

    def test_refused(self):
        """A refused connection fails the call, naming the reason."""
        d = Deferred.fromCoroutine(self.api.single("invoke/summary", {}))
        self.assertNoResult(d)
        host, port, factory, _, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port), ("127.0.0.1", 5001))
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError("Connection refused")))
        error = self.failureResultOf(d, InnerAPIError).value
        self.assertTrue(error.message.startswith("failed to call dify inner api invoke/summary: "), error.message)
        self.assertIn("Connection refused", error.message)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_never_connects(self):
        """A connection that never completes is given up at the read timeout."""
        d = Deferred.fromCoroutine(self.api.stream("invoke/llm", {}, lambda item: None))
        self.reactor.advance(READ_TIMEOUT)
        self.assertIn("timed out", self.failureResultOf(d, InnerAPIError).value.message)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_default_client_uses_write_timeout(self):
        """Without a client, one is built whose connect timeout is the write timeout."""
        api = DifyInnerAPI(self.reactor, None, "http://127.0.0.1:5002", KEY, 3.5, READ_TIMEOUT, MAX_FRAME)
        d = Deferred.fromCoroutine(api.single("invoke/summary", {}))
        host, port, _, timeout, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 5002, 3.5))
        self.reactor.advance(READ_TIMEOUT)
        self.failureResultOf(d, InnerAPIError)


class LoopbackTests(AsyncTestCase):
    """The client against the fake served over real loopback TCP."""

    async def test_stream_and_down(self):
        """A stream and a single work over TCP; once the fake stops, calls fail with the connection error."""
        fake = FakeDifyInnerAPI(reactor, KEY, framed_singles=True)
        port = await fake.listen()
        self.addCleanup(fake.stop)
        api = DifyInnerAPI(reactor, http_client(self, reactor), base_url(port), KEY, WRITE_TIMEOUT, 10.0, MAX_FRAME)
        items: list = []
        await api.stream("invoke/llm", LLM_BODY, items.append)
        self.assertEqual([i["delta"]["message"]["content"] for i in items], list(LLM_PIECES))
        self.assertEqual(await api.single("invoke/moderation", {"text": "fine"}), {"result": False})
        await fake.stop()
        with self.assertRaises(InnerAPIError) as caught:
            await api.single("invoke/moderation", {"text": "fine"})
        self.assertIn("failed to call dify inner api invoke/moderation", caught.exception.message)
