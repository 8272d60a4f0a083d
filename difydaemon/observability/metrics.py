"""
Prometheus metrics with the Go daemon's names and labels (so its dashboards
work), exposed with ``prometheus-client``.

The hot path (one dispatch call, one HTTP request) pays a dictionary lookup,
a ``bisect`` and two additions: counts and histograms are kept here as plain
Python numbers, and :class:`DaemonMetrics` turns them into metric families
only when ``/metrics`` is scraped.  ``prometheus-client``'s own ``Counter``
and ``Histogram`` take a lock and resolve label children on every update,
several times the cost.  What can be read from the daemon's state instead
of counted (runtime status, processes and their memory, sessions) is read at
scrape time by :class:`RuntimeCollector`, never on the hot path.

Everything runs on the reactor thread, the scrape too (:class:`MetricsPage`):
``prometheus-client``'s own ``MetricsResource`` renders in the global
reactor's thread pool, where our collectors would read dictionaries the
reactor thread is changing, and it imports the global reactor.

``prometheus-client`` itself is imported at the first scrape (or when the
OTLP push builds its registry), not when the daemon starts: counting needs
none of it, and it is over a megabyte of the idle daemon's memory (its
``http.server``, ``wsgiref``, ``gzip`` and more) that a daemon nobody
scrapes never uses.
"""

from __future__ import annotations

import os
import re
from bisect import bisect_left
from typing import TYPE_CHECKING

from twisted.web.resource import Resource

from difydaemon.dispatch_routes import route_table

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

#: upper bounds of the duration buckets, in seconds (Prometheus' defaults,
#: which Go's client uses too, plus longer ones: a plugin call or an
#: install may take minutes)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 300.0)
_BUCKET_LABELS = tuple(repr(bound) for bound in BUCKETS) + ("+Inf",)
_SLOTS = len(BUCKETS) + 1

#: the most distinct ``endpoint`` labels kept; later ones count as ``other``
#: so that odd paths cannot grow the exposition without bound
MAX_ENDPOINTS = 256
#: the longest ``endpoint`` label kept (every route's is shorter); a longer
#: path counts as ``other``
MAX_ENDPOINT_LENGTH = 128

#: the request methods counted by name; any other (a client may send any
#: token, thousands of bytes long) counts as ``_OTHER``, the OpenTelemetry
#: HTTP conventions' name for it, so that it cannot grow the labels
HTTP_METHODS = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH")
)
OTHER_METHOD = "_OTHER"

SUCCESS = "success"
ERROR = "error"


def observe(table: dict, key, seconds: float) -> None:
    """Count ``seconds`` in the histogram of ``key`` in ``table``."""
    histogram = table.get(key)
    if histogram is None:
        # one count per bucket (not cumulative), then the sum
        histogram = table[key] = [0] * _SLOTS + [0.0]
    histogram[bisect_left(BUCKETS, seconds)] += 1
    histogram[_SLOTS] += seconds


def _merge(into: dict, key, histogram: list) -> None:
    total = into.get(key)
    if total is None:
        into[key] = list(histogram)
    else:
        for i, value in enumerate(histogram):
            total[i] += value


def _buckets(histogram: list) -> list:
    running = 0
    out = []
    for label, count in zip(_BUCKET_LABELS, histogram):
        running += count
        out.append((label, running))
    return out


def _histogram_family(name: str, documentation: str, labels: list, table: dict) -> HistogramMetricFamily:
    from prometheus_client.core import HistogramMetricFamily

    family = HistogramMetricFamily(name, documentation, labels=labels)
    for key, histogram in table.items():
        family.add_metric(list(key), _buckets(histogram), histogram[_SLOTS])
    return family


def _counter_family(name: str, documentation: str, labels: list, table: dict) -> CounterMetricFamily:
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in table.items():
        family.add_metric(list(key), count)
    return family


class InvocationSeries:
    """
    The counts of one ``(plugin_id, plugin_type, runtime_type, operation)``:
    sessions in flight, and a duration histogram per outcome.
    """

    __slots__ = ("active", "success", "error")

    def __init__(self) -> None:
        self.active = 0
        self.success = [0] * _SLOTS + [0.0]
        self.error = [0] * _SLOTS + [0.0]


class InvocationMeter:
    """
    One plugin session opened by a dispatch call, counted in flight until
    :meth:`finish`.
    """

    __slots__ = ("_series", "_clock", "_started", "_errors", "_plugin_id")

    def __init__(self, series: InvocationSeries, clock, errors: dict, plugin_id: str) -> None:
        self._series = series
        self._clock = clock
        self._started = clock()
        self._errors = errors
        self._plugin_id = plugin_id

    def finish(self, status: str, error_class: str | None = None) -> None:
        """The session ended with ``status`` (``success`` or ``error``); count it once."""
        series = self._series
        if series is None:
            return
        self._series = None
        series.active -= 1
        histogram = series.success if status == SUCCESS else series.error
        seconds = self._clock() - self._started
        histogram[bisect_left(BUCKETS, seconds)] += 1
        histogram[_SLOTS] += seconds
        if error_class is not None:
            key = (self._plugin_id, error_class)
            self._errors[key] = self._errors.get(key, 0) + 1


class DaemonMetrics:
    """
    The daemon's counters and histograms, and their exposition.

    :param clock: ``() -> float`` seconds (``reactor.seconds``).
    :ivar invocations: an :class:`InvocationSeries` by ``(plugin_id,
        plugin_type, runtime_type, operation)``.
    :ivar invoke_errors: failed sessions by ``(plugin_id, error_class)``.
    :ivar http: histograms by ``(method, endpoint, status)``.
    """

    def __init__(self, clock) -> None:
        self.clock = clock
        self.invocations: dict = {}
        self.invoke_errors: dict = {}
        self.http: dict = {}
        self.installations: dict = {}
        self.storage: dict = {}
        self._endpoints: set = set()

    # -- counting (the hot path) ---------------------------------------------

    def invocation(self, plugin_id: str, plugin_type: str, runtime_type: str, operation: str) -> InvocationMeter:
        """A session opens: count it in flight; the meter counts its end."""
        key = (plugin_id, plugin_type, runtime_type, operation)
        series = self.invocations.get(key)
        if series is None:
            series = self.invocations[key] = InvocationSeries()
        series.active += 1
        return InvocationMeter(series, self.clock, self.invoke_errors, plugin_id)

    def http_request(self, method: str, endpoint: str, status: int, seconds: float) -> str:
        """
        One HTTP request answered; the endpoint label it was counted under
        (``other`` once :data:`MAX_ENDPOINTS` are known).
        """
        key = (method, endpoint, status)
        histogram = self.http.get(key)
        if histogram is None:
            if endpoint not in self._endpoints:
                if len(self._endpoints) >= MAX_ENDPOINTS:
                    key = (method, "other", status)
                self._endpoints.add(key[1])
            histogram = self.http.get(key)
            if histogram is None:
                histogram = self.http[key] = [0] * _SLOTS + [0.0]
        histogram[bisect_left(BUCKETS, seconds)] += 1
        histogram[_SLOTS] += seconds
        return key[1]

    def installation(self, plugin_id: str, status: str, seconds: float) -> None:
        """One install job ended with ``status`` (``success`` or ``failed``)."""
        observe(self.installations, (plugin_id, status), seconds)

    def storage_operation(self, operation: str, storage_type: str, status: str, seconds: float) -> None:
        """One object storage operation ended."""
        observe(self.storage, (operation, storage_type, status), seconds)

    # -- exposition ------------------------------------------------------------

    def collect(self):
        """The metric families, built from the counts (a ``prometheus-client`` collector)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        invocations = CounterMetricFamily(
            "plugin_invocations_total",
            "Plugin invocations by outcome.",
            labels=["plugin_id", "plugin_type", "runtime_type", "operation", "status"],
        )
        durations: dict = {}
        outcomes: dict = {}
        # the in-flight gauges have no operation label: sum over operations
        by_type: dict = {}
        in_flight: dict = {}
        for key, series in self.invocations.items():
            for status, histogram in ((SUCCESS, series.success), (ERROR, series.error)):
                count = sum(histogram[:_SLOTS])
                if count:
                    invocations.add_metric(list(key) + [status], count)
                    _merge(outcomes, (key[0], status), histogram)
            _merge(durations, key, series.success)
            _merge(durations, key, series.error)
            by_type[key[:3]] = by_type.get(key[:3], 0) + series.active
            in_flight[key[0]] = in_flight.get(key[0], 0) + series.active
        yield invocations
        yield _histogram_family(
            "plugin_invocation_duration_seconds",
            "Plugin invocation durations.",
            ["plugin_id", "plugin_type", "runtime_type", "operation"],
            durations,
        )
        yield _histogram_family(
            "plugin_daemon_invoke_duration_seconds", "Plugin invocation durations by outcome.",
            ["plugin", "outcome"], outcomes,
        )
        active = GaugeMetricFamily(
            "plugin_invocations_active", "Plugin invocations in flight.",
            labels=["plugin_id", "plugin_type", "runtime_type"],
        )
        for key, count in by_type.items():
            active.add_metric(list(key), count)
        yield active
        flight = GaugeMetricFamily("plugin_daemon_invokes_in_flight", "Plugin invocations in flight.", labels=["plugin"])
        for plugin, count in in_flight.items():
            flight.add_metric([plugin], count)
        yield flight
        yield _counter_family(
            "plugin_daemon_invoke_errors_total",
            "Failed plugin invocations by error class.",
            ["plugin", "error_class"],
            self.invoke_errors,
        )
        yield from _counted_with_durations(
            self.http,
            ("plugin_http_requests_total", "HTTP requests answered.", ["method", "endpoint", "status"]),
            ("plugin_http_request_duration_seconds", "HTTP request durations.", ["method", "endpoint"]),
        )
        yield from _counted_with_durations(
            self.installations,
            ("plugin_installations_total", "Plugin install jobs by outcome.", ["plugin_id", "status"]),
            ("plugin_installation_duration_seconds", "Plugin install job durations.", ["plugin_id"]),
        )
        yield from _counted_with_durations(
            self.storage,
            ("storage_operations_total", "Object storage operations.", ["operation", "storage_type", "status"]),
            ("storage_operation_duration_seconds", "Object storage operation durations.", ["operation", "storage_type"]),
        )


def _counted_with_durations(table: dict, counter: tuple, durations: tuple):
    """
    A counter (``name, documentation, labels``) of the histograms'
    counts, and a histogram of ``table`` merged over the labels the
    duration family leaves out (the last ones of the counter's).
    """
    from prometheus_client.core import CounterMetricFamily

    name, documentation, labels = counter
    family = CounterMetricFamily(name, documentation, labels=labels)
    merged: dict = {}
    kept = len(durations[2])
    for key, histogram in table.items():
        family.add_metric([str(value) for value in key], sum(histogram[:_SLOTS]))
        _merge(merged, key[:kept], histogram)
    yield family
    yield _histogram_family(*durations, merged)


# ---------------------------------------------------------------------------
# The endpoint label: Go's route pattern (gin's FullPath), "" for no route

#: made once: on the dispatch path a lookup is all a label costs
_DISPATCH_LABELS = {route: "/plugin/:tenant_id/dispatch/" + route.decode("ascii") for route in route_table()}
_ID_LIKE = re.compile(r"[^a-z_\-]")


def http_method(method: bytes) -> str:
    """The method label of a request's method: its name if standard, else ``_OTHER``."""
    return method.decode("ascii") if method in HTTP_METHODS else OTHER_METHOD


def dispatch_endpoint(route: bytes) -> str:
    """The endpoint label of a dispatch route (``tool/invoke``), "" for an unknown one."""
    return _DISPATCH_LABELS.get(route, "")


def web_endpoint(path: bytes, status: int) -> str:
    """
    The endpoint label of a request answered through twisted.web: its path
    with the tenant, hook and id-like segments (uuids, identifiers) replaced
    by placeholders; "" when no route answered (404), as gin reports it.
    """
    if status == 404:
        return ""
    text = path.decode("utf-8", "replace")
    if text in ("/metrics", "/metrics/"):
        return "/metrics/"
    segments = text.split("/")
    if len(segments) > 2 and segments[1] == "e":
        return "/e/:hook_id/*path"
    if len(segments) > 3 and segments[1] == "plugin":
        segments[2] = ":tenant_id"
        if segments[3] == "dispatch":
            return dispatch_endpoint("/".join(segments[4:]).encode())
        segments[4:] = [":id" if _ID_LIKE.search(s) else s for s in segments[4:]]
    label = "/".join(segments)
    # a path answered without a route (a 401 at the head) may be kilobytes
    # long; each span of it would carry that as its name and http.route
    return label if len(label) <= MAX_ENDPOINT_LENGTH else "other"


# ---------------------------------------------------------------------------
# Read at scrape time: runtimes, processes and their memory

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_memory(pid: int) -> int | None:
    """The resident set size of process ``pid`` in bytes, None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def _plugin_id_of(identifier: str) -> str:
    """``author/name`` of ``author/name:version@checksum``."""
    return identifier.split(":", 1)[0]


def _runtime_status(runtime) -> float:
    """Go's values: 1 serving, 0.5 launching, 0 stopped or failed."""
    if runtime.is_ready():
        return 1.0
    if getattr(runtime, "state", None) in ("created", "starting"):
        return 0.5
    return 0.0


def _sessions(runtime) -> int:
    instances = getattr(runtime, "instances", None)
    if instances is not None:
        return sum(len(instance.sessions) for instance in instances)
    sessions = getattr(runtime, "sessions", None)
    return len(sessions) if sessions is not None else 0


class RuntimeCollector:
    """
    The runtimes' state, read from the registry when scraped: status,
    restarts, active plugins and sessions, and each local plugin's processes
    and their resident memory (read from ``/proc``).

    :param registry: a :class:`~difydaemon.runtimes.registry.RuntimeRegistry`.
    :param memory: ``(pid) -> bytes | None``.
    """

    def __init__(self, registry, memory=resident_memory) -> None:
        self._registry = registry
        self._memory = memory

    def collect(self):
        """The runtime families (a ``prometheus-client`` collector)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        status = GaugeMetricFamily(
            "plugin_runtime_status",
            "Plugin runtime status: 1 active, 0.5 launching, 0 stopped.",
            labels=["plugin_id", "runtime_type"],
        )
        # Go's labels: a dashboard that sums by runtime_type needs it
        restarts = CounterMetricFamily(
            "plugin_restarts_total",
            "Plugin process restarts by the current runtimes.",
            labels=["plugin_id", "runtime_type"],
        )
        memory_kills = CounterMetricFamily(
            "plugin_memory_kills_total",
            "Plugin processes killed for going over their manifest's resource.memory.",
            labels=["plugin_id"],
        )
        processes = GaugeMetricFamily(
            "plugin_daemon_plugin_processes", "Running plugin processes.", labels=["plugin"]
        )
        memory = GaugeMetricFamily(
            "plugin_process_resident_memory_bytes",
            "Resident memory of a plugin's processes, summed.",
            labels=["plugin_id"],
        )
        active_plugins: dict = {}
        sessions = 0
        for runtime in self._registry.runtimes():
            plugin_id = runtime.plugin_id
            runtime_type = runtime.runtime_type
            status.add_metric([plugin_id, runtime_type], _runtime_status(runtime))
            if runtime.is_ready():
                active_plugins[runtime_type] = active_plugins.get(runtime_type, 0) + 1
            sessions += _sessions(runtime)
            count = getattr(runtime, "restarts", None)
            if count is not None:
                restarts.add_metric([plugin_id, runtime_type], count)
            count = getattr(runtime, "memory_kills", None)
            if count is not None:
                memory_kills.add_metric([plugin_id], count)
            instances = getattr(runtime, "instances", None)
            if instances is not None:
                pids = [instance.pid for instance in instances if instance.pid is not None and not instance.exited]
                processes.add_metric([plugin_id], len(pids))
                rss = [self._memory(pid) for pid in pids]
                memory.add_metric([plugin_id], sum(size for size in rss if size is not None))
        for identifier in self._registry.launching():
            status.add_metric([_plugin_id_of(identifier), self._registry.runtime_type], 0.5)
        for identifier in self._registry.idle():
            # stopped until its next request: no process
            status.add_metric([_plugin_id_of(identifier), self._registry.runtime_type], 0.0)
        yield status
        yield restarts
        yield memory_kills
        yield processes
        yield memory
        plugins = GaugeMetricFamily("active_plugins_total", "Plugins serving.", labels=["runtime_type"])
        for runtime_type, count in active_plugins.items():
            plugins.add_metric([runtime_type], count)
        yield plugins
        yield GaugeMetricFamily("active_sessions_total", "Open plugin sessions.", value=sessions)


def metrics_registry(metrics: DaemonMetrics, runtimes) -> CollectorRegistry:
    """The registry ``/metrics`` renders: the counts, the runtimes and the daemon process."""
    from prometheus_client import CollectorRegistry, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)
    registry.register(RuntimeCollector(runtimes))
    ProcessCollector(registry=registry)
    return registry


class MetricsPage(Resource):
    """
    ``GET /metrics``: the registry in the text format the scraper's
    ``Accept`` asks for (Prometheus text, or OpenMetrics), rendered by
    ``prometheus-client`` on the reactor thread.

    :param registry: the registry, or a function of no arguments that builds
        it, called at the first scrape (which then pays for importing
        ``prometheus-client``: about 10 ms).
    """

    isLeaf = True

    def __init__(self, registry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request):
        from prometheus_client.exposition import choose_encoder

        if callable(self._registry):
            self._registry = self._registry()
        accept = request.requestHeaders.getRawHeaders(b"accept", [b""])[0].decode("latin-1")
        encoder, content_type = choose_encoder(accept)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        return encoder(self._registry)


def metrics_resource(registry) -> MetricsPage:
    """The twisted.web resource of ``/metrics`` (``registry``: as :class:`MetricsPage` takes it)."""
    return MetricsPage(registry)
