"""
A tiny OTLP/HTTP trace receiver on loopback, for tests of the daemon's span
export (``ENABLE_OTEL``): it takes ``POST /v1/traces`` with a protobuf
``ExportTraceServiceRequest`` (as the OpenTelemetry OTLP/HTTP exporter sends
it, uncompressed or gzip) and keeps each span as a :class:`ReceivedSpan`.

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


def _value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind is not None else None


def decode_export(body: bytes) -> list[ReceivedSpan]:
    """The spans of one ``ExportTraceServiceRequest``."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=Span.SpanKind.Name(span.kind),
                        status=Status.StatusCode.Name(span.status.code),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        service_name=str(resource.get("service.name", "")),
                    )
                )
    return spans


class _Traces(Resource):
    isLeaf = True

    def __init__(self, receiver: OTLPReceiver) -> None:
        super().__init__()
        self._receiver = receiver

    def render_POST(self, request):
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        body = request.content.read()
        if (request.getHeader(b"content-encoding") or b"").lower() == b"gzip":
            body = gzip.decompress(body)
        self._receiver.headers.append({k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()})
        self._receiver.received(decode_export(body))
        request.setHeader(b"content-type", b"application/x-protobuf")
        return ExportTraceServiceResponse().SerializeToString()


class OTLPReceiver:
    """
    Receives spans over OTLP/HTTP.

    :ivar spans: every span received, in order.
    :ivar headers: the headers of each export request (lower-case names).
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.spans: list[ReceivedSpan] = []
        self.headers: list[dict] = []
        self._waiters: list = []
        self._listening: list = []

    def resource(self) -> Resource:
        """The receiver as a twisted.web resource (``/v1/traces``)."""
        root = Resource()
        v1 = Resource()
        root.putChild(b"v1", v1)
        v1.putChild(TRACES_PATH, _Traces(self))
        return root

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
