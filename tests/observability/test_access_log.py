"""The access log: one event per answered request, /health/check only with HEALTH_API_LOG_ENABLED."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from difydaemon.api.admission import FrontDoor
from difydaemon.api.site import DaemonSite
from difydaemon.observability.metrics import DaemonMetrics
from difydaemon.testing.cases import SynchronousTestCase
from tests.api.test_web_channel import KEY, LIMITS, Client, request


class AccessLogTests(SynchronousTestCase):
    """DaemonSite logs requests as events with named fields and counts them."""

    def setUp(self):
        super().setUp()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def access(self):
        return [e for e in self.events if e.get("log_namespace") == "difydaemon.api.access"]

    def client(self, log_health: bool) -> Client:
        client = Client()
        client.site = DaemonSite(client.resource, reactor=client.clock, front_door=FrontDoor(KEY, LIMITS),
                                 log_health=log_health, metrics=DaemonMetrics(client.clock.seconds))
        client.protocol = client.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        client.transport = StringTransport()
        client.protocol.makeConnection(client.transport)
        return client

    def test_management_request_logged(self):
        """A management call is one event with method, path (no query), status, duration and client."""
        client = self.client(log_health=False)
        client.send(request(target=b"/plugin/t/management/install/identifiers?secret=1"))
        [event] = self.access()
        self.assertEqual(
            (event["method"], event["path"], event["status"], event["client"]),
            ("POST", "/plugin/t/management/install/identifiers", 200, "192.168.1.1"),  # StringTransport's peer
        )
        self.assertEqual(event["duration_ms"], 0.0)
        self.assertNotIn("secret", repr(event))
        counted = client.site._metrics.http
        self.assertEqual(
            {key: sum(h[:-1]) for key, h in counted.items()},
            {("POST", "/plugin/:tenant_id/management/install/identifiers", 200): 1},
        )

    def test_health_check_follows_the_setting(self):
        """/health/check is logged only with HEALTH_API_LOG_ENABLED, but counted either way."""
        quiet = self.client(log_health=False)
        quiet.send(request(method=b"GET", target=b"/health/check", body=b"", key=None))
        self.assertEqual(self.access(), [])
        self.assertEqual(sum(sum(h[:-1]) for h in quiet.site._metrics.http.values()), 1)
        loud = self.client(log_health=True)
        loud.send(request(method=b"GET", target=b"/health/check", body=b"", key=None))
        self.assertEqual([e["path"] for e in self.access()], ["/health/check"])

    def test_one_line_per_request(self):
        """A request is logged once, as our event: twisted.web's own combined-log line is not written too."""
        client = self.client(log_health=True)
        # as when the port listens: twisted.web opens its request log here
        client.site.startFactory()
        self.addCleanup(client.site.stopFactory)
        client.send(request(target=b"/plugin/t/management/install/identifiers"))
        client.send(request(method=b"GET", target=b"/health/check", body=b"", key=None))
        self.assertEqual(
            [(e.get("log_namespace"), e.get("path")) for e in self.events],
            [("difydaemon.api.access", "/plugin/t/management/install/identifiers"),
             ("difydaemon.api.access", "/health/check")],
        )
