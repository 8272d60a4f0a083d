"""
Metrics, plugin logs and traces end to end: the whole daemon on the real
reactor, real SDK plugins in real uv venvs, the fake Dify inner API and an
OTLP/HTTP receiver on loopback.
"""

from __future__ import annotations

import json
import os

import orjson
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.logger import globalLogPublisher

from difydaemon.testing.inner_api import FakeDifyInnerAPI, base_url
from difydaemon.testing.otlp import OTLPReceiver, endpoint_of
from difydaemon.testing.plugins import behaviour_plugin_files, callback_plugin_files
from tests.test_backwards_end_to_end import INNER_KEY, TOOL_AND_LLM, texts
from tests.test_end_to_end import TENANT, DaemonCase, sse_items
from tests.test_supervision_end_to_end import TwistdCase

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE_ID = TRACEPARENT.split("-")[1]


def metric_samples(text: str) -> dict:
    """``{(name, sorted label items): value}`` of a Prometheus text page."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class ObservedDaemonCase(DaemonCase):
    """Helpers: a tool call with headers, a scrape, the daemon's log events."""

    def capture_logs(self):
        """Keep every log event from now on in ``self.events``."""
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def tool_with(self, tool: str, parameters: dict, headers: dict) -> bytes:
        hdrs = {"X-Plugin-ID": "acme/echo"}
        hdrs.update(headers)
        code, body = await self.call(
            "POST",
            f"/plugin/{TENANT}/dispatch/tool/invoke",
            {"user_id": "u1", "data": {"provider": "echo", "tool": tool, "tool_parameters": parameters, "credentials": {}}},
            hdrs,
        )
        self.assertEqual(code, 200, body)
        return body

    async def collector(self) -> tuple:
        """An OTLP receiver on loopback; (it, the environment that sends a daemon's spans and metrics there)."""
        receiver = OTLPReceiver(reactor)
        port = await receiver.listen()
        self.addCleanup(receiver.stop)
        return receiver, {
            "ENABLE_OTEL": "true",
            "OTLP_BASE_ENDPOINT": endpoint_of(port),
            "OTEL_API_KEY": "collector-key",
            "OTEL_BATCH_EXPORT_SCHEDULE_DELAY": "50",
        }

    async def scrape(self, path: str = "/metrics") -> dict:
        response = await self.http.get(self.url(path))
        self.assertEqual(response.code, 200)
        return metric_samples((await response.content()).decode())


class MetricsEndToEndTests(ObservedDaemonCase):
    """/metrics after real installs and invocations."""

    async def test_counters_after_invocations(self):
        """Installs, successes, errors, runtime status, processes and their memory, HTTP requests."""
        await self._start()
        await self.install(behaviour_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)
        self.assertEqual(texts(await self.tool("echo", {"text": "one"})), ["one"])
        self.assertEqual(texts(await self.tool("echo", {"text": "two"})), ["two"])
        failed = sse_items(await self.tool("fail", {}))
        self.assertNotEqual(failed[-1]["code"], 0)
        found = await self.scrape()
        labels = (("operation", "invoke_tool"), ("plugin_id", "acme/echo"), ("plugin_type", "tool"),
                  ("runtime_type", "local"))
        self.assertEqual(found[("plugin_invocations_total", tuple(sorted(labels + (("status", "success"),))))], 2)
        self.assertEqual(found[("plugin_invocations_total", tuple(sorted(labels + (("status", "error"),))))], 1)
        self.assertEqual(found[("plugin_invocation_duration_seconds_count", labels)], 3)
        self.assertEqual(found[("plugin_invocations_active", labels[1:])], 0)
        errors = [key for key in found if key[0] == "plugin_daemon_invoke_errors_total"]
        self.assertEqual(len(errors), 1, errors)
        self.assertEqual(found[("plugin_installations_total", (("plugin_id", "acme/echo"), ("status", "success")))], 1)
        self.assertEqual(found[("plugin_runtime_status", (("plugin_id", "acme/echo"), ("runtime_type", "local")))], 1)
        self.assertEqual(found[("active_plugins_total", (("runtime_type", "local"),))], 1)
        self.assertEqual(found[("plugin_daemon_plugin_processes", (("plugin", "acme/echo"),))], 1)
        # a minimal SDK plugin is tens of MB resident
        self.assertGreater(found[("plugin_process_resident_memory_bytes", (("plugin_id", "acme/echo"),))], 10 << 20)
        dispatch = (("endpoint", "/plugin/:tenant_id/dispatch/tool/invoke"), ("method", "POST"), ("status", "200"))
        self.assertEqual(found[("plugin_http_requests_total", dispatch)], 3)
        upload = (("endpoint", "/plugin/:tenant_id/management/install/upload/package"), ("method", "POST"),
                  ("status", "200"))
        self.assertEqual(found[("plugin_http_requests_total", upload)], 1)
        saves = [value for key, value in found.items() if key[0] == "storage_operations_total"
                 and ("operation", "save") in key[1] and ("status", "success") in key[1]]
        self.assertTrue(saves and saves[0] >= 1, saves)
        self.assertGreater(found[("process_resident_memory_bytes", ())], 0)
        # the trailing-slash path is the same page
        again = await self.scrape("/metrics/")
        self.assertEqual(again[("plugin_http_requests_total", dispatch)], 3)

    async def test_disabled(self):
        """PROMETHEUS_ENABLED=false: /metrics is a 404 and calls still answer."""
        await self._start(PROMETHEUS_ENABLED="false")
        response = await self.http.get(self.url("/metrics/"))
        self.assertEqual(response.code, 404)
        await response.content()


class PluginLogEndToEndTests(ObservedDaemonCase):
    """A plugin's stray output is its log, and never breaks a session."""

    async def test_print_still_answers(self):
        """A tool that prints plain text (one line, then text glued to its answer) still answers; both are logged."""
        await self._start()
        await self.install(behaviour_plugin_files())
        self.capture_logs()
        self.assertEqual(texts(await self.tool("print", {"text": "hello from print()"})), ["printed"])
        # and the session after it is fine too
        self.assertEqual(texts(await self.tool("echo", {"text": "after"})), ["after"])
        mine = [e for e in self.events if e.get("log_namespace") == "difydaemon.plugin" and e.get("stream") == "stdout"]
        messages = [e["plugin_message"] for e in mine]
        self.assertIn("hello from print()", messages)
        self.assertIn("glued", messages)
        self.assertEqual({e["plugin_id"] for e in mine}, {"acme/echo"})
        self.assertEqual({e["instance"] for e in mine}, {0})
        self.assertTrue(all(isinstance(e["pid"], int) for e in mine))


class TraceEndToEndTests(ObservedDaemonCase):
    """An incoming traceparent reaches the plugin and Dify."""

    async def start_with_dify(self, **environ):
        self.dify = FakeDifyInnerAPI(reactor, INNER_KEY)
        port = await self.dify.listen()
        self.addCleanup(self.dify.stop)
        await self._start(DIFY_INNER_API_URL=base_url(port), DIFY_INNER_API_KEY=INNER_KEY, **environ)

    async def test_reaches_the_plugin(self):
        """The plugin's request line carries the caller's traceparent; a malformed one is not passed on."""
        await self._start()
        await self.install(behaviour_plugin_files(main="recording"))
        await self.tool_with("echo", {"text": "x"}, {"traceparent": TRACEPARENT})
        await self.tool_with("echo", {"text": "y"}, {"traceparent": "00-not-a-trace"})
        [item] = [i for i in sse_items(await self.tool("stdin", {})) if i["data"]["type"] == "json"]
        requests = [orjson.loads(line) for line in item["data"]["message"]["json_object"]["lines"]]
        by_text = {r["data"]["tool_parameters"].get("text"): r for r in requests if r["data"].get("tool") == "echo"}
        self.assertEqual(by_text["x"]["traceparent"], TRACEPARENT)
        self.assertNotIn("traceparent", by_text["y"])

    async def test_reaches_dify(self):
        """A plugin's call back into Dify carries the traceparent of the call that opened its session."""
        await self.start_with_dify()
        await self.install(callback_plugin_files(TOOL_AND_LLM))
        body = await self.tool_with("call_tool", {"provider": "time", "tool": "now", "text": "t"},
                                    {"traceparent": TRACEPARENT})
        self.assertFalse(texts(body)[0].startswith("error"), body)
        [call] = [r for r in self.dify.received if r.path == "invoke/tool"]
        self.assertEqual(call.headers["traceparent"], TRACEPARENT)

    async def test_spans_exported(self):
        """ENABLE_OTEL: request, session and Dify call spans reach an OTLP receiver, in one trace."""
        receiver, environ = await self.collector()
        await self.start_with_dify(**environ)
        await self.install(callback_plugin_files(TOOL_AND_LLM))
        body = await self.tool_with("call_tool", {"provider": "time", "tool": "now", "text": "t"},
                                    {"traceparent": TRACEPARENT})
        self.assertFalse(texts(body)[0].startswith("error"), body)
        server_name = "POST /plugin/:tenant_id/dispatch/tool/invoke"
        spans = await receiver.wait_for(server_name, "plugin session invoke_tool", "dify inner api invoke/tool")
        named = {span.name: span for span in spans if span.trace_id == TRACE_ID}
        server, session, client = (
            named[server_name], named["plugin session invoke_tool"], named["dify inner api invoke/tool"]
        )
        self.assertEqual(server.parent_span_id, TRACEPARENT.split("-")[2])
        self.assertEqual(server.kind, "SPAN_KIND_SERVER")
        self.assertEqual(session.parent_span_id, server.span_id)
        self.assertEqual(client.parent_span_id, session.span_id)
        self.assertEqual(client.kind, "SPAN_KIND_CLIENT")
        self.assertEqual(session.attributes["plugin.id"], "acme/echo")
        self.assertEqual(server.service_name, "dify-plugin-daemon")
        # Dify saw the client span as the parent of its own work
        [call] = [r for r in self.dify.received if r.path == "invoke/tool"]
        self.assertEqual(call.headers["traceparent"], client.traceparent)
        self.assertEqual(receiver.headers[0]["authorization"], "Bearer collector-key")


class MetricsPushEndToEndTests(ObservedDaemonCase):
    """ENABLE_OTEL pushes the metrics over OTLP, /metrics or not, and every request is a span."""

    async def test_pushed_after_invocations(self):
        """With /metrics off, an invocation's counts and the management span reach an OTLP receiver."""
        receiver, environ = await self.collector()
        await self._start(
            PROMETHEUS_ENABLED="false",
            OTEL_METRIC_EXPORT_INTERVAL="100",
            # the push at stop, after the receiver has gone, gives up soon
            OTEL_METRIC_EXPORT_TIMEOUT="1000",
            **environ,
        )
        await self.install(behaviour_plugin_files())
        body = await self.tool_with("echo", {"text": "pushed"}, {})
        self.assertEqual(texts(body), ["pushed"])
        invocations = await receiver.wait_for_metric(
            lambda metric: metric.name == "plugin_invocations_total"
            and any(attributes.get("status") == "success" for attributes, _ in metric.points)
        )
        self.assertEqual(invocations.kind, "sum")
        [(attributes, value)] = invocations.points
        self.assertEqual(
            (attributes["plugin_id"], attributes["operation"], attributes["runtime_type"], value),
            ("acme/echo", "invoke_tool", "local", 1),
        )
        self.assertEqual(invocations.service_name, "dify-plugin-daemon")
        # Go's own instrument, from the same counts
        go_calls = await receiver.wait_for_metric(lambda metric: metric.name == "plugin.invocations")
        self.assertEqual(
            [(a["plugin.id"], a["plugin.outcome"], value) for a, value in go_calls.points], [("acme/echo", "success", 1)]
        )
        metrics_headers = [h for h in receiver.headers if h.get("content-type") == "application/x-protobuf"]
        self.assertTrue(all(h["authorization"] == "Bearer collector-key" for h in metrics_headers))
        response = await self.http.get(self.url("/metrics"))
        self.assertEqual(response.code, 404)
        await response.content()
        # the upload and install went through twisted.web: each request is a server span
        spans = await receiver.wait_for("POST /plugin/:tenant_id/management/install/upload/package")
        upload = [s for s in spans if s.name == "POST /plugin/:tenant_id/management/install/upload/package"]
        self.assertEqual(upload[0].kind, "SPAN_KIND_SERVER")
        self.assertEqual(upload[0].attributes["http.response.status_code"], 200)


class TwistdJSONLogTests(TwistdCase):
    """``twistd -n difydaemon`` with LOG_OUTPUT_FORMAT=json and LOG_FILE."""

    async def test_one_json_object_per_line(self):
        """Every stdout line is one JSON object, plugin output carries its plugin_id, and LOG_FILE gets the same lines."""
        log_file = os.path.abspath(self.mktemp())
        await self._start_twistd(LOG_OUTPUT_FORMAT="json", LOG_FILE=log_file)
        await self.install(behaviour_plugin_files())
        self.assertEqual(self.task["status"], "success", self.task)
        self.assertEqual(texts(await self.tool("print", {"text": "hello json"})), ["printed"])
        self.daemon.signalProcess("TERM")
        await self.watch.ended
        lines = self.watch.stdout.decode().splitlines()
        events = [json.loads(line) for line in lines]
        self.assertTrue(all(isinstance(event, dict) for event in events))
        self.assertGreater(len(events), 5)
        [printed] = [e for e in events if e.get("plugin_message") == "hello json"]
        self.assertEqual(
            (printed["log_namespace"], printed["plugin_id"], printed["instance"], printed["stream"]),
            ("difydaemon.plugin", "acme/echo", 0, "stdout"),
        )
        self.assertTrue(any(e.get("log_format") == "difydaemon is ready" for e in events))
        with open(log_file) as f:
            self.assertEqual(f.read().splitlines(), lines)


class CollectorDownEndToEndTests(ObservedDaemonCase):
    """A collector that is down costs spans, never a call."""

    async def test_calls_answer(self):
        """With ENABLE_OTEL pointing at a closed port, calls answer and the daemon stops."""
        from tests.test_tap import free_port

        await self._start(ENABLE_OTEL="true", OTLP_BASE_ENDPOINT=f"http://127.0.0.1:{free_port()}",
                          OTEL_BATCH_EXPORT_SCHEDULE_DELAY="10", OTEL_BATCH_EXPORT_TIMEOUT="500")
        await self.install(behaviour_plugin_files())
        for text in ("a", "b", "c"):
            body = await self.tool_with("echo", {"text": text}, {"traceparent": TRACEPARENT})
            self.assertEqual(texts(body), [text])
        await self._stop()
        self.assertFalse(self.service.running)
