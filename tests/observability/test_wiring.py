"""What makeService builds for metrics, and the /metrics route."""

from __future__ import annotations

import os

from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock

from difydaemon import tap
from difydaemon.storage.metered import MeteredObjectStorage
from difydaemon.testing.cases import SynchronousTestCase
from tests.test_tap import KEY, environment


class MetricsRouteTests(SynchronousTestCase):
    """GET /metrics and /metrics/ answer Prometheus text without a key, or 404 when disabled."""

    def service(self, **extra):
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        environ = environment(os.path.abspath(self.mktemp()), 5002)
        environ.update(extra)
        return tap.makeService(options, reactor=MemoryReactorClock(), environ=environ)

    def get(self, service, path, method="GET"):
        treq = StubTreq(service.site.resource)
        d = treq.request(method, "http://daemon.test" + path)
        treq.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(treq.content(response))
        return response, body

    def test_served_on_both_paths(self):
        """Both paths answer 200 in Prometheus text format, with no X-Api-Key."""
        service = self.service()
        for path in ("/metrics", "/metrics/"):
            response, body = self.get(service, path)
            self.assertEqual(response.code, 200, path)
            self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))
            self.assertIn(b"# TYPE plugin_invocations_total counter", body)
            self.assertIn(b"active_sessions_total 0.0", body)
        response, _ = self.get(service, "/metrics/", method="POST")
        self.assertEqual(response.code, 404)
        response, _ = self.get(service, "/metrics/more")
        self.assertEqual(response.code, 404)

    def test_openmetrics_when_asked(self):
        """A scraper that accepts OpenMetrics gets it, ending with # EOF."""
        service = self.service()
        treq = StubTreq(service.site.resource)
        d = treq.get("http://daemon.test/metrics/", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        treq.flush()
        response = self.successResultOf(d)
        body = self.successResultOf(treq.content(response))
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(b"application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))

    def test_wiring(self):
        """The storage is metered and the daemon's parts share one metrics object."""
        service = self.service()
        self.assertIsNotNone(service.metrics)
        self.assertIs(service.dispatch.metrics, service.metrics)
        self.assertIsInstance(service.packages._storage, MeteredObjectStorage)
        self.assertIs(service.installer.metrics, service.metrics)

    def test_disabled(self):
        """PROMETHEUS_ENABLED=false: 404 on both paths and nothing counted."""
        service = self.service(PROMETHEUS_ENABLED="false")
        for path in ("/metrics", "/metrics/"):
            response, body = self.get(service, path)
            self.assertEqual(response.code, 404)
            self.assertIn(b"route not found", body)
        self.assertIsNone(service.metrics)
        self.assertIsNone(service.dispatch.metrics)
        self.assertNotIsInstance(service.packages._storage, MeteredObjectStorage)

    def test_key_not_needed_but_harmless(self):
        """A scraper that sends the daemon's key is answered the same."""
        service = self.service()
        treq = StubTreq(service.site.resource)
        d = treq.get("http://daemon.test/metrics/", headers={"X-Api-Key": KEY})
        treq.flush()
        self.assertEqual(self.successResultOf(d).code, 200)
