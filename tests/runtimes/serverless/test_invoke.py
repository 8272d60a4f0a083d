"""Tests for difydaemon.runtimes.serverless.invoke: calling a function, through StubTreq."""

from __future__ import annotations

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from difydaemon.runtimes.serverless.invoke import InvokeClient, backoff, invoke_url
from difydaemon.runtimes.serverless.response import INNER_ERROR_TYPE, RUNTIME_ERROR_TYPE, Chunk, Failed, Finished
from difydaemon.testing.cases import SynchronousTestCase
from tests.runtimes.serverless.functions import FakeFunction, Reply, session_line

SID = "0e8d1f9a-1111-4222-8333-444455556666"
REQUEST = {"session_id": SID, "event": "request", "data": {"type": "tool", "action": "invoke_tool"}}
CHUNK = {"type": "text", "message": {"text": "hi"}, "meta": None}


class _Refusing:
    """A treq-like client whose connections are refused."""

    def __init__(self):
        self.calls = 0

    def post(self, *args, **kwargs):
        from twisted.internet.error import ConnectionRefusedError

        self.calls += 1
        d = Deferred()
        d.errback(ConnectionRefusedError("connection refused"))
        return d


class InvokeClientTests(SynchronousTestCase):
    """serverless.md §3.2 - §3.5."""

    def setUp(self):
        self.clock = Clock()
        self.outcomes = []

    def client(self, function, **options) -> InvokeClient:
        self.stub = StubTreq(function) if isinstance(function, FakeFunction) else None
        http = self.stub if self.stub is not None else function
        return InvokeClient(self.clock, http, **options)

    def invoke(self, client, request=REQUEST) -> Deferred:
        d = client.invoke("http://fn.example/base/", "invoke_tool", SID, request, self.outcomes.append)
        if self.stub is not None:
            self.stub.flush()
        return d

    def test_request_shape(self):
        """The call POSTs the compact request to <url>/invoke?action= with the session and JSON headers."""
        function = FakeFunction([Reply(body=[session_line(SID, "stream", CHUNK), session_line(SID, "end", None)])])
        self.successResultOf(self.invoke(self.client(function)))
        [(path, args, headers, body)] = function.requests
        self.assertEqual((path, args), ("/base/invoke", {b"action": [b"invoke_tool"]}))
        self.assertEqual(headers["dify-plugin-session-id"], SID)
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["accept"], "text/event-stream")
        self.assertEqual(body, b'{"session_id":"' + SID.encode() + b'","event":"request","data":{"type":"tool","action":"invoke_tool"}}')
        self.assertEqual([type(o) for o in self.outcomes], [Chunk, Finished])
        self.assertEqual(self.outcomes[0].data, CHUNK)

    def test_traceparent_header(self):
        """The session's traceparent also goes as the traceparent header; a request without one sends none."""
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        function = FakeFunction([Reply(body=[session_line(SID, "end", None)])] * 2)
        client = self.client(function)
        self.successResultOf(self.invoke(client, dict(REQUEST, traceparent=traceparent)))
        self.successResultOf(self.invoke(client))
        [(_, _, traced, _), (_, _, plain, _)] = function.requests
        self.assertEqual(traced["traceparent"], traceparent)
        self.assertNotIn("traceparent", plain)

    def test_url(self):
        """The action is appended to the path-joined URL."""
        self.assertEqual(invoke_url("http://f/a", "x"), "http://f/a/invoke?action=x")

    def test_oversized_request(self):
        """A request over MAX_SERVERLESS_REQUEST_BYTES fails at once, nothing sent."""
        function = FakeFunction([Reply()])
        self.successResultOf(self.invoke(self.client(function, max_request_bytes=50)))
        [failed] = self.outcomes
        self.assertTrue(failed.message.startswith("ServerlessPayloadTooLarge: action=invoke_tool payload_bytes="))
        self.assertTrue(failed.message.endswith("max_request_bytes=50"))
        self.assertEqual(function.requests, [])

    def test_502_retried(self):
        """A 502 is retried after the backoff and the next answer is used."""
        function = FakeFunction(
            [Reply(502, [b"bad gateway"]), Reply(body=[session_line(SID, "end", {})])]
        )
        d = self.invoke(self.client(function))
        self.assertEqual(len(function.requests), 1)
        self.clock.advance(0.5)
        self.stub.flush()
        self.successResultOf(d)
        self.assertEqual(len(function.requests), 2)
        self.assertEqual(self.outcomes, [Finished()])

    def test_other_status_not_retried(self):
        """4xx and 5xx other than 502 are not retried: the session fails with the status and body."""
        for status in (400, 429, 500, 503, 504):
            self.outcomes = []
            function = FakeFunction([Reply(status, [b"nope"])])
            self.successResultOf(self.invoke(self.client(function)))
            self.assertEqual(len(function.requests), 1, status)
            [failed] = self.outcomes
            self.assertEqual(failed.error_type, RUNTIME_ERROR_TYPE)
            self.assertEqual(failed.args["status_code"], status)
            self.assertTrue(failed.message.endswith(": nope"), failed.message)

    def test_lambda_error_header(self):
        """A 200 with x-amzn-ErrorType is a failure named by the header."""
        function = FakeFunction([Reply(200, [b'{"errorMessage":"oom"}'], {b"x-amzn-ErrorType": b"Function.Crash"})])
        self.successResultOf(self.invoke(self.client(function)))
        self.assertEqual(self.outcomes[0].message, "Plugin runtime request failed: Function.Crash: oom")

    def test_transport_errors_exhaust_attempts(self):
        """Refused connections are retried MAX_SERVERLESS_RETRY_TIMES attempts in all, then fail saying so."""
        refusing = _Refusing()
        d = self.invoke(self.client(refusing, max_attempts=3))
        self.clock.advance(backoff(1))
        self.clock.advance(backoff(2))
        self.successResultOf(d)
        self.assertEqual(refusing.calls, 3)
        [failed] = self.outcomes
        self.assertEqual(failed.error_type, INNER_ERROR_TYPE)
        self.assertIn("all 3 attempts failed, last error: Connection was refused", failed.message)

    def test_zero_attempts_means_one(self):
        """MAX_SERVERLESS_RETRY_TIMES ≤ 0 still makes one attempt."""
        refusing = _Refusing()
        self.successResultOf(self.invoke(self.client(refusing, max_attempts=0)))
        self.assertEqual(refusing.calls, 1)

    def test_backoff(self):
        """Backoff doubles from 0.5 s and is capped at 30 s."""
        self.assertEqual([backoff(k) for k in (1, 2, 3, 8, 20)], [0.5, 1.0, 2.0, 30.0, 30.0])

    def test_function_dies_mid_stream(self):
        """A function whose connection drops mid-stream fails the session with a read error."""
        function = FakeFunction([Reply(body=[session_line(SID, "stream", CHUNK)], hang=True)])
        d = self.invoke(self.client(function))
        self.assertNoResult(d)
        function.open_requests[0].channel.transport.loseConnection()
        self.stub.flush()
        self.successResultOf(d)
        self.assertEqual(type(self.outcomes[0]), Chunk)
        self.assertEqual(self.outcomes[-1].error_type, INNER_ERROR_TYPE)
        self.assertTrue(self.outcomes[-1].message.startswith("failed to read response body"))

    def test_deadline(self):
        """A function that goes silent fails the session after PLUGIN_MAX_EXECUTION_TIMEOUT."""
        function = FakeFunction([Reply(body=[session_line(SID, "stream", CHUNK)], hang=True)])
        d = self.invoke(self.client(function, execution_timeout=10))
        self.clock.advance(10)
        self.stub.flush()
        self.successResultOf(d)
        self.assertIn("PLUGIN_MAX_EXECUTION_TIMEOUT", self.outcomes[-1].message)

    def test_deadline_scheduled_once_the_request_is_written(self):
        """The request goes out before the call's deadline is scheduled; the deadline still ends a call never answered."""
        scheduled_at_post = []

        class Silent:
            def post(inner, *args, **kwargs):
                scheduled_at_post.append(len(self.clock.getDelayedCalls()))
                return Deferred()

        d = self.invoke(self.client(Silent(), execution_timeout=10))
        self.assertEqual((scheduled_at_post, len(self.clock.getDelayedCalls())), ([0], 1))
        self.clock.advance(10)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIn("PLUGIN_MAX_EXECUTION_TIMEOUT", self.outcomes[-1].message)

    def test_line_over_max_buffer(self):
        """A response line over PLUGIN_RUNTIME_MAX_BUFFER_SIZE fails the session and stops reading."""
        function = FakeFunction([Reply(body=[b"x" * 500], hang=True)])
        d = self.invoke(self.client(function, max_line_size=100))
        self.successResultOf(d)
        self.assertEqual([type(o) for o in self.outcomes], [Failed])
        self.assertIn("longer than the 100 bytes allowed", self.outcomes[0].message)

    def test_body_drained_after_end(self):
        """After the session's end the rest of the body is read, not hung up on, so the connection stays reusable."""
        function = FakeFunction([Reply(body=[session_line(SID, "end", None)], hang=True)])
        d = self.invoke(self.client(function))
        self.assertEqual(self.outcomes, [Finished()])
        self.assertNoResult(d)
        [request] = function.open_requests
        gone = []
        request.notifyFinish().addErrback(gone.append)
        request.write(b"\n\n")
        request.finish()
        self.stub.flush()
        self.successResultOf(d)
        self.assertEqual((gone, self.outcomes), ([], [Finished()]))

    def test_cancel(self):
        """Cancelling a call drops it and gives no more outcomes."""
        function = FakeFunction([Reply(body=[session_line(SID, "stream", CHUNK)], hang=True)])
        d = self.invoke(self.client(function))
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual([type(o) for o in self.outcomes], [Chunk])
