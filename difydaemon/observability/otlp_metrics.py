"""
The daemon's metrics pushed over OTLP (``ENABLE_OTEL=true``), as the Go
daemon pushes its own to ``OTLP_METRIC_ENDPOINT`` every
``OTEL_METRIC_EXPORT_INTERVAL``.

What is pushed is what ``/metrics`` shows (the same Prometheus registry,
the same names and labels), read on the reactor thread and handed to the
OpenTelemetry SDK's OTLP metric exporter, which sends it from a thread of
its own: counters as cumulative monotonic sums, gauges as gauges,
histograms as cumulative explicit-bucket histograms.  Go's own OTLP
instruments, which ``/metrics`` does not show, are pushed too, made from the
same counts (:func:`go_instruments`).  Nothing is counted twice through
OpenTelemetry instruments: the dispatch path pays for one set of counts only.
"""

from __future__ import annotations

import threading

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from difydaemon.observability.otel import SERVICE_NAME

log = Logger()

SCOPE = "difydaemon"
#: the instrumentation scope of Go's invocation instruments
GO_SCOPE = "dify-plugin-daemon/plugin"
#: what Go's attributes say when a value is not known
UNKNOWN = "unknown"
#: the longest a stop waits for the last export (seconds), whatever
#: ``OTEL_METRIC_EXPORT_TIMEOUT`` allows the export itself
STOP_WAIT = 5.0


def metrics_data(registry, start_ns: int, now_ns: int, daemon_metrics=None):
    """
    The OpenTelemetry ``MetricsData`` of everything ``registry`` (a
    Prometheus ``CollectorRegistry``) collects now, and with
    ``daemon_metrics`` (the
    :class:`~difydaemon.observability.metrics.DaemonMetrics`) Go's
    invocation instruments, in a scope of their own.  Summaries and info
    metrics, which the daemon does not make, are left out.

    :param start_ns: when the counts started (the daemon's start), ns.
    :param now_ns: the time of this reading, ns.
    """
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Histogram,
        HistogramDataPoint,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    cumulative = AggregationTemporality.CUMULATIVE
    metrics = []
    for family in registry.collect():
        kind = family.type
        if kind == "counter":
            points = [
                NumberDataPoint(dict(sample.labels), start_ns, now_ns, sample.value)
                for sample in family.samples
                if sample.name.endswith("_total")
            ]
            name = family.name + "_total"
            data = Sum(points, cumulative, True)
        elif kind in ("gauge", "unknown"):
            points = [NumberDataPoint(dict(sample.labels), start_ns, now_ns, sample.value) for sample in family.samples]
            name, data = family.name, Gauge(points)
        elif kind == "histogram":
            name, data = family.name, Histogram(_histogram_points(family, start_ns, now_ns, HistogramDataPoint), cumulative)
        else:
            continue
        if data.data_points:
            metrics.append(Metric(name, family.documentation, family.unit or "", data))
    scopes = [ScopeMetrics(InstrumentationScope(SCOPE), metrics, "")]
    if daemon_metrics is not None:
        scopes.append(ScopeMetrics(InstrumentationScope(GO_SCOPE), go_instruments(daemon_metrics, start_ns, now_ns), ""))
    resource = Resource.create({"service.name": SERVICE_NAME})
    return MetricsData([ResourceMetrics(resource, scopes, "")])


def go_instruments(daemon_metrics, start_ns: int, now_ns: int) -> list:
    """
    The Go daemon's OTLP instruments (``internal/core/io_tunnel/otel_metrics.go``)
    from the dispatch sessions counted in ``daemon_metrics``:
    ``plugin.invocations`` (a counter, ``{call}``) and
    ``plugin.invocation.duration`` (a histogram, ``s``), by ``plugin.id``,
    ``plugin.version``, ``plugin.runtime_type``, ``plugin.access_type`` and
    ``plugin.outcome`` (``success`` or ``error``).  The counts are kept by
    plugin id, not version, so ``plugin.version`` is ``unknown``, the value
    Go gives it when it does not know; a caller that left counts as
    ``error``, where Go says ``canceled``.
    """
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Histogram,
        HistogramDataPoint,
        Metric,
        NumberDataPoint,
        Sum,
    )

    from difydaemon.observability.metrics import BUCKETS

    by_outcome: dict = {}
    for (plugin_id, plugin_type, runtime_type, _operation), series in daemon_metrics.invocations.items():
        for outcome, histogram in (("success", series.success), ("error", series.error)):
            if not any(histogram[:-1]):
                continue
            key = (plugin_id, runtime_type, plugin_type, outcome)
            total = by_outcome.get(key)
            by_outcome[key] = list(histogram) if total is None else [a + b for a, b in zip(total, histogram)]
    calls, durations = [], []
    for (plugin_id, runtime_type, plugin_type, outcome), histogram in by_outcome.items():
        attributes = {
            "plugin.id": plugin_id,
            "plugin.version": UNKNOWN,
            "plugin.runtime_type": runtime_type,
            "plugin.access_type": plugin_type,
            "plugin.outcome": outcome,
        }
        count = sum(histogram[:-1])
        calls.append(NumberDataPoint(attributes, start_ns, now_ns, count))
        durations.append(
            HistogramDataPoint(
                attributes, start_ns, now_ns, count, histogram[-1], histogram[:-1], list(BUCKETS), None, None
            )
        )
    if not calls:
        return []
    cumulative = AggregationTemporality.CUMULATIVE
    return [
        Metric(
            "plugin.invocations",
            "Number of plugin runtime invocations handled by the daemon.",
            "{call}",
            Sum(calls, cumulative, True),
        ),
        Metric(
            "plugin.invocation.duration",
            "End-to-end duration of plugin runtime invocations handled by the daemon.",
            "s",
            Histogram(durations, cumulative),
        ),
    ]


def _histogram_points(family, start_ns: int, now_ns: int, point_class) -> list:
    """A Prometheus histogram family's series as OTLP points (per-bucket counts, bounds without +Inf)."""
    series: dict = {}
    for sample in family.samples:
        labels = dict(sample.labels)
        le = labels.pop("le", None)
        key = tuple(sorted(labels.items()))
        entry = series.setdefault(key, {"buckets": [], "count": 0, "sum": 0.0})
        if sample.name.endswith("_bucket") and le is not None:
            entry["buckets"].append((float(le), sample.value))
        elif sample.name.endswith("_count"):
            entry["count"] = int(sample.value)
        elif sample.name.endswith("_sum"):
            entry["sum"] = sample.value
    points = []
    for key, entry in series.items():
        buckets = sorted(entry["buckets"])
        bounds = [bound for bound, _ in buckets if bound != float("inf")]
        counts = []
        below = 0
        for _, cumulative in buckets:
            counts.append(int(cumulative - below))
            below = cumulative
        if len(counts) == len(bounds):
            # no +Inf bucket: what is above the last bound is the rest of the count
            counts.append(max(0, entry["count"] - int(below)))
        points.append(point_class(dict(key), start_ns, now_ns, entry["count"], entry["sum"], counts, bounds, None, None))
    return points


class MetricsPush(Service):
    """
    Pushes ``registry`` through ``exporter`` every ``interval`` seconds
    while running, and once more when stopped (so the last counts leave).

    The registry is read on the reactor thread (the collectors read the
    runtimes' state, which only that thread changes); the export runs in a
    daemon thread, so a collector that is down costs its timeout there,
    never a stalled reactor; the stop waits for the last export, for
    :data:`STOP_WAIT` seconds at most.  An export still running when the
    next one is due makes that one skip.

    :param reactor: an ``IReactorTime`` (and ``IReactorThreads`` unless
        ``run_in_thread`` is given).
    :param exporter: an OpenTelemetry ``MetricExporter`` (the OTLP one).
    :param timeout: seconds one export may take, its retries included.
    :param daemon_metrics: the
        :class:`~difydaemon.observability.metrics.DaemonMetrics` Go's
        instruments are made from (:func:`go_instruments`), or None.
    :param run_in_thread: ``f -> Deferred`` running ``f`` off the reactor
        thread and firing with its result on it (by default in a daemon
        thread of its own).
    """

    def __init__(
        self,
        reactor,
        registry,
        exporter,
        interval: float,
        timeout: float = 30.0,
        run_in_thread=None,
        daemon_metrics=None,
    ) -> None:
        self._reactor = reactor
        self._registry = registry
        self._daemon_metrics = daemon_metrics
        self._exporter = exporter
        self._interval = interval
        self._timeout_millis = timeout * 1000.0
        self._run_in_thread = run_in_thread if run_in_thread is not None else _in_daemon_thread(reactor)
        self._started_ns = 0
        self._loop = None
        self._busy = False

    def startService(self) -> None:
        super().startService()
        self._started_ns = int(self._reactor.seconds() * 1e9)
        self._loop = LoopingCall(self.push)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=False).addErrback(
            lambda failure: log.failure("pushing the metrics stopped", failure)
        )

    def stopService(self) -> Deferred:
        """
        Stop pushing and export the last counts; fires when that export
        ends, or after :data:`STOP_WAIT` seconds at most (a collector that
        hangs costs the stop that long, no more).
        """
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        waiting: Deferred = Deferred()
        exported = self._push(then_shutdown=True)
        if exported is None:
            waiting.callback(None)
            return waiting

        def done(_=None) -> None:
            if not waiting.called:
                waiting.callback(None)
            if timer.active():
                timer.cancel()

        # the export runs in a daemon thread: a stop that did not wait would
        # let the process exit before the last counts leave
        timer = self._reactor.callLater(min(self._timeout_millis / 1000.0, STOP_WAIT), done)
        exported.addBoth(done)
        return waiting

    def push(self, then_shutdown: bool = False) -> None:
        """Read the registry now and export it off the reactor thread (unless an export is running)."""
        # not the Deferred: LoopingCall would wait for it before the next push
        self._push(then_shutdown)

    def _push(self, then_shutdown: bool = False) -> Deferred | None:
        """:meth:`push`; the export's Deferred (fired on the reactor thread), None when none was started."""
        if self._busy and not then_shutdown:
            log.debug("metrics export skipped: the previous one is still running")
            return None
        try:
            data = metrics_data(
                self._registry, self._started_ns, int(self._reactor.seconds() * 1e9), self._daemon_metrics
            )
        except Exception:
            log.failure("reading the metrics to export failed")
            return None
        self._busy = True
        exporter = self._exporter
        timeout_millis = self._timeout_millis

        def export():
            try:
                # the export's deadline is OTEL_METRIC_EXPORT_TIMEOUT, not the
                # exporter's own default (10 s), where the exporter takes one
                return exporter.export(data, timeout_millis=timeout_millis)
            finally:
                if then_shutdown:
                    exporter.shutdown()

        return self._run_in_thread(export).addBoth(self._exported)

    def _exported(self, result) -> None:
        self._busy = False
        if isinstance(result, Failure):
            log.warn("metrics export failed: {error}", error=result.getErrorMessage())
        elif getattr(result, "name", "SUCCESS") != "SUCCESS":
            log.warn("metrics export failed: the collector refused or did not answer ({result})", result=str(result))


def _in_daemon_thread(reactor):
    """``f -> Deferred``: ``f`` run in a daemon thread of its own, its result handed back to the reactor."""

    def run(f) -> Deferred:
        done: Deferred = Deferred()

        def target() -> None:
            try:
                result = f()
            except BaseException:
                reactor.callFromThread(done.errback, Failure())
            else:
                reactor.callFromThread(done.callback, result)

        threading.Thread(target=target, name="difydaemon-otlp-metrics", daemon=True).start()
        return done

    return run


def build_metrics_push(reactor, config, registry, daemon_metrics, exporter=None) -> MetricsPush:
    """
    The :class:`MetricsPush` of an ``ObservabilityConfig`` with ``enable_otel``.

    :param exporter: a metric exporter to use instead of OTLP (tests).
    :raises ConfigError: when the protocol's extra is not installed.
    """
    if exporter is None:
        from difydaemon.observability.otel import otlp_exporter

        exporter = otlp_exporter(config, "metric")
    return MetricsPush(
        reactor,
        registry,
        exporter,
        config.otel_metric_export_interval / 1000.0,
        timeout=config.otel_metric_export_timeout / 1000.0,
        daemon_metrics=daemon_metrics,
    )

