"""
OTEL_EXPORTER_OTLP_PROTOCOL=grpc against a real OTLP/gRPC receiver on
loopback: spans and metrics arrive, with the key as metadata.  Needs the
``otel-grpc`` extra; skipped without it.
"""

from __future__ import annotations

from concurrent import futures

from prometheus_client import CollectorRegistry
from twisted.internet.testing import MemoryReactorClock

from difydaemon.observability import otel
from difydaemon.observability.metrics import DaemonMetrics
from difydaemon.observability.otlp_metrics import metrics_data
from difydaemon.testing.cases import SynchronousTestCase
from tests.observability.test_dispatch_observed import TRACEPARENT, otel_config

try:
    import grpc
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
except ImportError:
    grpc = OTLPSpanExporter = None


class Receiver:
    """An OTLP/gRPC trace and metrics service on a free loopback port, keeping what it is sent."""

    def __init__(self) -> None:
        self.spans = []
        self.metrics = []
        self.keys = []
        receiver = self

        def keep(context, names, resources, scopes, items) -> None:
            receiver.keys.append(dict(context.invocation_metadata()).get("authorization"))
            for resource in resources:
                for scope in getattr(resource, scopes):
                    names.extend(item.name for item in getattr(scope, items))

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                keep(context, receiver.spans, request.resource_spans, "scope_spans", "spans")
                return trace_service_pb2.ExportTraceServiceResponse()

        class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request, context):
                keep(context, receiver.metrics, request.resource_metrics, "scope_metrics", "metrics")
                return metrics_service_pb2.ExportMetricsServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(None)


class GRPCExportTests(SynchronousTestCase):
    """Spans and metrics go over OTLP/gRPC when the protocol says grpc."""

    if grpc is None:
        skip = "the otel-grpc extra is not installed"

    def setUp(self):
        super().setUp()
        self.receiver = Receiver()
        self.addCleanup(self.receiver.stop)
        self.config = otel_config(
            OTEL_EXPORTER_OTLP_PROTOCOL="grpc",
            OTLP_BASE_ENDPOINT=f"http://127.0.0.1:{self.receiver.port}",
            OTEL_API_KEY="collector-key",
        )

    def test_spans(self):
        """A span of a build_tracing over grpc reaches the receiver, with the bearer key as metadata."""
        self.assertIsInstance(otel.otlp_exporter(self.config, "trace"), OTLPSpanExporter)
        tracing = otel.build_tracing(self.config)
        tracing.start("over grpc", otel.CLIENT, TRACEPARENT).end()
        tracing.shutdown()
        self.assertEqual(self.receiver.spans, ["over grpc"])
        self.assertEqual(self.receiver.keys, ["Bearer collector-key"])

    def test_metrics(self):
        """The metric exporter over grpc delivers the registry's metrics."""
        clock = MemoryReactorClock()
        metrics = DaemonMetrics(clock.seconds)
        metrics.http_request("GET", "/health/check", 200, 0.001)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(metrics)
        exporter = otel.otlp_exporter(self.config, "metric")
        result = exporter.export(metrics_data(registry, 0, 1))
        exporter.shutdown()
        self.assertEqual(result.name, "SUCCESS")
        self.assertIn("plugin_http_requests_total", self.receiver.metrics)
        self.assertEqual(self.receiver.keys, ["Bearer collector-key"])
