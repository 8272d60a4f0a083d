"""Tests for difydaemon.runtimes.serverless.runtime: the serverless IPluginRuntime and its factory."""

from __future__ import annotations

import orjson
from treq.testing import StubTreq
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from zope.interface.verify import verifyObject

from difydaemon import errors
from difydaemon.interfaces import IPluginRuntime
from difydaemon.invocation.session import InvocationSession
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.runtimes.serverless.connector import FunctionInfo, SRIClient, package_filename
from difydaemon.runtimes.serverless.invoke import InvokeClient
from difydaemon.runtimes.serverless.runtime import ServerlessRuntime, ServerlessRuntimeFactory
from difydaemon.runtimes.serverless.sessions import MemoryServerlessSessions
from difydaemon.observability.trace import TracedProgress
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.sri import FakeSRIConnector, scripted
from tests.runtimes.listeners import RecordingListener
from tests.runtimes.serverless.functions import FakeFunction, Reply, session_line

IDENTIFIER = "acme/echo:0.0.1@" + "a" * 64
DECLARATION = {"author": "acme", "name": "echo", "version": "0.0.1", "verified": False}
SID = "0e8d1f9a-1111-4222-8333-444455556666"


def request(data: dict, session_id: str = SID) -> dict:
    return {
        "session_id": session_id, "conversation_id": None, "message_id": None, "app_id": None,
        "endpoint_id": None, "context": None, "event": "request", "data": data,
    }


class _SessionListener(RecordingListener):
    """A listener that says who the session serves, as the dispatch relays do."""

    def __init__(self, runtime, plugin_request):
        super().__init__()
        self.session = InvocationSession.of("tenant-1", "acme/echo", plugin_request, runtime)

    def invocation_session(self):
        return self.session


class RuntimeTests(SynchronousTestCase):
    """Sessions over HTTP."""

    def setUp(self):
        self.clock = Clock()
        self.sessions = MemoryServerlessSessions(self.clock)
        self.function = FakeFunction([Reply(body=[session_line(SID, "end", None)])])
        root = Resource()
        root.putChild(b"fn", self.function)
        self.stub = StubTreq(root)
        self.invoker = InvokeClient(self.clock, self.stub, max_request_bytes=4096)
        self.runtime = ServerlessRuntime(
            self.clock, IDENTIFIER, DECLARATION, FunctionInfo("fn", "http://f.example/fn"), self.invoker, self.sessions
        )

    def open(self, data: dict):
        plugin_request = request(data)
        listener = _SessionListener(self.runtime, plugin_request)
        handle = self.runtime.open_session(SID, plugin_request, listener)
        return listener, handle

    def test_interface(self):
        """The runtime provides IPluginRuntime and is ready until stopped."""
        self.assertTrue(verifyObject(IPluginRuntime, self.runtime))
        self.assertTrue(self.runtime.is_ready())
        self.assertEqual(self.runtime.runtime_type, "serverless")

    def test_session_live_while_open(self):
        """A session is in the live table with its tenant while its call runs, and gone after."""
        self.function.replies = [Reply(body=[session_line(SID, "stream", {"a": 1})], hang=True)]
        listener, handle = self.open({"type": "tool", "action": "invoke_tool", "user_id": "u"})
        self.stub.flush()
        live = self.successResultOf(self.sessions.lookup(SID))
        self.assertEqual((live.tenant_id, live.user_id, live.plugin_id), ("tenant-1", "u", "acme/echo"))
        self.assertEqual(listener.calls, [("stream", {"a": 1}, b'{"a":1}')])
        handle.close()
        self.stub.flush()
        self.assertIsNone(self.successResultOf(self.sessions.lookup(SID)))

    def test_end(self):
        """A finished call ends the session and forgets it."""
        listener, _ = self.open({"type": "tool", "action": "invoke_tool"})
        self.stub.flush()
        self.assertEqual(listener.calls, [("end",)])
        self.assertEqual(len(self.sessions), 0)

    def test_end_reaches_the_caller_before_the_session_is_forgotten(self):
        """The end and an error are handed on while the session is still live, and it is gone once they were."""
        for reply, last in (
            (Reply(body=[session_line(SID, "end", None)]), "end"),
            (Reply(status=500, body=[b"boom"]), "error"),
        ):
            self.function.replies = [reply]
            live_at_last = []
            plugin_request = request({"type": "tool", "action": "invoke_tool"})
            listener = _SessionListener(self.runtime, plugin_request)
            record = getattr(listener, last)
            setattr(listener, last, lambda *args: (
                live_at_last.append(self.successResultOf(self.sessions.lookup(SID))), record(*args)))
            self.runtime.open_session(SID, plugin_request, listener)
            self.stub.flush()
            self.assertEqual(listener.calls[-1][0], last)
            self.assertEqual(len(live_at_last), 1)
            self.assertEqual(live_at_last[0].session_id, SID)
            self.assertEqual(len(self.sessions), 0)

    def test_sessions_unavailable(self):
        """With Redis down the session cannot be shared: it fails with 'redis unavailable' and the function is not called."""

        class Down:
            def register(self, session, ttl):
                return fail(errors.CoordinationUnavailableError("connection refused"))

            def forget(self, session_id):
                return fail(errors.CoordinationUnavailableError("connection refused"))

        self.runtime._sessions = Down()
        listener, _ = self.open({"type": "tool", "action": "invoke_tool"})
        self.stub.flush()
        [(event, error_type, message)] = [call[:3] for call in listener.calls]
        self.assertEqual((event, error_type), ("error", errors.CoordinationUnavailableError.error_type))
        self.assertEqual(message, "redis unavailable: connection refused")
        self.assertEqual(self.function.requests, [])
        # a warning, not an error: the key expires by itself
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_send_refused(self):
        """Nothing can be sent to a function after its request: send fails."""
        self.assertRaises(errors.DaemonError, self.runtime.send, SID, {})

    def test_stopped_refuses(self):
        """A stopped runtime refuses new sessions."""
        self.successResultOf(self.runtime.stop())
        self.assertFalse(self.runtime.is_ready())
        self.assertRaises(errors.InternalServerError, self.open, {"type": "tool", "action": "invoke_tool"})

    def test_stop_fails_open_sessions_after_drain(self):
        """Sessions still open when the drain ends fail with the stop's reason and their calls are dropped."""
        self.function.replies = [Reply(body=[], hang=True)]
        listener, _ = self.open({"type": "tool", "action": "invoke_tool"})
        self.stub.flush()
        d = self.runtime.stop(drain_timeout=5, reason="the plugin daemon is shutting down")
        self.assertNoResult(d)
        self.clock.advance(5)
        self.successResultOf(d)
        self.assertEqual(listener.calls[-1][2], "the plugin daemon is shutting down")

    def test_stop_lets_an_ended_session_read_the_rest_of_its_body(self):
        """A stop does not hang up on a call whose session has ended while the rest of its body is still coming."""
        self.function.replies = [Reply(body=[session_line(SID, "end", None)], hang=True)]
        listener, _ = self.open({"type": "tool", "action": "invoke_tool"})
        self.stub.flush()
        self.assertEqual(listener.calls, [("end",)])
        [answer] = self.function.open_requests
        self.successResultOf(self.runtime.stop(drain_timeout=5))
        self.stub.flush()
        self.assertFalse(answer._disconnected)
        answer.finish()
        self.stub.flush()
        self.assertEqual(self.runtime._calls, {})

    def test_embeddings_batched(self):
        """An embedding call over the size limit goes as several calls of one session and one merged result."""

        def embed(body):
            texts = body["data"]["texts"]
            usage = {"tokens": len(texts), "total_tokens": len(texts), "unit_price": "0.1", "price_unit": "1",
                     "total_price": "0.1", "currency": "USD", "latency": 1.0}
            result = {"model": "m", "embeddings": [[float(len(t))] for t in texts], "usage": usage}
            return Reply(body=[session_line(SID, "stream", result), session_line(SID, "end", None)])

        self.function.handler = embed
        texts = ["t" * 500 for _ in range(12)]
        listener, _ = self.open({"type": "model", "action": "invoke_text_embedding", "texts": texts})
        self.stub.flush()
        self.assertGreater(len(self.function.requests), 1)
        self.assertEqual({r[2]["dify-plugin-session-id"] for r in self.function.requests}, {SID})
        [stream, end] = listener.calls
        self.assertEqual(end, ("end",))
        merged = stream[1]
        self.assertEqual(len(merged["embeddings"]), 12)
        self.assertEqual(merged["usage"]["tokens"], 12)
        self.assertEqual(orjson.loads(stream[2]), merged)


class FactoryTests(SynchronousTestCase):
    """Bringing identifiers up: reuse, launch, restore."""

    def setUp(self):
        self.clock = Clock()
        self.persistence = MemoryPersistence(self.clock)
        self.connector = FakeSRIConnector(self.clock, "key")
        self.stub = StubTreq(self.connector.resource())
        self.factory = ServerlessRuntimeFactory(
            self.clock,
            self.persistence,
            SRIClient(self.clock, self.stub, "http://c", "key"),
            InvokeClient(self.clock, self.stub),
            MemoryServerlessSessions(self.clock),
        )
        self.progress = []

    def launch(self):
        d = self.factory.launch(IDENTIFIER, DECLARATION, b"package", self.progress.append)
        self.stub.flush()
        return d

    def test_launch_records_function(self):
        """A package with no function is launched and its function recorded."""
        runtime = self.successResultOf(self.launch())
        self.assertEqual(len(self.connector.launches), 1)
        row = self.successResultOf(self.persistence.get_serverless_runtime(IDENTIFIER))
        self.assertEqual((row.function_name, row.function_url), (runtime.function.name, runtime.function.url))
        self.assertEqual(self.progress[0], "Installing...")

    def test_existing_function_reused(self):
        """A package the connector already runs is not launched again."""
        filename = package_filename("acme", "echo", "0.0.1", "a" * 64)
        self.connector.functions[filename] = FunctionInfo("old", "http://old/fn")
        runtime = self.successResultOf(self.launch())
        self.assertEqual(runtime.function, FunctionInfo("old", "http://old/fn"))
        self.assertEqual(self.connector.launches, [])

    def test_install_trace_reaches_the_connector(self):
        """An install's progress carrying its span's traceparent makes the instances and launch calls carry it."""
        traceparent = "00-" + "3" * 32 + "-" + "4" * 16 + "-01"
        d = self.factory.launch(IDENTIFIER, DECLARATION, b"package", TracedProgress(self.progress.append, traceparent))
        self.stub.flush()
        self.successResultOf(d)
        self.assertEqual(self.connector.traceparents, [traceparent, traceparent])
        self.assertEqual(self.progress[0], "Installing...")

    def test_launch_failure_says_why(self):
        """A failed launch fails with the connector's message and records nothing."""
        self.connector.launcher = scripted([b'{"Stage":"build","State":"failed","Message":"no wheel for numpy"}'])
        failure = self.failureResultOf(self.launch(), errors.InternalServerError)
        self.assertEqual(failure.value.message, "no wheel for numpy")
        self.assertIsNone(self.successResultOf(self.persistence.get_serverless_runtime(IDENTIFIER)))

    def test_discard_removes_the_function(self):
        """Discarding a launched identifier asks the connector to remove its function, by its package name."""
        self.connector.supports_remove = True
        self.successResultOf(self.launch())
        filename = package_filename("acme", "echo", "0.0.1", "a" * 64)
        self.assertIn(filename, self.connector.functions)
        discarding = self.factory.discard(IDENTIFIER)
        self.stub.flush()
        self.successResultOf(discarding)
        self.assertEqual(self.connector.removals, [filename])
        self.assertNotIn(filename, self.connector.functions)

    def test_discard_on_a_connector_without_the_route(self):
        """A connector answering 405 to the removal is logged and ignored: discard succeeds."""
        discarding = self.factory.discard(IDENTIFIER)
        self.stub.flush()
        self.assertIsNone(self.successResultOf(discarding))
        self.assertEqual(self.connector.removals, [package_filename("acme", "echo", "0.0.1", "a" * 64)])

    def test_discard_refused_by_the_connector(self):
        """A connector refusing the removal (401) does not fail the uninstall: it is only logged."""
        self.connector.api_key = "another"  # answers 401
        discarding = self.factory.discard(IDENTIFIER)
        self.stub.flush()
        self.assertIsNone(self.successResultOf(discarding))

    def test_restore(self):
        """A recorded function is brought back without calling the connector; unknown ones are None."""
        self.successResultOf(self.persistence.upsert_serverless_runtime(IDENTIFIER, "http://f/x", "x", "a" * 64))
        self.successResultOf(self.persistence.save_declaration(IDENTIFIER, "acme/echo", DECLARATION))
        self.assertEqual(self.successResultOf(self.factory.installed()), [IDENTIFIER])
        runtime = self.successResultOf(self.factory.launch_installed(IDENTIFIER, None))
        self.assertEqual(runtime.function, FunctionInfo("x", "http://f/x"))
        self.assertEqual(runtime.declaration, DECLARATION)
        self.assertIsNone(self.successResultOf(self.factory.launch_installed("acme/other:1.0.0@" + "b" * 64, None)))
        self.assertEqual(self.connector.calls, [])
