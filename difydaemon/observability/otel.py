"""
OpenTelemetry spans exported over OTLP (``ENABLE_OTEL=true``; the
``difydaemon[otel]`` extra installs the SDK and the OTLP/HTTP exporter,
``difydaemon[otel-grpc]`` the OTLP/gRPC one for
``OTEL_EXPORTER_OTLP_PROTOCOL=grpc``).

Three kinds of span, as in Go: the HTTP request (server), the plugin session
(internal, its child) and each call back into Dify (client, a child of the
session).  Parents travel as ``traceparent`` strings, never through
``contextvars``: a Deferred callback chain does not carry the context
(twisted#9807), and a span started in one callback and ended in another
would detach the wrong one.  The exporter's batch processor runs in its own
thread; nothing here blocks the reactor but :meth:`Tracing.shutdown`, which
is run in a thread of its own (:class:`ShutdownInThread`).
"""

from __future__ import annotations

from difydaemon.errors import ConfigError
from difydaemon.observability.trace import traceparent_of

#: the span kinds, by name (the SDK's enum is imported lazily)
SERVER = "SERVER"
INTERNAL = "INTERNAL"
CLIENT = "CLIENT"

SERVICE_NAME = "dify-plugin-daemon"


class TracedSpan:
    """
    One started span.

    :ivar traceparent: the W3C ``traceparent`` naming this span as the parent.
    """

    __slots__ = ("_span", "traceparent", "_status")

    def __init__(self, span, traceparent: str, status) -> None:
        self._span = span
        self.traceparent = traceparent
        self._status = status

    def end(self, error: str | None = None) -> None:
        """End the span; ``error`` marks it failed with that description."""
        span = self._span
        if span is None:
            return
        self._span = None
        if error is not None:
            span.set_status(self._status(error))
        span.end()

    def end_request(self, method: str, route: str, code: int) -> None:
        """
        End an HTTP request's span, named ``METHOD route`` (only ``METHOD``
        when no route answered): the route is known once the request is
        answered, not when its span starts.  A 5xx answer marks it failed.
        """
        span = self._span
        if span is None:
            return
        # a method outside the standard ones (``_OTHER``) names the span
        # ``HTTP``, as OpenTelemetry's HTTP conventions say
        name = "HTTP" if method == "_OTHER" else method
        span.update_name(f"{name} {route}" if route else name)
        if route:
            span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", code)
        self.end(f"HTTP {code}" if code >= 500 else None)

    def client_gone(self, reason=None) -> None:
        """End the span of a request whose client left before its answer (a Deferred errback)."""
        self.end("client gone")


class Tracing:
    """
    Starts spans on an OpenTelemetry ``TracerProvider``.

    :param provider: the ``TracerProvider`` (its processors export).
    """

    def __init__(self, provider) -> None:
        from opentelemetry.trace import (
            NonRecordingSpan,
            SpanContext,
            SpanKind,
            Status,
            StatusCode,
            TraceFlags,
            set_span_in_context,
        )

        self._provider = provider
        self._tracer = provider.get_tracer("difydaemon")
        self._kinds = {SERVER: SpanKind.SERVER, INTERNAL: SpanKind.INTERNAL, CLIENT: SpanKind.CLIENT}
        self._remote = lambda trace_id, span_id, flags: set_span_in_context(
            NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags)))
        )
        self._error_status = lambda description: Status(StatusCode.ERROR, description)

    def start(self, name: str, kind: str, parent: str | None, attributes: dict | None = None) -> TracedSpan:
        """
        Start a span under the span ``parent`` names (a ``traceparent``
        already checked by :func:`~difydaemon.observability.trace.parse_traceparent`,
        or one of ours; None: a new trace).
        """
        # the traceparent is read and written here, not by the SDK's
        # propagator: its carrier dicts and getter/setter calls cost about
        # 4 us a span for the same four fields, on a path that opens two
        context = None
        if parent:
            try:
                _, trace_id, span_id, flags = parent.split("-", 4)[:4]
                context = self._remote(int(trace_id, 16), int(span_id, 16), int(flags, 16))
            except ValueError:
                context = None
        span = self._tracer.start_span(name, context=context, kind=self._kinds[kind], attributes=attributes)
        own = span.get_span_context()
        if own.is_valid:
            traceparent = f"00-{own.trace_id:032x}-{own.span_id:016x}-{own.trace_flags:02x}"
        else:
            traceparent = parent or ""
        return TracedSpan(span, traceparent, self._error_status)

    def start_request(self, method: str, headers) -> TracedSpan:
        """
        Start the server span of an HTTP request whose head was just read,
        under the request's valid ``traceparent`` if it has one; it is
        named after its route when it ends (:meth:`TracedSpan.end_request`).

        :param method: a standard method, or ``_OTHER``
            (:func:`~difydaemon.observability.metrics.http_method`).
        :param headers: the request's headers (``getRawHeaders``).
        """
        name = "HTTP" if method == "_OTHER" else method
        return self.start(name, SERVER, traceparent_of(headers), {"http.request.method": method})

    def shutdown(self) -> None:
        """Export what is queued and stop (blocking: run it in a thread)."""
        self._provider.shutdown()


#: the extra to install for each ``OTEL_EXPORTER_OTLP_PROTOCOL``, and the
#: module of its exporters
_PROTOCOLS = {
    "http/protobuf": ("otel", "opentelemetry.exporter.otlp.proto.http"),
    "grpc": ("otel-grpc", "opentelemetry.exporter.otlp.proto.grpc"),
}


def otlp_exporter(config, signal: str):
    """
    The OTLP exporter of ``signal`` (``trace`` or ``metric``) for the
    protocol ``OTEL_EXPORTER_OTLP_PROTOCOL`` names, sending
    ``OTEL_API_KEY`` as a bearer token.

    :raises ConfigError: when that protocol's extra is not installed (at
        start-up: never on the first export).
    """
    extra, package = _PROTOCOLS[config.otel_exporter_otlp_protocol]
    try:
        module = __import__(f"{package}.{signal}_exporter", fromlist=["_"])
    except ImportError:
        raise ConfigError(
            "OTEL_EXPORTER_OTLP_PROTOCOL",
            f"{config.otel_exporter_otlp_protocol} needs the {extra} extra: pip install 'difydaemon[{extra}]'",
        ) from None
    if signal == "trace":
        exporter_class, endpoint = module.OTLPSpanExporter, config.trace_endpoint
        timeout = config.otel_batch_export_timeout / 1000.0
    else:
        exporter_class, endpoint = module.OTLPMetricExporter, config.metric_endpoint
        timeout = config.otel_metric_export_timeout / 1000.0
    options = {"endpoint": endpoint, "timeout": timeout}
    if config.otel_api_key:
        # gRPC metadata keys are lower case; HTTP does not mind
        options["headers"] = {"authorization": f"Bearer {config.otel_api_key}"}
    if extra == "otel-grpc":
        # an http:// endpoint means a collector without TLS, as the URL says
        options["insecure"] = endpoint.startswith("http://")
    return exporter_class(**options)


def build_tracing(config, exporter=None) -> Tracing:
    """
    The :class:`Tracing` of an ``ObservabilityConfig`` with ``enable_otel``.

    :param exporter: a span exporter to use instead of OTLP (tests).
    :raises ConfigError: when the ``otel`` extra (or, for gRPC, the
        ``otel-grpc`` one) is not installed.
    """
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        raise ConfigError("ENABLE_OTEL", "needs the otel extra: pip install 'difydaemon[otel]'") from None
    if exporter is None:
        exporter = otlp_exporter(config, "trace")
    provider = TracerProvider(
        resource=Resource.create({"service.name": SERVICE_NAME}),
        sampler=ParentBased(TraceIdRatioBased(config.otel_sampling_rate)),
        # not at interpreter exit: a collector that is down would hold the
        # exit for the export timeout (ShutdownInThread does it instead)
        shutdown_on_exit=False,
    )
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            max_queue_size=config.otel_max_queue_size,
            schedule_delay_millis=config.otel_batch_export_schedule_delay,
            max_export_batch_size=min(config.otel_max_export_batch_size, config.otel_max_queue_size),
            export_timeout_millis=config.otel_batch_export_timeout,
        )
    )
    return Tracing(provider)


class ShutdownInThread:
    """
    A runner of :class:`~difydaemon.service.DaemonService`: at the end of a
    stop, exports the spans still queued and shuts the provider down in a
    daemon thread of its own.  A collector that is down makes the exporter
    retry for up to ``OTEL_BATCH_EXPORT_TIMEOUT``; the process does not wait
    for that (the reactor's thread pool would be joined at exit), and those
    spans are lost.
    """

    def __init__(self, reactor, tracing: Tracing, start_thread=None) -> None:
        self._reactor = reactor
        self._tracing = tracing
        self._start_thread = start_thread if start_thread is not None else _daemon_thread

    def stop(self) -> None:
        """Shut the exporter down without blocking the reactor or the exit."""
        self._start_thread(self._tracing.shutdown)


def _daemon_thread(target) -> None:
    import threading

    threading.Thread(target=target, name="difydaemon-otel-shutdown", daemon=True).start()
