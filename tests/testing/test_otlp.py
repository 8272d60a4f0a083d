"""The OTLP/HTTP receiver fake: what the real exporter sends, decoded."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from difydaemon.observability.otel import CLIENT, SERVER, build_tracing
from difydaemon.testing.cases import AsyncTestCase
from difydaemon.testing.otlp import OTLPReceiver, endpoint_of
from tests.observability.test_dispatch_observed import TRACEPARENT, otel_config


class ReceiverTests(AsyncTestCase):
    """Spans exported by OpenTelemetry's OTLP/HTTP exporter arrive whole."""

    async def test_export_over_loopback(self):
        """Names, ids, parents, kinds, status, attributes, service name and the exporter's headers."""
        receiver = OTLPReceiver(reactor)
        port = await receiver.listen()
        self.addCleanup(receiver.stop)
        tracing = build_tracing(otel_config(OTLP_BASE_ENDPOINT=endpoint_of(port), OTEL_API_KEY="k"))
        server = tracing.start("server", SERVER, TRACEPARENT, {"a": "b"})
        client = tracing.start("client", CLIENT, server.traceparent)
        client.end("it broke")
        server.end()
        # the exporter blocks on its HTTP call: never on the reactor thread
        await deferToThread(tracing.shutdown)
        spans = {span.name: span for span in receiver.spans}
        self.assertEqual(set(spans), {"server", "client"})
        self.assertEqual(spans["server"].trace_id, TRACEPARENT.split("-")[1])
        self.assertEqual(spans["server"].parent_span_id, TRACEPARENT.split("-")[2])
        self.assertEqual(spans["client"].parent_span_id, spans["server"].span_id)
        self.assertEqual(spans["client"].traceparent.split("-")[2], spans["client"].span_id)
        self.assertEqual(spans["server"].kind, "SPAN_KIND_SERVER")
        self.assertEqual(spans["client"].status, "STATUS_CODE_ERROR")
        self.assertEqual(spans["server"].attributes, {"a": "b"})
        self.assertEqual(spans["server"].service_name, "dify-plugin-daemon")
        self.assertEqual(receiver.headers[0]["authorization"], "Bearer k")
        self.assertEqual(receiver.headers[0]["content-type"], "application/x-protobuf")
