"""The dispatch path counts its sessions and passes trace context on (over fakes)."""

from __future__ import annotations

import orjson
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from difydaemon.config import load_config
from difydaemon.observability.metrics import DaemonMetrics
from difydaemon.observability.otel import build_tracing
from difydaemon.testing.cases import SynchronousTestCase
from tests.api.test_dispatch import BASE, KEY, PLUGIN_ID, TENANT, TEXT_HI, TOOL_DATA, DispatchHarness
from tests.test_tap import environment

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
ECHO = ("acme/echo", "tool", "local", "invoke_tool")


def otel_config(**extra):
    """The observability config of a daemon with ENABLE_OTEL and ``extra``."""
    environ = environment("/nonexistent", 5002)
    environ.update({"ENABLE_OTEL": "true", **extra})
    return load_config(environ).observability


class ObservedHarness(DispatchHarness):
    """The dispatch harness with metrics, and requests that may carry a traceparent."""

    def __init__(self, test, **options) -> None:
        super().__init__(test, **options)
        self.metrics = self.dispatch.metrics = DaemonMetrics(self.clock.seconds)

    def open_traced(self, traceparent=None):
        """Open a tool session with ``traceparent`` headers (a list); (Deferred, the plugin request)."""
        headers = {"X-Api-Key": KEY, "X-Plugin-ID": PLUGIN_ID, "Content-Type": "application/json"}
        if traceparent is not None:
            headers["traceparent"] = traceparent
        d = self.treq.request(
            "POST",
            f"{BASE}/plugin/{TENANT}/dispatch/tool/invoke",
            headers=headers,
            data=orjson.dumps({"user_id": "u1", "data": TOOL_DATA}),
        )
        self.treq.flush()
        return d, self.runtime.requests[-1]


class DispatchMetricsTests(SynchronousTestCase):
    """Every session opened by a dispatch call is counted in flight, then by outcome."""

    def setUp(self):
        super().setUp()
        self.daemon = ObservedHarness(self)

    def test_success_counted(self):
        """A session is in flight while open and counts as a success once its stream ends."""
        d, session_id = self.daemon.open("tool/invoke", TOOL_DATA)
        self.assertEqual(self.daemon.metrics.invocations[ECHO].active, 1)
        self.daemon.clock.advance(0.2)
        self.daemon.runtime.stream(session_id, TEXT_HI)
        self.daemon.runtime.end(session_id)
        response, _ = self.daemon.result(d)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.daemon.metrics.invocations[ECHO].active, 0)
        histogram = self.daemon.metrics.invocations[ECHO].success
        self.assertEqual(sum(histogram[:-1]), 1)
        self.assertAlmostEqual(histogram[-1], 0.2)

    def test_plugin_error_counted_by_class(self):
        """A session the plugin fails counts as an error, with the plugin's error type as its class."""
        d, session_id = self.daemon.open("tool/invoke", TOOL_DATA)
        self.daemon.runtime.error(session_id, "ValueError", "planned failure")
        self.daemon.result(d)
        self.assertEqual(sum(self.daemon.metrics.invocations[ECHO].error[:-1]), 1)
        self.assertEqual(self.daemon.metrics.invoke_errors, {("acme/echo", "ValueError"): 1})
        self.assertEqual(self.daemon.metrics.invocations[ECHO].active, 0)

    def test_timeout_counted(self):
        """A session killed by the backstop timeout counts as an error."""
        daemon = ObservedHarness(self, max_execution_timeout=5)
        d, _ = daemon.open("tool/invoke", TOOL_DATA)
        daemon.clock.advance(5)
        daemon.result(d)
        self.assertEqual(daemon.metrics.invoke_errors, {("acme/echo", "PluginDaemonInternalServerError"): 1})
        self.assertEqual(daemon.metrics.invocations[ECHO].active, 0)

    def test_refused_before_session_not_counted(self):
        """A call answered before any session (unknown plugin) is no invocation."""
        self.daemon.request("tool/invoke", TOOL_DATA, plugin_id="acme/other")
        self.assertEqual(self.daemon.metrics.invocations, {})


class TraceparentTests(SynchronousTestCase):
    """An incoming traceparent reaches the plugin session; a malformed one does not."""

    def setUp(self):
        super().setUp()
        self.daemon = ObservedHarness(self)

    def test_passed_to_the_session(self):
        """A valid traceparent is the session request's ``traceparent``, unchanged."""
        _, request = self.daemon.open_traced(TRACEPARENT)
        self.assertEqual(request["traceparent"], TRACEPARENT)
        # the eight keys of the request line keep their order, the trace comes last
        self.assertEqual(list(request)[-1], "traceparent")

    def test_malformed_or_missing_is_dropped(self):
        """A malformed traceparent, or none, leaves the session request without one."""
        for value in [None, "garbage", TRACEPARENT.upper(), "00-" + "0" * 32 + "-b7ad6b7169203331-01"]:
            _, request = self.daemon.open_traced(value)
            self.assertNotIn("traceparent", request, value)


class TracedDispatchTests(SynchronousTestCase):
    """With OpenTelemetry on, the request and the session are spans and the plugin sees the session's."""

    def setUp(self):
        super().setUp()
        self.exporter = InMemorySpanExporter()
        self.tracing = build_tracing(otel_config(), exporter=self.exporter)
        self.daemon = ObservedHarness(self, tracing=self.tracing)

    def spans(self):
        self.tracing.shutdown()
        return {span.name: span for span in self.exporter.get_finished_spans()}

    def test_request_and_session_spans(self):
        """The server span continues Dify's trace; the session span is its child and the plugin's parent."""
        d, request = self.daemon.open_traced(TRACEPARENT)
        self.daemon.runtime.end(request["session_id"])
        self.daemon.result(d)
        spans = self.spans()
        server = spans["POST /plugin/:tenant_id/dispatch/tool/invoke"]
        session = spans["plugin session invoke_tool"]
        self.assertEqual(format(server.context.trace_id, "032x"), TRACEPARENT.split("-")[1])
        self.assertEqual(format(server.parent.span_id, "016x"), TRACEPARENT.split("-")[2])
        self.assertEqual(session.parent.span_id, server.context.span_id)
        self.assertEqual(
            request["traceparent"], f"00-{session.context.trace_id:032x}-{session.context.span_id:016x}-01"
        )
        self.assertEqual(session.attributes["plugin.id"], "acme/echo")
        self.assertTrue(session.status.is_ok)

    def test_failed_session_span_is_an_error(self):
        """A session the plugin fails ends its span with an error status."""
        d, request = self.daemon.open_traced(None)
        self.daemon.runtime.error(request["session_id"], "ValueError", "boom")
        self.daemon.result(d)
        spans = self.spans()
        self.assertFalse(spans["plugin session invoke_tool"].status.is_ok)
        # no incoming trace: the daemon's server span is the root
        self.assertIsNone(spans["POST /plugin/:tenant_id/dispatch/tool/invoke"].parent)
