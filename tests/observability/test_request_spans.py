"""
One server span per HTTP request on both HTTP stacks (the lean dispatch
channel and twisted.web), named after its route, under the caller's
``traceparent``; the plugin session's span is its child; with OpenTelemetry
off nothing of it is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from difydaemon.api.admission import FrontDoor
from difydaemon.api.site import DaemonSite
from difydaemon.observability.metrics import MAX_ENDPOINTS, DaemonMetrics
from difydaemon.observability.otel import build_tracing
from difydaemon.testing.cases import SynchronousTestCase
import tests
from tests.api.test_dispatch_channel import PATH, Connection, post
from tests.api.test_public_endpoint import EndpointCase
from tests.api.test_web_channel import KEY, LIMITS, Client, request
from tests.observability.test_dispatch_observed import TRACEPARENT, otel_config

TRACE_ID = TRACEPARENT.split("-")[1]
CALLER_SPAN = TRACEPARENT.split("-")[2]
DISPATCH_ROUTE = "/plugin/:tenant_id/dispatch/tool/invoke"


class Traced:
    """A Tracing that exports to memory, and the spans it finished."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.tracing = build_tracing(otel_config(), exporter=self.exporter)

    def spans(self) -> list:
        """The finished spans (the batch processor is flushed first)."""
        self.tracing.shutdown()
        return list(self.exporter.get_finished_spans())


class Answering(Resource):
    """A leaf answering ``code`` (200), or nothing while ``hold`` is set."""

    isLeaf = True
    code = 200
    hold = False

    def render(self, request):
        if self.hold:
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        return b"ok"


def web_client(tracing) -> Client:
    """A twisted.web-only connection to a DaemonSite that traces with ``tracing``."""
    client = Client()
    client.resource = Answering()
    client.site = DaemonSite(client.resource, reactor=client.clock, front_door=FrontDoor(KEY, LIMITS),
                             tracing=tracing)
    client.protocol = client.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    client.transport = StringTransport()
    client.protocol.makeConnection(client.transport)
    return client


class WebStackSpanTests(SynchronousTestCase):
    """Every request twisted.web answers is one server span."""

    def setUp(self):
        super().setUp()
        self.traced = Traced()

    def test_management_route(self):
        """A keyed management call: a server span named after its route, child of the caller's span."""
        client = web_client(self.traced.tracing)
        extra = b"traceparent: " + TRACEPARENT.encode() + b"\r\n"
        client.send(request(target=b"/plugin/t1/management/install/identifiers?x=1", extra=extra))
        [span] = self.traced.spans()
        self.assertEqual(span.name, "POST /plugin/:tenant_id/management/install/identifiers")
        self.assertEqual(span.kind, SpanKind.SERVER)
        self.assertEqual(format(span.context.trace_id, "032x"), TRACE_ID)
        self.assertEqual(format(span.parent.span_id, "016x"), CALLER_SPAN)
        self.assertEqual(span.attributes["http.response.status_code"], 200)
        self.assertEqual(span.attributes["http.request.method"], "POST")
        self.assertTrue(span.status.is_ok)

    def test_public_routes_and_no_route(self):
        """/health/check is traced by its path; a 404 is named by its method alone; a new trace each."""
        client = web_client(self.traced.tracing)
        client.send(request(method=b"GET", target=b"/health/check", body=b"", key=None))
        client.resource.code = 404
        client.send(request(method=b"GET", target=b"/nowhere", body=b""))
        health, missing = self.traced.spans()
        self.assertEqual((health.name, missing.name), ("GET /health/check", "GET"))
        self.assertIsNone(health.parent)
        self.assertNotEqual(health.context.trace_id, missing.context.trace_id)
        self.assertEqual(missing.attributes["http.response.status_code"], 404)

    def test_client_gone_ends_the_span(self):
        """A request whose client leaves before its answer still ends its span, as failed."""
        client = web_client(self.traced.tracing)
        client.resource.hold = True
        client.send(request())
        client.protocol.connectionLost(Failure(ConnectionDone()))
        [span] = self.traced.spans()
        self.assertFalse(span.status.is_ok)
        self.assertEqual(span.status.description, "client gone")


class DispatchSpanTests(SynchronousTestCase):
    """A dispatch call is one server span and one session span, on either stack."""

    def check_stack(self, lean: bool) -> None:
        traced = Traced()
        connection = Connection(self, lean=lean, tracing=traced.tracing)
        extra = b"traceparent: " + TRACEPARENT.encode() + b"\r\n"
        raw = connection.send(post(PATH, extra=extra))
        self.assertIn(b"200 OK", raw)
        plugin_request = connection.daemon.runtime.requests[-1]
        spans = traced.spans()
        [server] = [s for s in spans if s.kind == SpanKind.SERVER]
        [session] = [s for s in spans if s.kind == SpanKind.INTERNAL]
        self.assertEqual(server.name, "POST " + DISPATCH_ROUTE)
        self.assertEqual(server.attributes["http.route"], DISPATCH_ROUTE)
        self.assertEqual(format(server.parent.span_id, "016x"), CALLER_SPAN)
        self.assertEqual(session.name, "plugin session invoke_tool")
        self.assertEqual(session.parent.span_id, server.context.span_id)
        self.assertEqual(
            plugin_request["traceparent"], f"00-{TRACE_ID}-{session.context.span_id:016x}-01"
        )

    def test_lean_channel(self):
        """Through the dispatch channel: the channel's span is the session's parent (no second server span)."""
        self.check_stack(lean=True)

    def test_web_stack(self):
        """Through twisted.web: the site's span is the session's parent (no second server span)."""
        self.check_stack(lean=False)


class OffTests(SynchronousTestCase):
    """With ENABLE_OTEL off, tracing costs nothing: OpenTelemetry is never imported."""

    def test_nothing_imported(self):
        """A daemon built and serving requests on both stacks, OTEL off, never imports opentelemetry."""
        script = (
            "import sys\n"
            "from tests.api.test_dispatch_channel import PATH, Connection, post\n"
            "from difydaemon import tap\n"
            "from tests.test_tap import environment\n"
            "from difydaemon.config import load_config\n"
            "from twisted.internet.testing import MemoryReactorClock\n"
            "tap.build_daemon(MemoryReactorClock(), load_config(environment('/nonexistent', 5002)))\n"
            "from twisted.trial.unittest import SynchronousTestCase\n"
            "for lean in (True, False):\n"
            "    assert b'200 OK' in Connection(SynchronousTestCase(), lean=lean).send(post(PATH))\n"
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
        )
        root = os.path.dirname(os.path.dirname(tests.__file__))
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, cwd=root)
        self.assertEqual((out.returncode, out.stdout.strip()), (0, "[]"), out.stderr[-2000:])


class EndpointSessionTests(EndpointCase):
    """A public endpoint call passes the trace on to its plugin session, as dispatch does."""

    def test_traceparent_passed_on(self):
        """OTEL off: the caller's valid traceparent is the session request's, unchanged; a bad one is dropped."""
        self.script(("stream", {"status": 200, "headers": {}, "result": ""}), ("end", {}))
        self.call(headers={"traceparent": TRACEPARENT})
        self.call(headers={"traceparent": "00-garbage"})
        first, second = self.runtime.requests
        self.assertEqual(first["traceparent"], TRACEPARENT)
        self.assertNotIn("traceparent", second)

    def test_session_span(self):
        """OTEL on: the session is a span under the caller's; the plugin sees it as the parent."""
        traced = Traced()
        self.daemon.public._tracing = traced.tracing
        self.script(("stream", {"status": 200, "headers": {}, "result": ""}), ("end", {}))
        self.call(headers={"traceparent": TRACEPARENT})
        [span] = traced.spans()
        [request] = self.runtime.requests
        self.assertEqual(span.name, "plugin session invoke_endpoint")
        self.assertEqual(format(span.parent.span_id, "016x"), CALLER_SPAN)
        self.assertEqual(request["traceparent"], f"00-{TRACE_ID}-{span.context.span_id:016x}-01")
        self.assertEqual(span.attributes["plugin.operation"], "invoke_endpoint")
        self.assertTrue(span.status.is_ok)

    def test_failed_session_span(self):
        """A session the plugin fails ends its span as an error."""
        traced = Traced()
        self.daemon.public._tracing = traced.tracing
        self.script(("error", {"error_type": "ValueError", "message": "boom", "args": None}))
        self.call()
        [span] = traced.spans()
        self.assertFalse(span.status.is_ok)


class HostileRequestTests(SynchronousTestCase):
    """What a client chooses (its method, its path) cannot grow the metrics or the spans without bound."""

    def test_random_methods_are_one_label(self):
        """A flood of made-up methods on a 404 path counts under one method label, and no span carries them."""
        traced = Traced()
        client = web_client(traced.tracing)
        client.site._metrics = metrics = DaemonMetrics(client.clock.seconds)
        client.resource.code = 404
        for i in range(300):
            client.send(request(method=b"X%05d" % i + b"Q" * 2000, target=b"/nowhere/%d" % i, body=b""))
        client.send(request(method=b"GET", target=b"/nowhere", body=b""))
        self.assertEqual({key[0] for key in metrics.http}, {"_OTHER", "GET"})
        spans = traced.spans()
        self.assertEqual(len(spans), 301)
        self.assertEqual({span.name for span in spans}, {"HTTP", "GET"})
        self.assertEqual({span.attributes["http.request.method"] for span in spans}, {"_OTHER", "GET"})

    def test_span_route_is_the_bounded_label(self):
        """Past MAX_ENDPOINTS distinct answered paths, spans are named by the metrics' "other" label, not the path."""
        traced = Traced()
        client = web_client(traced.tracing)
        client.site._metrics = DaemonMetrics(client.clock.seconds)
        client.resource.code = 401
        for i in range(MAX_ENDPOINTS + 3):
            client.send(request(method=b"GET", target=b"/junk/%d" % i, body=b""))
        spans = traced.spans()
        self.assertEqual(len({span.name for span in spans}), MAX_ENDPOINTS + 1)
        self.assertEqual(spans[-1].name, "GET other")
        self.assertEqual(spans[-1].attributes["http.route"], "other")
