"""
A tiny OTLP/HTTP receiver on loopback, for tests of the daemon's span and
metric export (``ENABLE_OTEL``): it takes ``POST /v1/traces`` with a
protobuf ``ExportTraceServiceRequest`` and ``POST /v1/metrics`` with an
``ExportMetricsServiceRequest`` (as the OpenTelemetry OTLP/HTTP exporters
send them, uncompressed or gzip) and keeps each span as a
:class:`ReceivedSpan`, each metric as a :class:`ReceivedMetric`.

Needs the ``otel`` extra (``opentelemetry-proto`` comes with the exporter).
"""

from __future__ import annotations

import gzip

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.resource import Resource
from twisted.web.server import Site

from difydaemon.testing.openai import _ConnectionTrackingFactory, stop_listening

TRACES_PATH = b"traces"
METRICS_PATH = b"metrics"


@frozen
class ReceivedSpan:
    """
    One exported span.

    :ivar kind: ``SPAN_KIND_SERVER``, ``SPAN_KIND_INTERNAL``, ``SPAN_KIND_CLIENT``...
    :ivar parent_span_id: hex, or "" for a root span.
    :ivar status: ``STATUS_CODE_UNSET``, ``STATUS_CODE_OK`` or ``STATUS_CODE_ERROR``.
    :ivar service_name: the resource's ``service.name``.
    """

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: str
    status: str
    attributes: dict
    service_name: str

    @property
    def traceparent(self) -> str:
        """The W3C traceparent naming this span as a parent (sampled)."""
        return f"00-{self.trace_id}-{self.span_id}-01"


@frozen
class ReceivedMetric:
    """
    One exported metric.

    :ivar kind: ``sum``, ``gauge`` or ``histogram``.
    :ivar points: ``(attributes, value)`` of each point; a histogram's
        value is its count.
    :ivar service_name: the resource's ``service.name``.
    """

    name: str
    kind: str
    points: tuple
    service_name: str


def decode_metrics(body: bytes) -> list[ReceivedMetric]:
    """The metrics of one ``ExportMetricsServiceRequest``."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    metrics = []
    for resource, metric in _items(ExportMetricsServiceRequest, body, "metrics"):
        kind = metric.WhichOneof("data")
        points = []
        for point in getattr(metric, kind).data_points:
            value = point.count if kind == "histogram" else getattr(point, point.WhichOneof("value"))
            points.append((_attributes(point), value))
        metrics.append(ReceivedMetric(metric.name, kind, tuple(points), str(resource.get("service.name", ""))))
    return metrics


def _items(request_class, body: bytes, signal: str):
    """``(resource attributes, item)`` of every span or metric (``signal``) in an export request's body."""
    request = request_class()
    request.ParseFromString(body)
    for resource_items in getattr(request, "resource_" + signal):
        resource = _attributes(resource_items.resource)
        for scope_items in getattr(resource_items, "scope_" + signal):
            for item in getattr(scope_items, signal):
                yield resource, item


def _attributes(message) -> dict:
    """The attributes of a resource, span or point, as plain values."""
    return {a.key: _value(a.value) for a in message.attributes}


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind is not None else None


def decode_export(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ``ExportTraceServiceRequest``."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    spans = []
    for resource, span in _items(ExportTraceServiceRequest, body, "spans"):
        spans.append(
            ReceivedSpan(
                name=span.name,
                trace_id=span.trace_id.hex(),
                span_id=span.span_id.hex(),
                parent_span_id=span.parent_span_id.hex(),
                kind=Span.SpanKind.Name(span.kind),
                status=Status.StatusCode.Name(span.status.code),
                attributes=_attributes(span),
                service_name=str(resource.get("service.name", "")),
            )
        )
    return spans


class _Traces(Resource):
    isLeaf = True

    def __init__(self, receiver: OTLPReceiver) -> None:
        super().__init__()
        self._receiver = receiver

    def body(self, request) -> bytes:
        """The export's protobuf, its headers kept by the receiver."""
        body = request.content.read()
        if (request.getHeader(b"content-encoding") or b"").lower() == b"gzip":
            body = gzip.decompress(body)
        self._receiver.headers.append({k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()})
        request.setHeader(b"content-type", b"application/x-protobuf")
        return body

    def render_POST(self, request):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        self._receiver.received(decode_export(self.body(request)))
        return ExportTraceServiceResponse().SerializeToString()


class _Metrics(_Traces):
    def render_POST(self, request):
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

        self._receiver.received_metrics(decode_metrics(self.body(request)))
        return ExportMetricsServiceResponse().SerializeToString()


class OTLPReceiver:
    """
    Receives spans over OTLP/HTTP.

    :ivar spans: every span received, in order.
    :ivar metrics: every metric received, in order (each export repeats them).
    :ivar headers: the headers of each export request (lower-case names).
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.spans: list[ReceivedSpan] = []
        self.metrics: list[ReceivedMetric] = []
        self._metric_waiters: list = []
        self.headers: list[dict] = []
        self._waiters: list = []
        self._listening: list = []

    def resource(self) -> Resource:
        """The receiver as a twisted.web resource (``/v1/traces``)."""
        root = Resource()
        v1 = Resource()
        root.putChild(b"v1", v1)
        v1.putChild(TRACES_PATH, _Traces(self))
        v1.putChild(METRICS_PATH, _Metrics(self))
        return root

    def received_metrics(self, metrics: list[ReceivedMetric]) -> None:
        """Keep ``metrics``; wake the waiters whose test they pass."""
        self.metrics.extend(metrics)
        still = []
        for test, waiter in self._metric_waiters:
            found = [metric for metric in metrics if test(metric)]
            if found:
                waiter.callback(found[-1])
            else:
                still.append((test, waiter))
        self._metric_waiters = still

    def wait_for_metric(self, test) -> Deferred:
        """Fires with the first metric of a later export for which ``test(metric)`` is true."""
        waiter: Deferred = Deferred()
        self._metric_waiters.append((test, waiter))
        return waiter

    def received(self, spans: list[ReceivedSpan]) -> None:
        """Keep ``spans``; wake the waiters whose spans have all come."""
        self.spans.extend(spans)
        still = []
        for names, waiter in self._waiters:
            if names <= {span.name for span in self.spans}:
                waiter.callback(list(self.spans))
            else:
                still.append((names, waiter))
        self._waiters = still

    def wait_for(self, *names: str) -> Deferred:
        """Fires with every span so far once spans with all these names have come."""
        waiter: Deferred = Deferred()
        self._waiters.append((set(names), waiter))
        self.received([])
        return waiter

    def listen(self, interface: str = "127.0.0.1") -> Deferred:
        """Serve on a free port of ``interface``; Deferred[IListeningPort]."""
        site = Site(self.resource())
        site.log = lambda request: None
        factory = _ConnectionTrackingFactory(site)
        d = TCP4ServerEndpoint(self.reactor, 0, interface=interface).listen(factory)

        def listening(port):
            self._listening.append((port, factory))
            return port

        return d.addCallback(listening)

    def stop(self) -> Deferred:
        """Stop listening and abort open connections (the exporter keeps its alive)."""
        listening, self._listening = self._listening, []
        return stop_listening(listening)


def endpoint_of(port) -> str:
    """The ``OTLP_BASE_ENDPOINT`` of a port :meth:`OTLPReceiver.listen` opened."""
    address = port.getHost()
    return f"http://{address.host}:{address.port}"
