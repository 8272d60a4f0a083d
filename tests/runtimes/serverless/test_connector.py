"""Tests for difydaemon.runtimes.serverless.connector: the SRI client, against the fake connector through StubTreq."""

from __future__ import annotations

from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from difydaemon.runtimes.serverless.connector import (
    MISSING_FUNCTION_MESSAGE,
    NO_END_MESSAGE,
    NOT_THERE,
    REMOVED,
    UNSUPPORTED,
    ConnectorError,
    FunctionInfo,
    SRIClient,
    decode_instances,
    launch_body,
    package_filename,
)
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.sri import FakeSRIConnector, scripted

KEY = "connector-key"
FILENAME = package_filename("acme", "echo", "0.0.1", "a" * 64)
IDENTIFIER = "acme/echo:0.0.1@" + "a" * 64


class ConnectorCase(SynchronousTestCase):
    """An SRIClient talking to a FakeSRIConnector in memory."""

    def setUp(self):
        self.clock = Clock()
        self.connector = FakeSRIConnector(self.clock, KEY)
        # mounted under /sri: the client keeps the base path of the URL
        root = Resource()
        root.putChild(b"sri", self.connector.resource())
        self.stub = StubTreq(root)
        self.client = self.make_client(KEY)
        self.progress: list[str] = []

    def make_client(self, key: str, base: str = "http://connector.example/sri/") -> SRIClient:
        return SRIClient(self.clock, self.stub, base, key, launch_idle_timeout=30.0)

    def call(self, coroutine):
        d = Deferred.fromCoroutine(coroutine)
        self.stub.flush()
        return d

    def launch(self, client=None) -> Deferred:
        client = client or self.client
        return Deferred.fromCoroutine(client.launch(FILENAME, b"PK-package", True, IDENTIFIER, self.progress.append))


class PingTests(ConnectorCase):
    """serverless.md §2.1."""

    def test_pong(self):
        """Ping POSTs to the base path with the key verbatim and accepts the JSON string pong."""
        self.successResultOf(self.call(self.client.ping()))
        self.assertEqual(self.connector.calls, [("POST", "/sri/ping", KEY)])

    def test_wrong_key(self):
        """A connector refusing the key fails the ping with a message that names the key variable."""
        failure = self.failureResultOf(self.call(self.make_client("wrong").ping()), ConnectorError)
        self.assertIn("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY", failure.value.message)

    def test_missing_key(self):
        """An empty key is sent as an empty Authorization and refused by a connector that wants one."""
        self.failureResultOf(self.call(self.make_client("").ping()), ConnectorError)
        self.assertEqual(self.connector.calls[-1][2], "")

    def test_hanging_connector(self):
        """A ping the connector never answers fails after the call timeout."""
        hanging = Deferred()
        client = SRIClient(self.clock, _Hanging(hanging), "http://c", KEY, call_timeout=60.0)
        d = Deferred.fromCoroutine(client.ping())
        self.assertNoResult(d)
        self.clock.advance(60)
        failure = self.failureResultOf(d, ConnectorError)
        self.assertIn("timed out after 60 seconds", failure.value.message)


class _Hanging:
    """A treq-like client whose requests never get an answer."""

    def __init__(self, deferred):
        self.deferred = deferred

    def request(self, *args, **kwargs):
        return self.deferred

    post = request


class InstancesTests(ConnectorCase):
    """serverless.md §2.2."""

    def test_not_found(self):
        """An empty Items list is 'not found'."""
        self.assertIsNone(self.successResultOf(self.call(self.client.find_function(FILENAME))))
        method, path, _ = self.connector.calls[0]
        self.assertEqual((method, path), ("GET", "/sri/v1/runner/instances"))

    def test_found(self):
        """A deployed function is found by its package file name."""
        self.connector.functions[FILENAME] = FunctionInfo("fn", "http://f/fn", "drn:1")
        found = self.successResultOf(self.call(self.client.find_function(FILENAME)))
        self.assertEqual(found, FunctionInfo("fn", "http://f/fn", "drn:1"))

    def test_error_field(self):
        """A non-empty error fails with the connector's text."""
        error = self.assertRaises(ConnectorError, decode_instances, b'{"error":"quota","Items":[]}')
        self.assertEqual(error.message, "unexpected response from plugin controller: quota")

    def test_case_insensitive_keys(self):
        """Keys are matched case-insensitively, as Go decodes them."""
        found = decode_instances(b'{"items":[{"name":"n","endpoint":"http://e","resourceName":"r"}]}')
        self.assertEqual(found, FunctionInfo("n", "http://e", "r"))

    def test_not_json(self):
        """A body that is not JSON fails."""
        self.assertRaises(ConnectorError, decode_instances, b"<html>")


class RemoveTests(ConnectorCase):
    """The DELETE extension (serverless.md §11.7): optional, never required of a connector."""

    def test_removed(self):
        """A connector with the route removes the named function and says so."""
        self.connector.supports_remove = True
        self.connector.functions[FILENAME] = FunctionInfo("fn", "http://f/fn")
        self.assertEqual(self.successResultOf(self.call(self.client.remove_function(FILENAME))), REMOVED)
        self.assertEqual(self.connector.removals, [FILENAME])
        self.assertEqual(self.connector.functions, {})
        method, path, authorization = self.connector.calls[0]
        self.assertEqual((method, path, authorization), ("DELETE", "/sri/v1/runner/instances", KEY))

    def test_not_there(self):
        """A connector without that function answers removed: false."""
        self.connector.supports_remove = True
        self.assertEqual(self.successResultOf(self.call(self.client.remove_function(FILENAME))), NOT_THERE)

    def test_unsupported(self):
        """A connector answering 405 (or 404) to the DELETE has no such route: unsupported, not an error."""
        self.assertEqual(self.successResultOf(self.call(self.client.remove_function(FILENAME))), UNSUPPORTED)
        stub = StubTreq(Resource())  # nothing mounted: 404
        client = SRIClient(self.clock, stub, "http://connector.example/sri/", KEY)
        removing = Deferred.fromCoroutine(client.remove_function(FILENAME))
        stub.flush()
        self.assertEqual(self.successResultOf(removing), UNSUPPORTED)

    def test_refused(self):
        """A wrong key (401) fails with the status named."""
        client = self.make_client("wrong")
        failure = self.failureResultOf(self.call(client.remove_function(FILENAME)), ConnectorError)
        self.assertIn("answered 401", failure.value.message)


class LaunchTests(ConnectorCase):
    """serverless.md §2.3 and the better-than-Go rules of §11."""

    def test_launch(self):
        """A launch sends the package and metadata, reports progress and returns the function."""
        d = self.launch()
        self.stub.flush()
        function = self.successResultOf(d)
        self.assertEqual(function.name, "fn-" + "a" * 12)
        [launch] = self.connector.launches
        self.assertEqual(
            (launch.filename, launch.package, launch.verified, launch.metadata, launch.authorization),
            (FILENAME, b"PK-package", "true", {"plugin_unique_identifier": IDENTIFIER}, KEY),
        )
        self.assertEqual(self.progress, ["Building plugin... building " + FILENAME])

    def test_failed_line_is_final(self):
        """The connector's failed line ends the launch with its message, even if an end follows."""
        self.connector.launcher = scripted(
            [
                b'data: {"Stage":"build","State":"failed","Message":"pip: no matching distribution"}',
                b'data: {"Stage":"run","State":"success","Message":"endpoint=http://f,name=f"}',
                b'data: {"Stage":"end","State":"success","Message":""}',
            ]
        )
        d = self.launch()
        self.stub.flush()
        failure = self.failureResultOf(d, ConnectorError)
        self.assertEqual(failure.value.message, "pip: no matching distribution")

    def test_stream_without_end(self):
        """A stream that ends before its end line fails the launch."""
        self.connector.launcher = scripted([b'data: {"Stage":"build","State":"running","Message":"x"}'])
        d = self.launch()
        self.stub.flush()
        self.assertEqual(self.failureResultOf(d, ConnectorError).value.message, NO_END_MESSAGE)

    def test_end_without_function(self):
        """An end line with no function reported fails with Go's message."""
        self.connector.launcher = scripted([b'{"Stage":"end","State":"success","Message":""}'])
        d = self.launch()
        self.stub.flush()
        self.assertEqual(self.failureResultOf(d, ConnectorError).value.message, MISSING_FUNCTION_MESSAGE)

    def test_refused_status(self):
        """A launch answered with another status than 200 fails quoting status and body."""
        d = self.launch(self.make_client("wrong"))
        self.stub.flush()
        failure = self.failureResultOf(d, ConnectorError)
        self.assertEqual(
            failure.value.message, 'request failed with status code: 401 and respond with: {"error":"unauthorized"}'
        )

    def test_hanging_stream_times_out_when_idle(self):
        """A connector that stops talking mid-launch fails the launch after the idle timeout and is hung up on."""
        self.connector.launcher = scripted(
            [b'data: {"Stage":"build","State":"running","Message":"x"}'], then_hang=True
        )
        d = self.launch()
        self.stub.flush()
        self.clock.advance(29)
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(1)
        self.stub.flush()
        failure = self.failureResultOf(d, ConnectorError)
        self.assertIn("said nothing for 30 seconds", failure.value.message)

    def test_trickling_stream_is_not_cut(self):
        """A launch longer than the idle timeout in total succeeds while lines keep coming (better than Go)."""
        lines = [b'data: {"Stage":"build","State":"running","Message":"step"}'] * 5 + [
            b'data: {"Stage":"run","State":"success","Message":"endpoint=http://f/x,name=x"}',
            b'data: {"Stage":"end","State":"success","Message":""}',
        ]
        self.connector.launcher = scripted(lines, pause=20.0, reactor=self.clock)
        d = self.launch()
        for _ in range(len(lines) + 1):
            self.stub.flush()
            self.clock.advance(20)
            self.stub.flush()
        self.assertEqual(self.successResultOf(d), FunctionInfo("x", "http://f/x"))
        self.assertEqual(len(self.progress), 5)


class TraceparentTests(ConnectorCase):
    """An install's trace context goes to the connector as the traceparent header, and only when there is one."""

    TRACEPARENT = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"

    def test_instances_and_launch_carry_it(self):
        """find_function and launch send the traceparent they are given."""
        self.successResultOf(self.call(self.client.find_function(FILENAME, self.TRACEPARENT)))
        d = Deferred.fromCoroutine(
            self.client.launch(FILENAME, b"PK-package", True, IDENTIFIER, self.progress.append, self.TRACEPARENT)
        )
        self.stub.flush()
        self.successResultOf(d)
        self.assertEqual(self.connector.traceparents, [self.TRACEPARENT, self.TRACEPARENT])
        self.assertEqual(self.connector.launches[0].authorization, KEY)

    def test_none_without_a_trace(self):
        """Without a trace context no traceparent header is sent (ping, instances, launch)."""
        self.successResultOf(self.call(self.client.ping()))
        self.successResultOf(self.call(self.client.find_function(FILENAME)))
        d = self.launch()
        self.stub.flush()
        self.successResultOf(d)
        self.assertEqual(self.connector.traceparents, [None, None, None])


class LaunchBodyTests(SynchronousTestCase):
    """The multipart body of a launch."""

    def test_fields_in_order(self):
        """The package comes first as 'context' with its file name, then verified and metadata."""
        body = launch_body("B", FILENAME, b"\x00zip", False, IDENTIFIER)
        context = body.index(b'name="context"; filename="' + FILENAME.encode() + b'"')
        verified = body.index(b'name="verified"\r\n\r\nfalse')
        metadata = body.index(b'name="metadata"\r\n\r\n{"plugin_unique_identifier":"' + IDENTIFIER.encode())
        self.assertLess(context, verified)
        self.assertLess(verified, metadata)
        self.assertTrue(body.endswith(b"--B--\r\n"))
