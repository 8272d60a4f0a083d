"""Tests for difydaemon.observability.metrics: counts, labels and their exposition."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from difydaemon.observability.metrics import (
    MAX_ENDPOINTS,
    DaemonMetrics,
    MetricsPage,
    RuntimeCollector,
    dispatch_endpoint,
    metrics_registry,
    resident_memory,
    web_endpoint,
)
from difydaemon.testing.cases import SynchronousTestCase


def samples(*collectors) -> dict:
    """``{(name, sorted label items): value}`` of what the collectors expose, parsed back from the text."""
    registry = CollectorRegistry(auto_describe=False)
    for collector in collectors:
        registry.register(collector)
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


ECHO = (("operation", "invoke_tool"), ("plugin_id", "acme/echo"), ("plugin_type", "tool"), ("runtime_type", "local"))


class InvocationTests(SynchronousTestCase):
    """Sessions are counted in flight, then by outcome, with Go's names and labels."""

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.metrics = DaemonMetrics(self.clock.seconds)

    def test_in_flight_then_success(self):
        """An open session is in flight; once finished it counts as a success with its duration."""
        meter = self.metrics.invocation("acme/echo", "tool", "local", "invoke_tool")
        found = samples(self.metrics)
        active = (("plugin_id", "acme/echo"), ("plugin_type", "tool"), ("runtime_type", "local"))
        self.assertEqual(found[("plugin_invocations_active", active)], 1)
        self.assertEqual(found[("plugin_daemon_invokes_in_flight", (("plugin", "acme/echo"),))], 1)
        self.clock.advance(0.3)
        meter.finish("success")
        meter.finish("error", "again")  # a second end is not counted
        found = samples(self.metrics)
        self.assertEqual(found[("plugin_invocations_active", active)], 0)
        self.assertEqual(found[("plugin_invocations_total", tuple(sorted(ECHO + (("status", "success"),))))], 1)
        self.assertNotIn(("plugin_invocations_total", tuple(sorted(ECHO + (("status", "error"),)))), found)
        self.assertEqual(found[("plugin_invocation_duration_seconds_bucket", tuple(sorted(ECHO + (("le", "0.25"),))))], 0)
        self.assertEqual(found[("plugin_invocation_duration_seconds_bucket", tuple(sorted(ECHO + (("le", "0.5"),))))], 1)
        self.assertEqual(found[("plugin_invocation_duration_seconds_bucket", tuple(sorted(ECHO + (("le", "+Inf"),))))], 1)
        self.assertAlmostEqual(found[("plugin_invocation_duration_seconds_sum", ECHO)], 0.3)
        outcome = (("outcome", "success"), ("plugin", "acme/echo"))
        self.assertEqual(found[("plugin_daemon_invoke_duration_seconds_count", outcome)], 1)

    def test_errors_by_class(self):
        """A failed session counts as an error and by its error class."""
        self.metrics.invocation("acme/echo", "tool", "local", "invoke_tool").finish("error", "PluginInvokeError")
        self.metrics.invocation("acme/echo", "tool", "local", "invoke_tool").finish("error", "client_gone")
        self.metrics.invocation("acme/echo", "tool", "local", "invoke_tool").finish("success")
        found = samples(self.metrics)
        self.assertEqual(found[("plugin_invocations_total", tuple(sorted(ECHO + (("status", "error"),))))], 2)
        self.assertEqual(found[("plugin_invocations_total", tuple(sorted(ECHO + (("status", "success"),))))], 1)
        errors = "plugin_daemon_invoke_errors_total"
        self.assertEqual(found[(errors, (("error_class", "PluginInvokeError"), ("plugin", "acme/echo")))], 1)
        self.assertEqual(found[(errors, (("error_class", "client_gone"), ("plugin", "acme/echo")))], 1)
        # the duration histogram has no status label: both outcomes in one series
        self.assertEqual(found[("plugin_invocation_duration_seconds_count", ECHO)], 3)


class CountedTests(SynchronousTestCase):
    """HTTP requests, install jobs and storage operations."""

    def setUp(self):
        super().setUp()
        self.metrics = DaemonMetrics(Clock().seconds)

    def test_http_requests(self):
        """Requests count by method, endpoint and status; durations by method and endpoint."""
        self.metrics.http_request("POST", "/plugin/:tenant_id/dispatch/tool/invoke", 200, 0.002)
        self.metrics.http_request("POST", "/plugin/:tenant_id/dispatch/tool/invoke", 404, 0.001)
        found = samples(self.metrics)
        route = ("endpoint", "/plugin/:tenant_id/dispatch/tool/invoke")
        self.assertEqual(found[("plugin_http_requests_total", (route, ("method", "POST"), ("status", "200")))], 1)
        self.assertEqual(found[("plugin_http_requests_total", (route, ("method", "POST"), ("status", "404")))], 1)
        self.assertEqual(found[("plugin_http_request_duration_seconds_count", (route, ("method", "POST")))], 2)

    def test_endpoint_labels_are_bounded(self):
        """Past MAX_ENDPOINTS distinct endpoints, new ones count as "other"."""
        for i in range(MAX_ENDPOINTS + 5):
            self.metrics.http_request("GET", f"/x{i}", 200, 0.0)
        endpoints = {key[1] for key in self.metrics.http}
        self.assertEqual(len(endpoints), MAX_ENDPOINTS + 1)
        self.assertIn("other", endpoints)

    def test_installations_and_storage(self):
        """Install jobs count by plugin and status; storage operations by operation, type and status."""
        self.metrics.installation("acme/echo", "success", 4.0)
        self.metrics.installation("acme/echo", "failed", 1.0)
        self.metrics.storage_operation("save", "local", "success", 0.01)
        found = samples(self.metrics)
        self.assertEqual(found[("plugin_installations_total", (("plugin_id", "acme/echo"), ("status", "success")))], 1)
        self.assertEqual(found[("plugin_installation_duration_seconds_count", (("plugin_id", "acme/echo"),))], 2)
        key = (("operation", "save"), ("status", "success"), ("storage_type", "local"))
        self.assertEqual(found[("storage_operations_total", key)], 1)
        self.assertEqual(
            found[("storage_operation_duration_seconds_count", (("operation", "save"), ("storage_type", "local")))], 1
        )


class EndpointLabelTests(SynchronousTestCase):
    """Endpoint labels are route patterns, never raw ids."""

    def test_dispatch_routes(self):
        """A known dispatch route is its pattern; an unknown one is empty."""
        self.assertEqual(dispatch_endpoint(b"tool/invoke"), "/plugin/:tenant_id/dispatch/tool/invoke")
        self.assertEqual(dispatch_endpoint(b"no/such/route"), "")

    def test_web_paths(self):
        """Tenants, hooks and id-like segments become placeholders; a 404 has no endpoint."""
        tenant = "0193a8a4-0000-7000-8000-000000000001"
        self.assertEqual(
            web_endpoint(f"/plugin/{tenant}/management/install/tasks/0193a8a4-aaaa".encode(), 200),
            "/plugin/:tenant_id/management/install/tasks/:id",
        )
        self.assertEqual(
            web_endpoint(f"/plugin/{tenant}/dispatch/tool/invoke".encode(), 200),
            "/plugin/:tenant_id/dispatch/tool/invoke",
        )
        self.assertEqual(web_endpoint(b"/e/abc123/some/path", 200), "/e/:hook_id/*path")
        self.assertEqual(web_endpoint(b"/metrics", 200), "/metrics/")
        self.assertEqual(web_endpoint(b"/health/check", 200), "/health/check")
        self.assertEqual(web_endpoint(f"/plugin/{tenant}/whatever/{tenant}".encode(), 404), "")

    def test_long_paths_are_other(self):
        """A path longer than any route (a 401 at the head for kilobytes of junk) is labelled "other"."""
        self.assertEqual(web_endpoint(b"/junk/" + b"p" * 5000, 401), "other")
        self.assertEqual(web_endpoint(b"/plugin/t/" + b"q" * 5000 + b"/x", 401), "other")
        self.assertEqual(web_endpoint(b"/plugin/t/management/models", 401), "/plugin/:tenant_id/management/models")


class FakeInstance:
    def __init__(self, pid, sessions=0, exited=False):
        self.pid = pid
        self.sessions = [object()] * sessions
        self.exited = exited


class FakeRuntime:
    def __init__(self, plugin_id, ready, state, instances=None, runtime_type="local", restarts=None, memory_kills=None):
        self.plugin_id = plugin_id
        self._ready = ready
        self.state = state
        self.runtime_type = runtime_type
        if instances is not None:
            self.instances = instances
        if restarts is not None:
            self.restarts = restarts
        if memory_kills is not None:
            self.memory_kills = memory_kills

    def is_ready(self):
        return self._ready


class FakeRegistry:
    runtime_type = "local"

    def __init__(self, runtimes, launching=(), idle=()):
        self._runtimes = runtimes
        self._launching = list(launching)
        self._idle = list(idle)

    def runtimes(self):
        return list(self._runtimes)

    def launching(self):
        return list(self._launching)

    def idle(self):
        return list(self._idle)


class RuntimeCollectorTests(SynchronousTestCase):
    """Runtime state is read from the registry at scrape time."""

    def test_status_processes_memory_sessions(self):
        """Status values (an idle plugin's 0), restarts, memory kills, processes and their summed RSS, active plugins and open sessions."""
        running = FakeRuntime(
            "acme/echo", True, "running", [FakeInstance(11, sessions=2), FakeInstance(12, sessions=1)], restarts=3,
            memory_kills=2,
        )
        starting = FakeRuntime("acme/slow", False, "starting", [FakeInstance(13)], restarts=0)
        failed = FakeRuntime("acme/dead", False, "failed", [FakeInstance(14, exited=True)], restarts=5)
        debug = FakeRuntime("acme/debug", True, "running", runtime_type="remote")
        debug.sessions = {"s": object()}
        registry = FakeRegistry(
            [running, starting, failed, debug], launching=["acme/new:0.0.1@" + "a" * 64], idle=["acme/idle:0.0.1@" + "b" * 64]
        )
        memory = {11: 1000, 12: 2000, 13: None}
        found = samples(RuntimeCollector(registry, memory=memory.get))
        status = "plugin_runtime_status"
        self.assertEqual(found[(status, (("plugin_id", "acme/echo"), ("runtime_type", "local")))], 1.0)
        self.assertEqual(found[(status, (("plugin_id", "acme/slow"), ("runtime_type", "local")))], 0.5)
        self.assertEqual(found[(status, (("plugin_id", "acme/dead"), ("runtime_type", "local")))], 0.0)
        self.assertEqual(found[(status, (("plugin_id", "acme/debug"), ("runtime_type", "remote")))], 1.0)
        self.assertEqual(found[(status, (("plugin_id", "acme/new"), ("runtime_type", "local")))], 0.5)
        self.assertEqual(found[(status, (("plugin_id", "acme/idle"), ("runtime_type", "local")))], 0.0)
        self.assertEqual(found[("plugin_restarts_total", (("plugin_id", "acme/echo"), ("runtime_type", "local")))], 3)
        self.assertEqual(found[("plugin_memory_kills_total", (("plugin_id", "acme/echo"),))], 2)
        self.assertNotIn(("plugin_memory_kills_total", (("plugin_id", "acme/debug"),)), found)
        self.assertEqual(found[("plugin_daemon_plugin_processes", (("plugin", "acme/echo"),))], 2)
        self.assertEqual(found[("plugin_daemon_plugin_processes", (("plugin", "acme/dead"),))], 0)
        self.assertEqual(found[("plugin_process_resident_memory_bytes", (("plugin_id", "acme/echo"),))], 3000)
        self.assertEqual(found[("plugin_process_resident_memory_bytes", (("plugin_id", "acme/slow"),))], 0)
        self.assertEqual(found[("active_plugins_total", (("runtime_type", "local"),))], 1)
        self.assertEqual(found[("active_plugins_total", (("runtime_type", "remote"),))], 1)
        self.assertEqual(found[("active_sessions_total", ())], 4)

    def test_resident_memory_from_proc(self):
        """This process's RSS is read from /proc; a process that is gone reads as None."""
        self.assertGreater(resident_memory(os.getpid()), 1 << 20)
        self.assertIsNone(resident_memory(2**22 + 12345))

    def test_registry_includes_daemon_process(self):
        """The /metrics registry also exposes the daemon's own process metrics."""
        registry = metrics_registry(DaemonMetrics(Clock().seconds), FakeRegistry([]))
        text = generate_latest(registry).decode()
        self.assertIn("process_resident_memory_bytes ", text)
        self.assertIn("active_sessions_total 0.0", text)


class PageTests(SynchronousTestCase):
    """``/metrics`` builds its registry at the first scrape when given a function for it."""

    def test_registry_built_once_at_first_scrape(self):
        """The function is not called before a scrape, then once: later scrapes render the same registry."""
        built = []

        def build():
            built.append(metrics_registry(DaemonMetrics(Clock().seconds), FakeRegistry([])))
            return built[-1]

        page = MetricsPage(build)
        self.assertEqual(built, [])
        for _ in range(2):
            text = page.render_GET(DummyRequest([b""])).decode()
            self.assertIn("active_sessions_total 0.0", text)
        self.assertEqual(len(built), 1)
