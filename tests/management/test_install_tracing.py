"""
An install task's span (ENABLE_OTEL): one per plugin of a task, ended with
the job's outcome, whose traceparent the launcher gets with its progress
(the serverless runtime sends it to its connector: see
``tests.runtimes.serverless.test_runtime``).
"""

from __future__ import annotations

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from difydaemon.observability.otel import build_tracing
from difydaemon.observability.trace import TracedProgress, parse_traceparent
from difydaemon.testing.cases import SynchronousTestCase
from tests.api.harness import DaemonHarness
from tests.api.test_management import echo_package
from tests.observability.test_dispatch_observed import otel_config


class InstallSpanTests(SynchronousTestCase):
    """Each install job is a span, and its trace context travels with its progress."""

    def setUp(self):
        super().setUp()
        self.exporter = InMemorySpanExporter()
        self.tracing = build_tracing(otel_config(), exporter=self.exporter)
        self.daemon = DaemonHarness(self, tracing=self.tracing)
        self.progress = []
        launch = self.daemon.launcher.launch

        def recording(identifier, declaration, package, progress):
            self.progress.append(progress)
            return launch(identifier, declaration, package, progress)

        self.daemon.launcher.launch = recording

    def spans(self):
        self.tracing.shutdown()
        return self.exporter.get_finished_spans()

    def install(self):
        identifier = self.daemon.upload(echo_package())["data"]["unique_identifier"]
        task_id = self.daemon.install(identifier)["task_id"]
        return identifier, task_id

    def test_successful_install_is_one_span(self):
        """A successful install ends one 'plugin install' span naming the plugin and the task, not failed."""
        identifier, task_id = self.install()
        [span] = self.spans()
        self.assertEqual(span.name, "plugin install")
        self.assertEqual(span.attributes["plugin.unique_identifier"], identifier)
        self.assertEqual(span.attributes["install.task_id"], task_id)
        self.assertNotEqual(span.status.status_code, StatusCode.ERROR)

    def test_launcher_gets_the_spans_traceparent(self):
        """The launcher's progress is a TracedProgress naming the install span, and still reports progress."""
        self.install()
        [progress] = self.progress
        self.assertIsInstance(progress, TracedProgress)
        [span] = self.spans()
        self.assertEqual(
            parse_traceparent(progress.traceparent).split("-")[1:3],
            [f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"],
        )
        self.assertEqual(self.daemon.launcher.progress_lines, ["launching"])

    def test_failed_install_marks_the_span(self):
        """A failed install ends its span failed, with the task's message."""
        identifier = self.daemon.upload(echo_package())["data"]["unique_identifier"]
        self.daemon.launcher.fail(identifier, "no network")
        self.daemon.install(identifier)
        [span] = self.spans()
        self.assertEqual((span.status.status_code, span.status.description), (StatusCode.ERROR, "no network"))

    def test_no_tracing_no_wrapper(self):
        """Without ENABLE_OTEL the launcher gets the plain progress callable."""
        daemon = DaemonHarness(self)
        seen = []
        launch = daemon.launcher.launch
        daemon.launcher.launch = lambda i, d, p, progress: (seen.append(progress), launch(i, d, p, progress))[1]
        daemon.install(daemon.upload(echo_package())["data"]["unique_identifier"])
        [progress] = seen
        self.assertNotIsInstance(progress, TracedProgress)
