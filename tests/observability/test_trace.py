"""Tests for difydaemon.observability.trace and otel: traceparent checks and spans on calls to Dify."""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.web.http_headers import Headers

from difydaemon.errors import ConfigError
from difydaemon.invocation.inner_api import DifyInnerAPI, InnerAPIError
from difydaemon.observability import otel
from difydaemon.observability.otel import CLIENT, build_tracing
from difydaemon.observability.trace import parse_traceparent, traceparent_of
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.inner_api import FakeDifyInnerAPI
from tests.observability.test_dispatch_observed import TRACEPARENT, otel_config

KEY = "inner-api-key"
BASE = "http://dify.test:5001/"
LLM_BODY = {"tenant_id": "t1", "user_id": "u1", "type": "llm", "provider": "openai", "model": "gpt-x", "stream": True}


def refuse_imports(test, prefix: str) -> None:
    """For the rest of ``test``, importing a module whose name starts with ``prefix`` fails, as if not installed."""
    import builtins

    real_import = builtins.__import__

    def refusing(name, *args, **kwargs):
        if name.startswith(prefix):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    test.patch(builtins, "__import__", refusing)


class ParseTests(SynchronousTestCase):
    """Only well-formed W3C traceparent values pass."""

    def test_valid(self):
        """Version 00 exactly, a later version with extra fields (kept to four), bytes or str, blanks around."""
        self.assertEqual(parse_traceparent(TRACEPARENT), TRACEPARENT)
        self.assertEqual(parse_traceparent(TRACEPARENT.encode()), TRACEPARENT)
        self.assertEqual(parse_traceparent(" " + TRACEPARENT + "\t"), TRACEPARENT)
        later = "01" + TRACEPARENT[2:]
        self.assertEqual(parse_traceparent(later + "-what-comes-next"), later)

    def test_malformed(self):
        """Wrong shape, case, length, zero ids, version ff, extra fields on 00 and non-ASCII are refused."""
        trace, parent = TRACEPARENT.split("-")[1:3]
        for value in [
            "",
            "garbage",
            TRACEPARENT.upper(),
            TRACEPARENT[:-1],
            TRACEPARENT + "-extra",
            f"ff-{trace}-{parent}-01",
            f"00-{'0' * 32}-{parent}-01",
            f"00-{trace}-{'0' * 16}-01",
            f"00-{trace}-{parent}-1",
            f"0-{trace}-{parent}-01",
            f"00_{trace}_{parent}_01",
            "00-" + "é" * 32 + f"-{parent}-01",
            b"\xff" * 55,
            "00-" + "a" * 600,
            None,
            42,
        ]:
            self.assertIsNone(parse_traceparent(value), value)

    def test_first_header(self):
        """From headers, the first traceparent counts; none gives None."""
        self.assertEqual(traceparent_of(Headers({b"traceparent": [TRACEPARENT.encode(), b"x"]})), TRACEPARENT)
        self.assertIsNone(traceparent_of(Headers({b"traceparent": [b"x", TRACEPARENT.encode()]})))
        self.assertIsNone(traceparent_of(Headers()))


class InnerAPITraceTests(SynchronousTestCase):
    """Calls back into Dify carry the session's trace context."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.fake = FakeDifyInnerAPI(self.clock, KEY)
        self.stub = StubTreq(self.fake.resource())

    def api(self, tracing=None):
        return DifyInnerAPI(self.clock, self.stub, BASE, KEY, 5.0, 240.0, 4096, tracing=tracing)

    def test_traceparent_header_passed_on(self):
        """A session's traceparent is sent as the traceparent header; a call without one sends none."""
        api = self.api()
        self.successResultOf(Deferred.fromCoroutine(api.stream("invoke/llm", LLM_BODY, lambda item: None, TRACEPARENT)))
        self.successResultOf(Deferred.fromCoroutine(api.stream("invoke/llm", LLM_BODY, lambda item: None)))
        first, second = self.fake.received
        self.assertEqual(first.headers["traceparent"], TRACEPARENT)
        self.assertNotIn("traceparent", second.headers)
        self.assertEqual(first.headers["x-inner-api-key"], KEY)

    def test_client_span_per_call(self):
        """With tracing, each call is a client span under the session's, named in the header it sends."""
        exporter = InMemorySpanExporter()
        tracing = build_tracing(otel_config(), exporter=exporter)
        api = self.api(tracing)
        call = api.stream("invoke/tool", {"x": 1}, lambda item: None, TRACEPARENT)
        self.successResultOf(Deferred.fromCoroutine(call))
        self.fake.fail("invoke/tool", 500, b"broken")
        call = api.stream("invoke/tool", {"x": 1}, lambda item: None, TRACEPARENT)
        self.failureResultOf(Deferred.fromCoroutine(call), InnerAPIError)
        tracing.shutdown()
        ok, failed = exporter.get_finished_spans()
        self.assertEqual(ok.name, "dify inner api invoke/tool")
        self.assertEqual(format(ok.parent.span_id, "016x"), TRACEPARENT.split("-")[2])
        self.assertEqual(format(ok.context.trace_id, "032x"), TRACEPARENT.split("-")[1])
        sent = self.fake.received[0].headers["traceparent"]
        self.assertEqual(sent.split("-")[2], format(ok.context.span_id, "016x"))
        self.assertTrue(ok.status.is_ok)
        self.assertFalse(failed.status.is_ok)
        self.assertIn("500", failed.status.description)


class BuildTracingTests(SynchronousTestCase):
    """ENABLE_OTEL's configuration reaches the exporter; without the extra, a clear error."""

    def test_endpoint(self):
        """Spans go to OTLP_TRACE_ENDPOINT, else the base's /v1/traces (the key is checked end to end)."""
        config = otel_config(OTLP_BASE_ENDPOINT="http://collector:4318/", OTEL_API_KEY="secret")
        self.assertEqual(config.trace_endpoint, "http://collector:4318/v1/traces")
        self.assertEqual(otel_config(OTLP_TRACE_ENDPOINT="http://c/traces").trace_endpoint, "http://c/traces")
        self.assertNotIn("secret", repr(config))

    def test_sampling(self):
        """A sampling rate of 0 records no new trace, but a sampled parent's trace is followed."""
        exporter = InMemorySpanExporter()
        tracing = build_tracing(otel_config(OTEL_SAMPLING_RATE="0"), exporter=exporter)
        tracing.start("new trace", CLIENT, None).end()
        tracing.start("continued", CLIENT, TRACEPARENT).end()
        tracing.shutdown()
        self.assertEqual([span.name for span in exporter.get_finished_spans()], ["continued"])

    def test_traceparent_of_a_span(self):
        """A span's traceparent keeps its parent's trace and flags, and names the span; bad parents start anew."""
        exporter = InMemorySpanExporter()
        tracing = build_tracing(otel_config(), exporter=exporter)
        unsampled = TRACEPARENT[:-2] + "00"
        child = tracing.start("child", CLIENT, unsampled)
        fresh = tracing.start("fresh", CLIENT, "00-zz-yy-01")
        child.end()
        fresh.end()
        tracing.shutdown()
        [recorded] = exporter.get_finished_spans()
        self.assertEqual(recorded.name, "fresh")
        self.assertEqual(child.traceparent.split("-")[1], TRACEPARENT.split("-")[1])
        self.assertTrue(child.traceparent.endswith("-00"))
        self.assertNotEqual(child.traceparent.split("-")[2], TRACEPARENT.split("-")[2])
        self.assertEqual(parse_traceparent(child.traceparent), child.traceparent)
        self.assertEqual(
            fresh.traceparent,
            f"00-{recorded.context.trace_id:032x}-{recorded.context.span_id:016x}-{recorded.context.trace_flags:02x}",
        )

    def test_missing_extra(self):
        """Without the otel extra, ENABLE_OTEL is refused with the install hint."""
        refuse_imports(self, "opentelemetry")
        error = self.assertRaises(ConfigError, otel.build_tracing, otel_config())
        self.assertIn("difydaemon[otel]", str(error))


class ShutdownTests(SynchronousTestCase):
    """The exporter is shut down off the reactor, in a thread that does not hold the exit."""

    def test_stop_hands_shutdown_to_a_thread(self):
        """stop() starts the provider's shutdown in a thread and returns at once."""
        started = []
        tracing = build_tracing(otel_config(), exporter=InMemorySpanExporter())
        otel.ShutdownInThread(None, tracing, start_thread=started.append).stop()
        self.assertEqual(started, [tracing.shutdown])
        tracing.shutdown()

    def test_default_thread_is_a_daemon(self):
        """The default thread is a daemon thread, so a dead collector cannot hold the process."""
        import threading

        seen = []
        done = threading.Event()

        def target():
            seen.append(threading.current_thread().daemon)
            done.set()

        otel._daemon_thread(target)
        self.assertTrue(done.wait(10))
        self.assertEqual(seen, [True])
