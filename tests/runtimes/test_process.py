"""Tests for difydaemon.runtimes.process: framing one plugin subprocess."""

from __future__ import annotations

from twisted.logger import LogLevel, globalLogPublisher

from difydaemon import errors
from difydaemon.runtimes.codec import SessionMessage
from difydaemon.runtimes.process import PluginProcessProtocol, RollingTail, log_level
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.process import FakeProcessReactor

HEARTBEAT = b'{"event":"heartbeat","session_id":null,"data":{}}\n\n'
MANIFEST = b'{"version":"0.0.1","type":"plugin","author":"acme","name":"echo"}\n\n'


class RecordingOwner:
    """The instance side of the protocol: records what it is handed."""

    def __init__(self):
        self.messages = []
        self.ended = []
        self.reaped = []

    def process_reaped(self, protocol):
        self.reaped.append(protocol)

    def session_message(self, item):
        self.messages.append(item)

    def process_ended(self, protocol):
        self.ended.append(protocol)


class PluginProcessProtocolTests(SynchronousTestCase):
    """The protocol frames stdout, tracks readiness and reports the exit."""

    def setUp(self):
        super().setUp()
        self.reactor = FakeProcessReactor()
        self.owner = RecordingOwner()
        self.protocol = PluginProcessProtocol(
            self.owner, self.reactor, "acme/echo", max_line_size=1024, readiness_timeout=120
        )
        self.process = self.reactor.spawnProcess(self.protocol, "python", ["python", "-m", "main"])
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def events(self, level=None):
        return [e for e in self.logged if level is None or e["log_level"] == level]

    def test_ready_on_first_heartbeat_not_manifest(self):
        """The manifest line does not make the plugin ready; the first heartbeat does."""
        self.process.stdout(MANIFEST)
        self.assertNoResult(self.protocol.ready)
        self.process.stdout(HEARTBEAT)
        self.assertIsNone(self.successResultOf(self.protocol.ready))
        self.assertTrue(self.protocol.is_ready)
        self.process.stdout(HEARTBEAT)
        self.assertEqual(self.owner.messages, [])

    def test_session_messages_handed_to_owner(self):
        """Session messages go to the owner's session_message, in order."""
        self.process.stdout(
            b'{"event":"session","session_id":"s1","data":{"type":"stream","data":{"a":1}}}\n\n'
            b'{"event":"session","session_id":"s1","data":{"type":"end","data":{}}}\n\n'
        )
        self.assertEqual(
            self.owner.messages,
            [
                SessionMessage("s1", "stream", {"a": 1}, b'{"a":1}'),
                SessionMessage("s1", "end", {}, None),
            ],
        )

    def test_exit_before_ready_fails_with_stderr_tail(self):
        """An exit before the first heartbeat fails ready with the exit code and stderr tail."""
        self.process.stderr(b"Traceback (most recent call last):\n")
        self.process.stderr(b"ModuleNotFoundError: No module named 'dify_plugin'\n")
        self.process.exit(1)
        failure = self.failureResultOf(self.protocol.ready, errors.InternalServerError)
        message = failure.value.message
        self.assertTrue(message.startswith("plugin did not become ready: exited with code 1"), message)
        self.assertIn("No module named 'dify_plugin'", message)
        self.assertEqual(self.owner.ended, [self.protocol])
        self.assertEqual(self.protocol.exit_code, 1)

    def test_non_json_stdout_in_failure(self):
        """Non-JSON stdout (print output) is kept for the failure message; the manifest is not."""
        self.process.stdout(MANIFEST + b"cannot find _assets\n")
        self.process.exit(2)
        message = self.failureResultOf(self.protocol.ready).value.message
        self.assertIn("stdout:\ncannot find _assets", message)
        self.assertNotIn("acme", message)

    def test_killed_by_signal_description(self):
        """A process ended by a signal is described as such."""
        self.process.kill_by_signal(9)
        message = self.failureResultOf(self.protocol.ready).value.message
        self.assertEqual(message, "plugin did not become ready: killed by signal 9")
        self.assertEqual(self.protocol.describe_exit(), "killed by signal 9")

    def test_readiness_timeout(self):
        """No heartbeat within the deadline fails ready and kills the process."""
        self.reactor.advance(119)
        self.assertNoResult(self.protocol.ready)
        self.reactor.advance(1)
        failure = self.failureResultOf(self.protocol.ready, errors.InternalServerError)
        self.assertEqual(failure.value.message, "plugin did not become ready: no heartbeat within 120 s")
        self.assertEqual(self.process.signals, ["KILL"])
        self.reactor.advance(0)
        self.assertEqual(self.owner.ended, [self.protocol])

    def test_ready_cancels_deadline(self):
        """After readiness the deadline timer is gone."""
        self.process.stdout(HEARTBEAT)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_exit_after_ready(self):
        """An exit after readiness is reported to the owner; ready stays successful."""
        self.process.stdout(HEARTBEAT)
        self.process.exit(0)
        self.successResultOf(self.protocol.ready)
        self.assertEqual(self.owner.ended, [self.protocol])
        self.assertEqual(self.protocol.describe_exit(), "exited with code 0")

    def test_oversized_line_kills(self):
        """A stdout line over the limit is logged and kills the process; later output is ignored."""
        self.process.stdout(HEARTBEAT)
        self.process.stdout(b"x" * 2000)
        self.assertEqual(self.process.signals, ["KILL"])
        self.process.stdout(
            b'\n{"event":"session","session_id":"s1","data":{"type":"end","data":{}}}\n'
        )
        self.assertEqual(self.owner.messages, [])
        [event] = [e for e in self.events(LogLevel.error)]
        self.assertEqual(event["plugin_id"], "acme/echo")

    def test_log_levels(self):
        """Plugin log events are logged at the mapped level with the plugin id."""
        self.process.stdout(
            b'{"event": "log", "data": {"level": "WARNING", "message": "careful", "timestamp": 1.5}}\n'
            b'{"event": "log", "data": {"level": "CRITICAL", "message": "dying", "timestamp": 2}}\n'
        )
        events = [e for e in self.logged if "plugin_level" in e]
        self.assertEqual(
            [(e["log_level"], e["plugin_message"], e["plugin_id"]) for e in events],
            [(LogLevel.warn, "careful", "acme/echo"), (LogLevel.error, "dying", "acme/echo")],
        )

    def test_level_mapping(self):
        """debug, warn/warning, error/fatal/critical map; anything else is info."""
        self.assertEqual(
            [log_level(name) for name in ["DEBUG", "warn", "WARNING", "ERROR", "fatal", "CRITICAL", "INFO", "odd"]],
            [LogLevel.debug, LogLevel.warn, LogLevel.warn, LogLevel.error, LogLevel.error,
             LogLevel.error, LogLevel.info, LogLevel.info],
        )

    def test_plugin_error_event_logged(self):
        """A top-level error event is logged as an error and closes nothing."""
        self.process.stdout(b'{"event":"error","session_id":null,"data":{"error":"boom"}}\n\n')
        [event] = self.events(LogLevel.error)
        self.assertEqual(event["error"], {"error": "boom"})
        self.assertEqual(self.owner.ended, [])

    def test_stderr_lines_logged(self):
        """stderr is logged a line at a time, even when a line arrives in pieces."""
        self.process.stderr(b"first li")
        self.process.stderr(b"ne\nsecond\n")
        lines = [e["plugin_message"] for e in self.events(LogLevel.warn) if e.get("stream") == "stderr"]
        self.assertEqual(lines, ["first line", "second"])

    def test_plugin_output_is_logged_per_plugin(self):
        """Log events, print() lines and stderr lines are events of difydaemon.plugin with plugin_id and instance."""
        protocol = PluginProcessProtocol(
            self.owner, self.reactor, "acme/other", max_line_size=1024, readiness_timeout=120, instance=2
        )
        process = self.reactor.spawnProcess(protocol, "python", ["python", "-m", "main"])
        process.stdout(b'{"event":"log","data":{"level":"INFO","message":"from logging"}}\n')
        process.stdout(b"a stray print\n")
        process.stderr(b"a warning\n")
        events = [e for e in self.logged if e["log_namespace"] == "difydaemon.plugin"]
        self.assertEqual(
            [(e["stream"], e["plugin_message"], e["plugin_id"], e["instance"], e["log_level"]) for e in events],
            [
                ("log", "from logging", "acme/other", 2, LogLevel.info),
                ("stdout", "a stray print", "acme/other", 2, LogLevel.info),
                ("stderr", "a warning", "acme/other", 2, LogLevel.warn),
            ],
        )
        self.assertEqual(events[1]["pid"], process.pid)

    def test_print_glued_to_a_message_keeps_the_message(self):
        """Text printed without a newline before a session message is logged, and the message still arrives."""
        self.process.stdout(b'no newline{"event":"session","session_id":"s1","data":{"type":"end","data":{}}}\n')
        self.assertEqual([m.kind for m in self.owner.messages], ["end"])
        [event] = [e for e in self.logged if e.get("stream") == "stdout"]
        self.assertEqual(event["plugin_message"], "no newline")

    def test_activity_refreshes_last_active(self):
        """Any stdout or stderr bytes refresh last_active."""
        self.reactor.advance(10)
        self.process.stderr(b"x")
        self.assertEqual(self.protocol.last_active, 10)
        self.reactor.advance(5)
        self.process.stdout(b"partial")
        self.assertEqual(self.protocol.last_active, 15)

    def test_signal_after_exit(self):
        """signal() on an ended process returns False instead of raising."""
        self.process.exit(0)
        self.failureResultOf(self.protocol.ready, errors.InternalServerError)
        self.assertFalse(self.protocol.signal("TERM"))

    def test_reaped_before_pipes_close(self):
        """The owner hears of the exit as soon as the process is reaped, before its pipes close, and then once more at the end."""
        self.process.stdout(HEARTBEAT)
        self.process.exit_holding_pipes(0)
        self.assertEqual((self.owner.reaped, self.owner.ended), ([self.protocol], []))
        self.assertTrue(self.protocol.reaped)
        self.assertFalse(self.protocol.signal("TERM"))
        self.process.release_pipes()
        self.assertEqual(self.owner.ended, [self.protocol])


class RollingTailTests(SynchronousTestCase):
    """RollingTail keeps only the newest bytes."""

    def test_keeps_newest(self):
        """Only the last size bytes survive."""
        tail = RollingTail(5)
        tail.write(b"abc")
        tail.write(b"defg")
        self.assertEqual(tail.text(), "cdefg")
        self.assertEqual(len(tail), 5)
