"""The metrics of /metrics pushed over OTLP with ENABLE_OTEL: conversion, schedule, wiring, protocol."""

from __future__ import annotations

from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics.export import Gauge, Histogram, MetricExportResult, Sum
from prometheus_client import CollectorRegistry
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher

from difydaemon import tap
from difydaemon.config import load_config
from difydaemon.errors import ConfigError
from difydaemon.observability import otel
from difydaemon.observability.metrics import DaemonMetrics
from difydaemon.observability.otlp_metrics import STOP_WAIT, MetricsPush, metrics_data
from difydaemon.testing.cases import SynchronousTestCase
from tests.observability.test_dispatch_observed import otel_config
from tests.observability.test_trace import refuse_imports
from tests.test_tap import environment

DISPATCH = "/plugin/:tenant_id/dispatch/tool/invoke"


def counted_registry(clock) -> CollectorRegistry:
    """A registry of DaemonMetrics holding two answered requests and one invocation in flight."""
    metrics = DaemonMetrics(clock.seconds)
    metrics.http_request("POST", DISPATCH, 200, 0.003)
    metrics.http_request("POST", DISPATCH, 200, 2.0)
    metrics.invocation("acme/echo", "tool", "local", "invoke_tool")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    return registry


def by_name(data) -> dict:
    """The metrics of a MetricsData, by name."""
    [resource] = data.resource_metrics
    [scope] = resource.scope_metrics
    return {metric.name: metric for metric in scope.metrics}


class RecordingExporter:
    """A metric exporter that keeps what it is given and answers ``result``."""

    def __init__(self, result=MetricExportResult.SUCCESS) -> None:
        self.exported = []
        self.timeouts = []
        self.shut_down = False
        self.result = result

    def export(self, data, timeout_millis=None):
        self.exported.append(data)
        self.timeouts.append(timeout_millis)
        return self.result

    def shutdown(self, **kwargs):
        self.shut_down = True


def synchronous(f):
    """Run ``f`` at once, as the push's thread would; its result as a Deferred."""
    try:
        return succeed(f())
    except Exception:
        return fail()


class ConversionTests(SynchronousTestCase):
    """The Prometheus registry becomes OTLP metrics with the same names, labels and values."""

    def test_counter_gauge_histogram(self):
        """Counters are cumulative monotonic sums, gauges gauges, histograms per-bucket counts under their bounds."""
        clock = MemoryReactorClock()
        data = metrics_data(counted_registry(clock), 1_000, 2_000)
        metrics = by_name(data)
        requests = metrics["plugin_http_requests_total"]
        self.assertIsInstance(requests.data, Sum)
        self.assertTrue(requests.data.is_monotonic)
        [point] = requests.data.data_points
        self.assertEqual(
            (dict(point.attributes), point.value, point.start_time_unix_nano, point.time_unix_nano),
            ({"method": "POST", "endpoint": DISPATCH, "status": "200"}, 2, 1_000, 2_000),
        )
        active = metrics["plugin_invocations_active"]
        self.assertIsInstance(active.data, Gauge)
        self.assertEqual([p.value for p in active.data.data_points], [1])
        durations = metrics["plugin_http_request_duration_seconds"]
        self.assertIsInstance(durations.data, Histogram)
        [histogram] = durations.data.data_points
        self.assertEqual((histogram.count, histogram.sum), (2, 2.003))
        self.assertEqual(len(histogram.bucket_counts), len(histogram.explicit_bounds) + 1)
        self.assertEqual(sum(histogram.bucket_counts), 2)
        # 3 ms and 2 s fall in different buckets
        self.assertEqual(sorted(histogram.bucket_counts)[-2:], [1, 1])
        # what the OTLP exporters send: the conversion encodes
        self.assertEqual(len(encode_metrics(data).resource_metrics[0].scope_metrics[0].metrics), len(metrics))

    def test_go_instruments(self):
        """Go's plugin.invocations and plugin.invocation.duration, by plugin, runtime, access type and outcome."""
        clock = MemoryReactorClock()
        metrics = DaemonMetrics(clock.seconds)
        for operation, outcome in [("invoke_tool", "success"), ("get_runtime_parameters", "success"),
                                   ("invoke_tool", "error")]:
            meter = metrics.invocation("acme/echo", "tool", "local", operation)
            clock.advance(0.02)
            meter.finish(outcome)
        metrics.invocation("acme/echo", "tool", "local", "invoke_tool")  # in flight: not counted yet
        data = metrics_data(counted_registry(clock), 0, 1, metrics)
        [ours, go] = data.resource_metrics[0].scope_metrics
        self.assertEqual((ours.scope.name, go.scope.name), ("difydaemon", "dify-plugin-daemon/plugin"))
        calls, durations = go.metrics
        self.assertEqual((calls.name, calls.unit, durations.name, durations.unit),
                         ("plugin.invocations", "{call}", "plugin.invocation.duration", "s"))
        by_outcome = {p.attributes["plugin.outcome"]: p for p in calls.data.data_points}
        self.assertEqual({k: p.value for k, p in by_outcome.items()}, {"success": 2, "error": 1})
        self.assertEqual(
            dict(by_outcome["success"].attributes),
            {"plugin.id": "acme/echo", "plugin.version": "unknown", "plugin.runtime_type": "local",
             "plugin.access_type": "tool", "plugin.outcome": "success"},
        )
        [success] = [p for p in durations.data.data_points if p.attributes["plugin.outcome"] == "success"]
        self.assertEqual(success.count, 2)
        self.assertAlmostEqual(success.sum, 0.04)
        self.assertEqual(sum(success.bucket_counts), 2)
        self.assertEqual(len(success.bucket_counts), len(success.explicit_bounds) + 1)
        encode_metrics(data)

    def test_no_invocations_no_go_instruments(self):
        """Before any session has ended, Go's scope is empty rather than holding empty metrics."""
        clock = MemoryReactorClock()
        data = metrics_data(CollectorRegistry(), 0, 1, DaemonMetrics(clock.seconds))
        self.assertEqual(data.resource_metrics[0].scope_metrics[1].metrics, [])

    def test_resource_names_the_service(self):
        """The pushed metrics carry the service name spans carry."""
        data = metrics_data(CollectorRegistry(), 0, 1)
        self.assertEqual(data.resource_metrics[0].resource.attributes["service.name"], "dify-plugin-daemon")


class PushTests(SynchronousTestCase):
    """The push runs every interval, once more at stop, and survives a collector that fails."""

    def push(self, exporter):
        clock = MemoryReactorClock()
        push = MetricsPush(clock, counted_registry(clock), exporter, 60.0, timeout=2.5, run_in_thread=synchronous)
        return clock, push

    def test_every_interval_and_at_stop(self):
        """Nothing at start; one export per interval; a last one at stop, then the exporter is shut down."""
        exporter = RecordingExporter()
        clock, push = self.push(exporter)
        push.startService()
        self.assertEqual(exporter.exported, [])
        clock.advance(60)
        clock.advance(60)
        self.assertEqual(len(exporter.exported), 2)
        # each export is given the push's deadline
        self.assertEqual(exporter.timeouts, [2500.0, 2500.0])
        self.assertFalse(exporter.shut_down)
        push.stopService()
        self.assertEqual(len(exporter.exported), 3)
        self.assertTrue(exporter.shut_down)
        clock.advance(600)
        self.assertEqual(len(exporter.exported), 3)

    def test_failures_are_logged_and_the_push_goes_on(self):
        """An exporter that fails or raises costs a warning; the next interval exports again."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        exporter = RecordingExporter(MetricExportResult.FAILURE)
        clock, push = self.push(exporter)
        push.startService()
        clock.advance(60)
        exporter.export = lambda data, timeout_millis=None: 1 / 0
        clock.advance(60)
        del exporter.export
        exporter.result = MetricExportResult.SUCCESS
        clock.advance(60)
        self.assertEqual(len(exporter.exported), 2)
        warnings = [e for e in events if "metrics export failed" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 2)
        push.stopService()

    def test_a_slow_export_makes_the_next_skip(self):
        """While an export runs, a due push is skipped instead of piling up threads."""
        pending = []
        clock = MemoryReactorClock()
        exporter = RecordingExporter()
        push = MetricsPush(clock, counted_registry(clock), exporter, 60.0,
                           run_in_thread=lambda f: pending.append(f) or _Later(pending))
        push.startService()
        clock.advance(60)
        clock.advance(60)
        self.assertEqual(len(pending), 1)

    def test_stop_waits_for_the_last_export(self):
        """The stop fires once the last export has ended, not before (the process would exit under it)."""
        pending = []
        clock = MemoryReactorClock()
        push = MetricsPush(clock, counted_registry(clock), RecordingExporter(), 60.0, timeout=2.5,
                           run_in_thread=lambda f: pending.append(Deferred()) or pending[-1])
        push.startService()
        stopped = push.stopService()
        self.assertNoResult(stopped)
        pending[-1].callback(MetricExportResult.SUCCESS)
        self.successResultOf(stopped)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_hung_collector_holds_the_stop_no_longer_than_stop_wait(self):
        """An export that never ends releases the stop after STOP_WAIT (or the export timeout if shorter)."""
        for timeout, waited in ((30.0, STOP_WAIT), (2.5, 2.5)):
            clock = MemoryReactorClock()
            push = MetricsPush(clock, counted_registry(clock), RecordingExporter(), 60.0, timeout=timeout,
                               run_in_thread=lambda f: Deferred())
            push.startService()
            stopped = push.stopService()
            clock.advance(waited - 0.1)
            self.assertNoResult(stopped)
            clock.advance(0.1)
            self.successResultOf(stopped)


class _Later:
    """A Deferred-like that never fires (an export still running)."""

    def __init__(self, pending) -> None:
        self.pending = pending

    def addBoth(self, callback):
        return self


class WiringTests(SynchronousTestCase):
    """makeService wires the push with ENABLE_OTEL, even with /metrics off."""

    def build(self, **extra):
        environ = environment(self.mktemp(), 5002)
        environ.update(extra)
        return tap.build_daemon(MemoryReactorClock(), load_config(environ))

    def test_on_without_prometheus(self):
        """ENABLE_OTEL with PROMETHEUS_ENABLED=false: counted and pushed, /metrics not served."""
        service = self.build(ENABLE_OTEL="true", PROMETHEUS_ENABLED="false")
        self.assertIsInstance(service.metrics_push, MetricsPush)
        self.assertIn(service.metrics_push, list(service))
        self.assertIs(service.dispatch.metrics, service.metrics)
        self.assertIsNotNone(service.metrics)
        self.assertIsNone(service.site.resource._metrics)

    def test_off(self):
        """ENABLE_OTEL off: no push."""
        self.assertIsNone(self.build().metrics_push)


class ProtocolTests(SynchronousTestCase):
    """OTEL_EXPORTER_OTLP_PROTOCOL picks the exporters; a missing one stops the start with a clear error."""

    def test_endpoints(self):
        """Over HTTP the base gets /v1/traces and /v1/metrics; over gRPC both use the base; own URLs win."""
        http = otel_config(OTLP_BASE_ENDPOINT="http://collector:4318/")
        self.assertEqual((http.trace_endpoint, http.metric_endpoint),
                         ("http://collector:4318/v1/traces", "http://collector:4318/v1/metrics"))
        grpc = otel_config(OTEL_EXPORTER_OTLP_PROTOCOL="grpc", OTLP_BASE_ENDPOINT="http://collector:4317")
        self.assertEqual((grpc.trace_endpoint, grpc.metric_endpoint), ("http://collector:4317",) * 2)
        own = otel_config(OTLP_METRIC_ENDPOINT="http://m/metrics")
        self.assertEqual(own.metric_endpoint, "http://m/metrics")

    def test_http_exporters(self):
        """http/protobuf (the default) picks the OTLP/HTTP span and metric exporters."""
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        config = otel_config(OTEL_API_KEY="k")
        spans = otel.otlp_exporter(config, "trace")
        metrics = otel.otlp_exporter(config, "metric")
        self.assertIsInstance(spans, OTLPSpanExporter)
        self.assertIsInstance(metrics, OTLPMetricExporter)
        # the endpoint and the key are checked end to end (tests.test_observability_end_to_end)

    def test_grpc_without_its_extra(self):
        """grpc without the otel-grpc extra: a ConfigError naming the variable and the extra, at build time."""
        refuse_imports(self, "opentelemetry.exporter.otlp.proto.grpc")
        error = self.assertRaises(
            ConfigError, otel.otlp_exporter, otel_config(OTEL_EXPORTER_OTLP_PROTOCOL="grpc"), "metric"
        )
        self.assertEqual(error.variable, "OTEL_EXPORTER_OTLP_PROTOCOL")
        self.assertIn("difydaemon[otel-grpc]", str(error))

    def test_unknown_protocol_refused(self):
        """A protocol other than http/protobuf and grpc is a configuration error."""
        self.assertRaises(ConfigError, otel_config, OTEL_EXPORTER_OTLP_PROTOCOL="http/json")
