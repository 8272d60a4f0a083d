"""Tests for difydaemon.runtimes.local, driven through the fake process reactor."""

from __future__ import annotations

import os
import sys

from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface.verify import verifyObject

from difydaemon import errors
from difydaemon.interfaces import IPluginRuntime
from difydaemon.runtimes.codec import encode_request
from difydaemon.runtimes.local import PIPE_CLOSE_DELAY, LivenessPolicy, LocalRuntime, RestartPolicy, hung_message
from difydaemon.runtimes.parent_death import LAUNCHER, ParentDeathSignal
from difydaemon.runtimes.process_table import MemoryProcessTable
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from difydaemon.testing.process import FakeProcessReactor
from tests.runtimes.listeners import RecordingListener

IDENTIFIER = "acme/echo:0.0.1@" + "0" * 64
WORKING_DIR = "/plugins/acme/echo-0.0.1@" + "0" * 64
PYTHON = WORKING_DIR + "/.venv/bin/python"

MANIFEST = b'{"version":"0.0.1","type":"plugin","author":"acme","name":"echo"}\n\n'
HEARTBEAT = b'{"event":"heartbeat","session_id":null,"data":{}}\n\n'
EXITED = ("error", "ConnectionClosedError", "plugin instance exited", None)


def request(session_id: str) -> dict:
    """A §0.2 request with all eight keys."""
    return {
        "session_id": session_id,
        "conversation_id": None,
        "message_id": None,
        "app_id": None,
        "endpoint_id": None,
        "context": None,
        "event": "request",
        "data": {"action": "invoke_tool", "provider": "echo", "tool": "echo", "type": "tool"},
    }


def session_line(session_id: str, kind: str, data: bytes = b"{}") -> bytes:
    return (
        b'{"event":"session","session_id":"' + session_id.encode() + b'","data":{"type":"'
        + kind.encode() + b'","data":' + data + b"}}\n\n"
    )


class LocalRuntimeTestsMixin:
    """Builds a runtime on a fake process reactor and plays its processes."""

    def setUp(self):
        super().setUp()
        self.reactor = FakeProcessReactor()
        self.failures = []
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def make_runtime(self, **kwargs) -> LocalRuntime:
        kwargs.setdefault("env", {"PATH": "/usr/bin:/bin", "HOME": "/root", "INSTALL_METHOD": "remote"})
        kwargs.setdefault("on_failed", lambda runtime, message: self.failures.append(message))
        return LocalRuntime(self.reactor, IDENTIFIER, "acme/echo", WORKING_DIR, PYTHON, **kwargs)

    def process(self, index: int = -1):
        return self.reactor.spawned[index].transport

    def started_runtime(self, **kwargs) -> LocalRuntime:
        runtime = self.make_runtime(**kwargs)
        started = runtime.start()
        for spawned in self.reactor.spawned:
            spawned.transport.stdout(MANIFEST + HEARTBEAT)
        self.successResultOf(started)
        return runtime

    def stdin_lines(self, index: int = -1) -> list[bytes]:
        return self.process(index).stdin_bytes().splitlines(keepends=True)


class StartTests(LocalRuntimeTestsMixin, SynchronousTestCase):
    """start() spawns the plugin and reports readiness or the failed step."""

    def test_provides_interface(self):
        """LocalRuntime provides IPluginRuntime."""
        runtime = self.make_runtime()
        self.assertTrue(verifyObject(IPluginRuntime, runtime))
        self.assertEqual(runtime.runtime_type, "local")
        self.assertEqual(runtime.plugin_unique_identifier, IDENTIFIER)

    def test_spawn_arguments(self):
        """The plugin runs as `python -m main` in its working directory with INSTALL_METHOD=local."""
        self.make_runtime().start()
        [spawned] = self.reactor.spawned
        self.assertEqual(spawned.executable, PYTHON)
        self.assertEqual(spawned.args, [PYTHON, "-m", "main"])
        self.assertEqual(spawned.path, WORKING_DIR)
        self.assertEqual(
            spawned.env, {"PATH": "/usr/bin:/bin", "HOME": "/root", "INSTALL_METHOD": "local"}
        )

    def test_spawn_through_parent_death_launcher(self):
        """With a parent-death launcher the plugin is spawned through it, its command line and environment kept."""
        self.make_runtime(parent_death=ParentDeathSignal("/daemon/python", getpid=lambda: 77)).start()
        [spawned] = self.reactor.spawned
        self.assertEqual(spawned.executable, "/daemon/python")
        self.assertEqual(spawned.args, ["/daemon/python", "-I", "-S", "-c", LAUNCHER, "77", "setsid", PYTHON, "-m", "main"])
        self.assertEqual((spawned.path, spawned.env["INSTALL_METHOD"]), (WORKING_DIR, "local"))

    def test_ready_on_first_heartbeat(self):
        """start() fires on the first heartbeat, not on the manifest line."""
        runtime = self.make_runtime()
        started = runtime.start()
        self.process().stdout(MANIFEST)
        self.assertNoResult(started)
        self.assertFalse(runtime.is_ready())
        self.process().stdout(HEARTBEAT)
        self.successResultOf(started)
        self.assertTrue(runtime.is_ready())
        self.assertEqual(runtime.state, "running")

    def test_exit_before_ready(self):
        """An exit before readiness fails start() with the exit code and stderr tail; no restart."""
        runtime = self.make_runtime()
        started = runtime.start()
        self.process().stderr(b"Traceback (most recent call last):\nImportError: no gevent\n")
        self.process().exit(1)
        failure = self.failureResultOf(started, errors.InternalServerError)
        self.assertTrue(
            failure.value.message.startswith("plugin did not become ready: exited with code 1"),
            failure.value.message,
        )
        self.assertIn("ImportError: no gevent", failure.value.message)
        self.assertEqual(runtime.state, "failed")
        self.reactor.advance(3600)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertEqual(self.failures, [])

    def test_readiness_timeout(self):
        """No heartbeat within the readiness timeout fails start() and kills the process."""
        runtime = self.make_runtime(readiness_timeout=30)
        started = runtime.start()
        self.reactor.advance(29)
        self.assertNoResult(started)
        self.reactor.advance(1)
        failure = self.failureResultOf(started, errors.InternalServerError)
        self.assertEqual(failure.value.message, "plugin did not become ready: no heartbeat within 30 s")
        self.assertEqual(self.process().signals, ["KILL"])
        self.reactor.advance(0)
        self.assertEqual(runtime.instances, [])

    def test_spawn_error(self):
        """A python that cannot be executed fails start() naming it."""
        self.reactor.spawn_error = OSError(2, "No such file or directory")
        runtime = self.make_runtime()
        failure = self.failureResultOf(runtime.start(), errors.InternalServerError)
        self.assertIn("cannot start " + PYTHON, failure.value.message)
        self.assertEqual(runtime.state, "failed")

    def test_start_twice_refused(self):
        """start() may be called once."""
        runtime = self.make_runtime()
        runtime.start()
        self.assertRaises(ValueError, runtime.start)

    def test_cancelled_start_stops_the_process(self):
        """Cancelling start() (an abandoned install) fails it with CancelledError and stops the process."""
        from twisted.internet.defer import CancelledError

        runtime = self.make_runtime()
        started = runtime.start()
        started.cancel()
        self.failureResultOf(started, CancelledError)
        self.assertEqual(runtime.state, "stopping")
        self.assertEqual(self.process().signals, ["TERM"])
        self.process().stdout(HEARTBEAT)
        self.process().exit(0)
        self.assertEqual(runtime.state, "stopped")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_stop_while_starting(self):
        """Stopping before readiness fails start() and stops the process."""
        runtime = self.make_runtime()
        started = runtime.start()
        stopped = runtime.stop()
        self.failureResultOf(started, errors.InternalServerError)
        self.assertEqual(self.process().signals, ["TERM"])
        self.process().exit(0)
        self.successResultOf(stopped)
        self.assertEqual(runtime.state, "stopped")


class SessionTests(LocalRuntimeTestsMixin, SynchronousTestCase):
    """Sessions are written to an instance and its messages routed back."""

    def test_request_written_and_stream_routed(self):
        """open_session writes the request line; stream chunks then end reach the listener."""
        runtime = self.started_runtime()
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        self.assertEqual(self.stdin_lines(), [encode_request(request("s1"))])
        self.process().stdout(session_line("s1", "stream", b'{"type":"text","message":{"text":"hi"},"meta":null}'))
        self.process().stdout(session_line("s1", "end"))
        self.assertEqual(
            listener.calls,
            [
                ("stream", {"type": "text", "message": {"text": "hi"}, "meta": None},
                 b'{"type":"text","message":{"text":"hi"},"meta":null}'),
                ("end",),
            ],
        )

    def test_error_then_end(self):
        """A plugin error closes the session; the trailing end is swallowed."""
        runtime = self.started_runtime()
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        self.process().stdout(
            session_line("s1", "error", b'{"error_type":"ValueError","message":"bad","args":{}}')
            + session_line("s1", "end")
        )
        self.assertEqual(listener.calls, [("error", "ValueError", "bad", {})])

    def test_close_abandons(self):
        """A closed session gets nothing more."""
        runtime = self.started_runtime()
        listener = RecordingListener()
        handle = runtime.open_session("s1", request("s1"), listener)
        handle.close()
        self.process().stdout(session_line("s1", "stream", b'{"a":1}'))
        self.assertEqual(listener.calls, [])

    def test_session_timeout(self):
        """A session outliving session_timeout is killed by timeout."""
        runtime = self.started_runtime(session_timeout=10)
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        self.reactor.advance(10)
        self.assertEqual(
            listener.calls, [("error", "PluginDaemonInternalServerError", "killed by timeout", None)]
        )

    def test_no_ready_instance(self):
        """open_session before readiness raises 'failed to get plugin runtime'."""
        runtime = self.make_runtime()
        runtime.start()
        exception = self.assertRaises(
            errors.InternalServerError, runtime.open_session, "s1", request("s1"), RecordingListener()
        )
        self.assertEqual(exception.message, "failed to get plugin runtime")

    def test_death_fails_every_session_at_once(self):
        """When the instance dies every in-flight session gets ConnectionClosedError synchronously."""
        runtime = self.started_runtime()
        listeners = [RecordingListener() for _ in range(3)]
        for number, listener in enumerate(listeners):
            runtime.open_session(f"s{number}", request(f"s{number}"), listener)
        self.process().stdout(session_line("s0", "stream", b'{"a":1}'))
        self.process().kill_by_signal(11)
        self.assertEqual(listeners[0].calls[-1], EXITED)
        self.assertEqual([listener.calls for listener in listeners[1:]], [[EXITED], [EXITED]])
        self.assertFalse(runtime.is_ready())

    def test_round_robin_and_affinity(self):
        """New sessions alternate over two instances; send() goes to the session's instance."""
        runtime = self.started_runtime(instance_count=2)
        for number in range(4):
            runtime.open_session(f"s{number}", request(f"s{number}"), RecordingListener())
        first, second = self.stdin_lines(0), self.stdin_lines(1)
        self.assertEqual(first, [encode_request(request("s0")), encode_request(request("s2"))])
        self.assertEqual(second, [encode_request(request("s1")), encode_request(request("s3"))])
        response = {"session_id": "s3", "event": "backwards_response", "data": {"event": "end"}}
        runtime.send("s3", response)
        self.assertEqual(self.stdin_lines(1)[-1], encode_request(response))
        self.assertEqual(len(self.stdin_lines(0)), 2)

    def test_retry_from_error_lands_on_live_instance(self):
        """A listener that retries inside error() never gets the dead instance."""
        runtime = self.started_runtime(instance_count=2)
        retried = RecordingListener()

        class Retrying(RecordingListener):
            def error(self, error_type, message, args):
                super().error(error_type, message, args)
                runtime.open_session("retry", request("retry"), retried)

        runtime.open_session("s0", request("s0"), Retrying())
        self.process(0).exit(1)
        self.assertEqual(self.stdin_lines(1), [encode_request(request("retry"))])

    def test_send_unknown_session(self):
        """send() for a session no instance has open raises ConnectionClosedError."""
        runtime = self.started_runtime()
        self.assertRaises(errors.ConnectionClosedError, runtime.send, "nobody", {})

    def test_dead_instance_leaves_rotation(self):
        """After one of two instances dies, new sessions all go to the survivor."""
        runtime = self.started_runtime(instance_count=2)
        self.process(0).exit(1)
        for number in range(2):
            runtime.open_session(f"s{number}", request(f"s{number}"), RecordingListener())
        self.assertEqual(len(self.stdin_lines(1)), 2)


class SupervisionTests(LocalRuntimeTestsMixin, SynchronousTestCase):
    """Crashed instances come back with backoff, up to a limit."""

    def crash_before_ready(self):
        self.process().stderr(b"boom\n")
        self.process().exit(1)

    def test_restart_after_crash_with_backoff(self):
        """A crash is followed by a restart after 1 s, then 2 s, then 4 s while it keeps failing."""
        runtime = self.started_runtime(restart_policy=RestartPolicy(max_failed_starts=10))
        self.process().exit(1)
        self.assertFalse(runtime.is_ready())
        for delay in [1, 2, 4, 8]:
            count = len(self.reactor.spawned)
            self.reactor.advance(delay - 0.001)
            self.assertEqual(len(self.reactor.spawned), count)
            self.reactor.advance(0.001)
            self.assertEqual(len(self.reactor.spawned), count + 1)
            self.crash_before_ready()
        self.assertEqual(runtime.state, "running")

    def test_restarted_instance_serves(self):
        """A restarted instance becomes ready and takes sessions again."""
        runtime = self.started_runtime()
        self.process().exit(1)
        self.reactor.advance(1)
        self.process().stdout(HEARTBEAT)
        self.assertTrue(runtime.is_ready())
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        self.assertEqual(self.stdin_lines(), [encode_request(request("s1"))])

    def test_delay_capped(self):
        """The restart delay doubles up to max_delay and no further."""
        self.started_runtime(
            restart_policy=RestartPolicy(max_delay=5, max_failed_starts=100)
        )
        self.process().exit(1)
        delays = []
        for _ in range(6):
            [call] = self.reactor.getDelayedCalls()
            delays.append(call.getTime() - self.reactor.seconds())
            self.reactor.advance(delays[-1])
            self.crash_before_ready()
        self.assertEqual(delays, [1, 2, 4, 5, 5, 5])

    def test_delay_reset_after_stable_run(self):
        """An instance that stayed up past stable_after restarts after min_delay again."""
        self.started_runtime(
            restart_policy=RestartPolicy(stable_after=60), liveness=LivenessPolicy(timeout=3600)
        )
        self.process().exit(1)
        self.reactor.advance(1)
        self.process().exit(1)  # before ready: next delay is 2 s
        self.reactor.advance(2)
        self.process().stdout(HEARTBEAT)
        self.reactor.advance(59)
        self.process().stdout(HEARTBEAT)
        self.reactor.advance(1)
        self.process().exit(1)
        [call] = self.reactor.getDelayedCalls()
        self.assertEqual(call.getTime() - self.reactor.seconds(), 1)

    def test_give_up_after_consecutive_failed_starts(self):
        """After max_failed_starts crashes before readiness the runtime is failed for good."""
        runtime = self.started_runtime(restart_policy=RestartPolicy(max_failed_starts=3))
        self.process().exit(1)  # a crash after readiness does not count
        for delay in [1, 2, 4]:
            self.reactor.advance(delay)
            self.crash_before_ready()
        self.assertEqual(runtime.state, "failed")
        self.assertEqual(len(self.failures), 1)
        self.assertIn("failed to start 3 times in a row", self.failures[0])
        self.assertIn("exited with code 1", self.failures[0])
        self.assertIn("boom", runtime.failure_message)
        count = len(self.reactor.spawned)
        self.reactor.advance(3600)
        self.assertEqual(len(self.reactor.spawned), count)
        self.assertTrue(
            any(e["log_level"] == LogLevel.error and "runtime failed" in e["log_format"]
                for e in self.logged)
        )

    def test_on_ready_called_when_a_restarted_instance_joins(self):
        """on_ready is told when a restarted instance becomes ready, not at start()."""
        readied = []
        runtime = self.started_runtime(on_ready=readied.append)
        self.assertEqual(readied, [])
        self.process().exit(1)
        self.reactor.advance(1)
        self.process().stdout(HEARTBEAT)
        self.assertEqual(readied, [runtime])

    def test_readiness_resets_failure_count(self):
        """A ready instance resets the count of consecutive failed starts."""
        runtime = self.started_runtime(restart_policy=RestartPolicy(max_failed_starts=2, max_delay=1))
        for _ in range(3):
            self.process().exit(1)
            self.reactor.advance(1)
            self.crash_before_ready()
            self.reactor.advance(1)
            self.process().stdout(HEARTBEAT)
        self.assertEqual(runtime.state, "running")
        self.assertEqual(self.failures, [])

    def test_oversized_line_kills_and_restarts(self):
        """An oversized stdout line kills the instance, its sessions fail, and it restarts."""
        runtime = self.started_runtime(max_line_size=1024)
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        self.process().stdout(b"x" * 5000)
        self.assertEqual(self.process().signals, ["KILL"])
        self.reactor.advance(0)
        self.assertEqual(listener.calls, [EXITED])
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_heartbeats_keep_alive(self):
        """Heartbeats every 10 s keep a ready instance from being killed."""
        self.started_runtime()
        for _ in range(100):
            self.reactor.advance(10)
            self.process().stdout(HEARTBEAT)
        self.assertEqual(self.process().signals, [])


HUNG = ("error", "ConnectionClosedError", hung_message(30), None)


class LivenessTests(LocalRuntimeTestsMixin, SynchronousTestCase):
    """A ready instance that writes nothing for the heartbeat timeout is hung: failed, killed, replaced."""

    def test_hung_instance_fails_sessions_at_once_and_is_killed(self):
        """At the timeout every open session fails before the process has even ended, and KILL is sent."""
        self.reactor.fatal_signals = frozenset()
        runtime = self.started_runtime()
        listeners = [RecordingListener() for _ in range(20)]
        for number, listener in enumerate(listeners):
            runtime.open_session(f"s{number}", request(f"s{number}"), listener)
        self.reactor.advance(29.9)
        self.assertEqual([listener.calls for listener in listeners], [[]] * 20)
        self.assertEqual(self.process().signals, [])
        self.reactor.advance(0.1)
        self.assertEqual([listener.calls for listener in listeners], [[HUNG]] * 20)
        self.assertEqual(self.process().signals, ["KILL"])
        self.assertFalse(self.process().ended)
        self.assertFalse(runtime.is_ready())
        self.assertEqual(runtime.ready_instances, [])

    def test_hung_instance_is_replaced_and_serves_again(self):
        """The hung instance is restarted after the restart delay and the new one takes sessions."""
        runtime = self.started_runtime()
        self.reactor.advance(30)
        self.reactor.advance(0)
        self.assertEqual(runtime.instances, [])
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.process().stdout(HEARTBEAT)
        self.assertTrue(runtime.is_ready())
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        self.assertEqual(self.stdin_lines(), [encode_request(request("s1"))])

    def test_unkillable_instance_replaced_without_waiting_for_its_exit(self):
        """A hung process that does not die on KILL is replaced all the same, and only once."""
        self.reactor.fatal_signals = frozenset()
        runtime = self.started_runtime()
        self.reactor.advance(30)
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.process().stdout(HEARTBEAT)
        self.assertEqual(runtime.ready_instances, [runtime.instances[1]])
        for _ in range(10):
            self.process(1).stdout(HEARTBEAT)
            self.reactor.advance(10)
        self.process(0).kill_by_signal(9)
        for _ in range(10):
            self.process(1).stdout(HEARTBEAT)
            self.reactor.advance(10)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertTrue(runtime.is_ready())

    def test_heartbeat_timeout_is_configurable(self):
        """With a 3 s timeout an instance is hung after 3 s of silence, not before."""
        runtime = self.started_runtime(liveness=LivenessPolicy(timeout=3))
        self.reactor.advance(2.9)
        self.assertTrue(runtime.is_ready())
        self.reactor.advance(0.1)
        self.assertEqual(self.process().signals, ["KILL"])

    def test_any_output_keeps_alive(self):
        """Session chunks or stderr lines count as signs of life, as heartbeats do."""
        runtime = self.started_runtime()
        runtime.open_session("s1", request("s1"), RecordingListener())
        for _ in range(10):
            self.reactor.advance(20)
            self.process().stdout(session_line("s1", "stream", b'{"a":1}'))
            self.reactor.advance(20)
            self.process().stderr(b"still working\n")
        self.assertEqual(self.process().signals, [])
        self.assertTrue(runtime.is_ready())

    def test_warned_once_before_hang(self):
        """Half-way to the timeout a warning names the instance, once per silence."""
        self.started_runtime()
        self.reactor.advance(14.9)
        self.assertEqual(self.silence_warnings(), 0)
        self.reactor.advance(0.1)
        self.assertEqual(self.silence_warnings(), 1)
        self.reactor.advance(14)
        self.assertEqual(self.silence_warnings(), 1)
        self.process().stdout(HEARTBEAT)
        self.reactor.pump([1] * 15)
        self.assertEqual(self.silence_warnings(), 2)

    def silence_warnings(self) -> int:
        return sum(1 for e in self.logged if e["log_level"] == LogLevel.warn and "silent for" in e["log_format"])

    def test_one_timer_per_instance(self):
        """Watching an instance costs one pending timer, not a poll of every instance."""
        runtime = self.started_runtime(instance_count=3)
        self.reactor.advance(5)
        self.assertEqual(len(self.reactor.getDelayedCalls()), 3)
        self.assertTrue(runtime.is_ready())

    def test_hung_instance_leaves_rotation(self):
        """Of two instances, the silent one stops getting sessions at the timeout; the other takes them."""
        runtime = self.started_runtime(instance_count=2)
        for _ in range(3):
            self.reactor.advance(10)
            self.process(1).stdout(HEARTBEAT)
        self.assertEqual([i.pid for i in runtime.ready_instances], [self.process(1).pid])
        for number in range(4):
            runtime.open_session(f"s{number}", request(f"s{number}"), RecordingListener())
        self.assertEqual(len(self.stdin_lines(1)), 4)
        self.assertEqual(self.stdin_lines(0), [])

    def test_not_watched_before_ready(self):
        """Before its first heartbeat an instance is under the readiness timeout, not the liveness one."""
        runtime = self.make_runtime(readiness_timeout=120)
        started = runtime.start()
        self.reactor.advance(100)
        self.assertEqual(self.process().signals, [])
        self.process().stdout(HEARTBEAT)
        self.successResultOf(started)


class ProcessGroupTests(LocalRuntimeTestsMixin, SynchronousTestCase):
    """
    With a process table, a plugin leads its own process group: it is
    stopped, killed and cleaned up with what it spawned, and a stopped
    (SIGSTOP) plugin is hung while a busy one that heartbeats is not.
    """

    GRANDCHILD = 5000

    def setUp(self):
        super().setUp()
        self.table = MemoryProcessTable()

    def grouped_runtime(self, **kwargs) -> LocalRuntime:
        """A started runtime whose one process leads a group holding a grandchild."""
        kwargs.setdefault("parent_death", ParentDeathSignal("/daemon/python", getpid=lambda: 77))
        runtime = self.make_runtime(process_table=self.table, **kwargs)
        started = runtime.start()
        self.track(self.process())
        self.process().stdout(MANIFEST + HEARTBEAT)
        self.successResultOf(started)
        return runtime

    def track(self, transport) -> None:
        """Put ``transport``'s fake process and a grandchild that dies only by KILL in the table."""
        pid = transport.pid
        table = self.table

        def leader(name):
            if not transport.reaped:
                transport.signalProcess(name)
            if name == "KILL":
                table.remove(pid)

        def grandchild(name):
            if name == "KILL":
                table.remove(self.GRANDCHILD)

        table.add(pid, on_signal=leader)
        table.add(self.GRANDCHILD, group=pid, on_signal=grandchild)

    def test_stop_signals_the_whole_group(self):
        """stop() sends TERM (then CONT, for stopped members) to the group, then KILL after the grace; nothing is left."""
        runtime = self.grouped_runtime(stop_grace_period=2, liveness=LivenessPolicy(timeout=3600))
        pid = self.process().pid
        stopped = runtime.stop(drain_timeout=0)
        self.assertEqual(self.table.signals, [(pid, "TERM"), (pid, "CONT")])
        self.assertEqual(self.process().signals, ["TERM", "CONT"])
        self.reactor.advance(2)
        self.reactor.advance(0)
        self.assertEqual(self.table.signals[2:], [(pid, "KILL")])
        self.assertIsNone(self.successResultOf(stopped))
        self.assertEqual(self.table.members(pid), [])

    def test_leftovers_killed_when_the_plugin_exits(self):
        """When the plugin exits by itself, what it spawned is KILLed at once and a restart is scheduled."""
        runtime = self.grouped_runtime()
        pid = self.process().pid
        self.table.remove(pid)
        self.process().exit(1)
        self.assertEqual(self.table.signals, [(pid, "KILL")])
        self.assertEqual(self.table.members(pid), [])
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(runtime.state, "running")

    def test_pipes_closed_shortly_after_exit(self):
        """A plugin that exited while something holds its pipes has them closed after the delay: its sessions fail then."""
        runtime = self.grouped_runtime()
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        self.process().exit_holding_pipes(0)
        self.assertEqual(listener.calls, [])
        self.reactor.advance(PIPE_CLOSE_DELAY)
        self.assertTrue(self.process().pipes_closed_by_parent)
        self.assertEqual(listener.calls, [EXITED])
        self.assertEqual(runtime.instances, [])

    def test_no_signal_by_number_after_the_reap(self):
        """Once the plugin is reaped its pid may be reused: a stop in the pipe-closing window signals nothing."""
        runtime = self.grouped_runtime()
        pid = self.process().pid
        self.table.remove(pid)
        self.process().exit_holding_pipes(0)
        self.assertEqual(self.table.signals, [(pid, "KILL")])
        self.table.add(pid, state="S")
        stopped = runtime.stop(drain_timeout=0)
        self.assertEqual(self.table.signals, [(pid, "KILL")])
        self.reactor.advance(PIPE_CLOSE_DELAY)
        self.assertIsNone(self.successResultOf(stopped))

    def test_pipes_of_a_plain_exit_left_alone(self):
        """A plugin whose pipes close with its exit leaves no timer that would close them later."""
        self.grouped_runtime()
        self.process().exit(0)
        self.reactor.advance(PIPE_CLOSE_DELAY)
        self.assertFalse(self.process().pipes_closed_by_parent)

    def test_stopped_plugin_is_hung_at_the_first_look(self):
        """A plugin in state T (SIGSTOP) is hung when its silence is first looked at, before the heartbeat timeout."""
        runtime = self.grouped_runtime(liveness=LivenessPolicy(timeout=30))
        pid = self.process().pid
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        self.table.set_state(pid, "T")
        self.reactor.advance(14.9)
        self.assertEqual(listener.calls, [])
        self.reactor.advance(0.1)
        self.assertEqual(listener.calls, [("error", "ConnectionClosedError", hung_message(30, "T"), None)])
        self.assertIn((pid, "KILL"), self.table.signals)
        self.assertIn("its process is stopped (state T)", hung_message(30, "T"))

    def test_busy_plugin_that_heartbeats_is_not_hung(self):
        """A plugin running on the CPU (state R) through a long call but heartbeating every 10 s is never hung."""
        runtime = self.grouped_runtime(liveness=LivenessPolicy(timeout=30))
        self.table.set_state(self.process().pid, "R")
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        # 500 s: within the 600 s session timeout
        for _ in range(50):
            self.reactor.advance(10)
            self.process().stdout(HEARTBEAT)
        self.assertEqual((listener.calls, self.table.signals), ([], []))
        self.assertTrue(runtime.is_ready())

    def test_running_but_silent_plugin_is_hung_at_the_timeout(self):
        """A plugin that runs (state R) but writes nothing is hung at the heartbeat timeout, not before."""
        runtime = self.grouped_runtime(liveness=LivenessPolicy(timeout=30))
        pid = self.process().pid
        self.table.set_state(pid, "R")
        self.reactor.advance(29.9)
        self.assertEqual(self.table.signals, [])
        self.assertTrue(runtime.is_ready())
        self.reactor.advance(0.1)
        self.assertEqual(self.table.signals[0], (pid, "KILL"))

    def test_without_launcher_the_table_is_unused(self):
        """A plugin started directly does not lead a group: only its own pid is signalled."""
        runtime = self.make_runtime(process_table=self.table, liveness=LivenessPolicy(timeout=3600))
        started = runtime.start()
        self.process().stdout(MANIFEST + HEARTBEAT)
        self.successResultOf(started)
        runtime.stop(drain_timeout=0)
        self.assertEqual((self.table.signals, self.process().signals), ([], ["TERM"]))


class StopTests(LocalRuntimeTestsMixin, SynchronousTestCase):
    """stop() drains sessions, then TERM, then KILL."""

    def test_drain_term_kill(self):
        """stop() waits for the open session, sends TERM, then KILL after the grace period."""
        runtime = self.started_runtime(stop_grace_period=5, liveness=LivenessPolicy(timeout=3600))
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        stopped = runtime.stop()
        self.assertFalse(runtime.is_ready())
        self.assertRaises(
            errors.InternalServerError, runtime.open_session, "s2", request("s2"), RecordingListener()
        )
        self.reactor.advance(100)
        self.assertEqual(self.process().signals, [])
        self.process().stdout(session_line("s1", "end"))
        self.assertEqual(listener.calls, [("end",)])
        self.assertEqual(self.process().signals, ["TERM"])
        self.reactor.advance(4.9)
        self.assertEqual(self.process().signals, ["TERM"])
        self.assertNoResult(stopped)
        self.reactor.advance(0.1)
        self.assertEqual(self.process().signals, ["TERM", "KILL"])
        self.successResultOf(stopped)
        self.assertEqual(runtime.state, "stopped")
        self.reactor.advance(3600)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_term_obeyed(self):
        """A process that exits on TERM is not sent KILL."""
        self.reactor.fatal_signals = frozenset({"TERM", "KILL"})
        runtime = self.started_runtime(instance_count=2)
        stopped = runtime.stop()
        self.reactor.advance(0)
        self.successResultOf(stopped)
        self.assertEqual([s.transport.signals for s in self.reactor.spawned], [["TERM"], ["TERM"]])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_drain_timeout(self):
        """Sessions still open after drain_timeout are cut off: TERM, and they get an error on exit."""
        runtime = self.started_runtime(drain_timeout=30, liveness=LivenessPolicy(timeout=3600))
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        stopped = runtime.stop()
        self.reactor.advance(29)
        self.assertEqual(self.process().signals, [])
        self.reactor.advance(1)
        self.assertEqual(self.process().signals, ["TERM"])
        self.process().exit(0)
        self.assertEqual(listener.calls, [EXITED])
        self.successResultOf(stopped)

    def test_stop_with_reason_fails_open_sessions_at_the_deadline(self):
        """stop(drain_timeout, reason): at the deadline open sessions fail with the reason, then TERM, then KILL."""
        runtime = self.started_runtime(stop_grace_period=2, liveness=LivenessPolicy(timeout=3600))
        finished, cut = RecordingListener(), RecordingListener()
        runtime.open_session("s1", request("s1"), finished)
        runtime.open_session("s2", request("s2"), cut)
        stopped = runtime.stop(drain_timeout=8, reason="the plugin daemon is shutting down")
        self.reactor.advance(4)
        self.process().stdout(session_line("s1", "end"))
        self.reactor.advance(3.9)
        self.assertEqual((cut.calls, self.process().signals), ([], []))
        self.reactor.advance(0.1)
        self.assertEqual(finished.calls, [("end",)])
        self.assertEqual(
            cut.calls, [("error", "PluginDaemonInternalServerError", "the plugin daemon is shutting down", None)]
        )
        self.assertEqual(self.process().signals, ["TERM"])
        self.reactor.advance(2)
        self.assertEqual(self.process().signals, ["TERM", "KILL"])
        self.successResultOf(stopped)

    def test_later_stop_shortens_the_drain(self):
        """A shutdown's stop during an uninstall's long drain brings the deadline forward; both fire."""
        runtime = self.started_runtime(liveness=LivenessPolicy(timeout=3600))
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        uninstall = runtime.stop()
        self.reactor.advance(10)
        shutdown = runtime.stop(drain_timeout=5, reason="the plugin daemon is shutting down")
        self.reactor.advance(5)
        self.assertEqual(listener.calls[0][2], "the plugin daemon is shutting down")
        self.assertEqual(self.process().signals, ["TERM"])
        self.process().exit(0)
        self.successResultOf(uninstall)
        self.successResultOf(shutdown)

    def test_later_stop_never_lengthens_the_drain(self):
        """A stop with a longer drain than the one under way keeps the earlier deadline."""
        runtime = self.started_runtime(liveness=LivenessPolicy(timeout=3600))
        runtime.open_session("s1", request("s1"), RecordingListener())
        runtime.stop(drain_timeout=5)
        runtime.stop(drain_timeout=100)
        self.reactor.advance(5)
        self.assertEqual(self.process().signals, ["TERM"])

    def test_stop_with_reason_and_no_sessions_terminates_at_once(self):
        """With nothing open, a shutdown stop sends TERM at once."""
        runtime = self.started_runtime()
        runtime.stop(drain_timeout=8, reason="the plugin daemon is shutting down")
        self.assertEqual(self.process().signals, ["TERM"])

    def test_drain_without_limit(self):
        """With no session timeout and no drain timeout, stop() waits for sessions indefinitely."""
        runtime = self.started_runtime(session_timeout=None)
        runtime.open_session("s1", request("s1"), RecordingListener())
        stopped = runtime.stop()
        for _ in range(1000):
            self.reactor.advance(10)
            self.process().stdout(HEARTBEAT)
        self.assertEqual(self.process().signals, [])
        self.process().stdout(session_line("s1", "end"))
        self.assertEqual(self.process().signals, ["TERM"])
        self.reactor.advance(5)
        self.successResultOf(stopped)

    def test_stop_with_pending_restart(self):
        """Stopping cancels a scheduled restart and finishes at once."""
        runtime = self.started_runtime()
        self.process().exit(1)
        self.successResultOf(runtime.stop())
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_stop_twice(self):
        """A second stop() fires with the first; after stopping, stop() fires at once."""
        runtime = self.started_runtime()
        first, second = runtime.stop(), runtime.stop()
        self.assertEqual(self.process().signals, ["TERM"])
        self.process().exit(0)
        self.successResultOf(first)
        self.successResultOf(second)
        self.successResultOf(runtime.stop())

    def test_stop_after_failure(self):
        """stop() on a failed runtime waits until its last process has ended."""
        runtime = self.make_runtime(instance_count=2, stop_grace_period=5)
        started = runtime.start()
        self.process(0).exit(1)
        self.failureResultOf(started, errors.InternalServerError)
        self.assertEqual(self.process(1).signals, ["TERM"])
        stopped = runtime.stop()
        self.reactor.advance(4)
        self.assertNoResult(stopped)
        self.reactor.advance(1)
        self.assertEqual(self.process(1).signals, ["TERM", "KILL"])
        self.successResultOf(stopped)
        self.assertEqual(runtime.state, "stopped")


FAKE_PLUGIN = r'''
import json, os, signal, sys, time

# Like the SDK: TERM is not special, and stdin EOF does not end the process.
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("IGNORE_TERM") else signal.SIG_DFL)
out = sys.stdout
out.write('{"name":"fake","author":"acme"}\n\n')
out.write('{"event": "log", "data": {"level": "INFO", "message": "Installed tool: echo", "timestamp": 1.0}}\n')
out.write('{"event":"heartbeat","session_id":null,"data":{}}\n\n')
out.flush()
for line in sys.stdin:
    request = json.loads(line)
    chunk = {"install_method": os.environ.get("INSTALL_METHOD"), "cwd": os.getcwd(), "data": request["data"]}
    for kind, data in (("stream", chunk), ("end", {})):
        message = {"event": "session", "session_id": request["session_id"], "data": {"type": kind, "data": data}}
        out.write(json.dumps(message, separators=(",", ":")))
        out.write("\n\n")
    out.flush()
while True:
    time.sleep(0.05)
'''


class EndingListener(RecordingListener):
    """A recording listener whose ``finished_d`` fires on end or error."""

    def __init__(self):
        super().__init__()
        self.finished_d = Deferred()

    def end(self):
        super().end()
        self.finished_d.callback(None)

    def error(self, error_type, message, args):
        super().error(error_type, message, args)
        self.finished_d.callback(None)


class RealProcessTests(AsyncTestCase):
    """The runtime drives a real subprocess over real pipes (a fake plugin, not the SDK)."""

    def make_runtime(self, ignore_term: bool) -> LocalRuntime:
        from twisted.internet import reactor

        working_dir = self.mktemp()
        os.makedirs(working_dir)
        with open(os.path.join(working_dir, "main.py"), "w") as source:
            source.write(FAKE_PLUGIN)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if ignore_term:
            env["IGNORE_TERM"] = "1"
        return LocalRuntime(
            reactor, IDENTIFIER, "acme/echo", os.path.abspath(working_dir), sys.executable,
            env=env, readiness_timeout=20, stop_grace_period=0.5,
        )

    async def test_round_trip_and_stop(self):
        """A request goes out, stream and end come back, and stop() ends a TERM-ignoring plugin by KILL."""
        runtime = self.make_runtime(ignore_term=True)
        await runtime.start()
        listener = EndingListener()
        runtime.open_session("s1", request("s1"), listener)
        await listener.finished_d
        [stream, end] = listener.calls
        self.assertEqual(stream[1]["install_method"], "local")
        self.assertEqual(stream[1]["cwd"], runtime.working_dir)
        self.assertEqual(stream[1]["data"], request("s1")["data"])
        self.assertEqual(end, ("end",))
        [instance] = runtime.instances
        await runtime.stop()
        self.assertEqual(instance.describe_exit(), "killed by signal 9")

    async def test_term_obeyed(self):
        """A plugin that dies on TERM is stopped without KILL."""
        runtime = self.make_runtime(ignore_term=False)
        await runtime.start()
        [instance] = runtime.instances
        await runtime.stop()
        self.assertEqual(instance.describe_exit(), "killed by signal 15")


class IdleTests(LocalRuntimeTestsMixin, SynchronousTestCase):
    """idle_timeout: a runtime without sessions for that long tells its owner."""

    def idle_runtime(self, **kwargs):
        self.idle = []
        return self.started_runtime(idle_timeout=300, on_idle=self.idle.append, **kwargs)

    def test_idle_after_timeout_without_sessions(self):
        """A runtime with no session for idle_timeout seconds calls on_idle, not before."""
        runtime = self.idle_runtime()
        self.reactor.advance(299)
        self.assertEqual(self.idle, [])
        self.reactor.advance(1)
        self.assertEqual(self.idle, [runtime])

    def test_open_session_holds_it(self):
        """An open session, however long, keeps the runtime from going idle."""
        runtime = self.idle_runtime(session_timeout=None)
        runtime.open_session("s1", request("s1"), RecordingListener())
        self.reactor.advance(3600)
        self.assertEqual(self.idle, [])

    def test_clock_restarts_when_the_last_session_ends(self):
        """The idle clock starts when the last session ends, not at the first request."""
        runtime = self.idle_runtime(liveness=LivenessPolicy(timeout=3600))
        self.reactor.advance(200)
        runtime.open_session("s1", request("s1"), RecordingListener())
        self.reactor.advance(200)
        self.process().stdout(session_line("s1", "end"))
        self.reactor.advance(299)
        self.assertEqual(self.idle, [])
        self.reactor.advance(1)
        self.assertEqual(self.idle, [runtime])

    def test_abandoned_session_ends_the_hold(self):
        """A session closed by its caller counts as ended for the idle clock."""
        runtime = self.idle_runtime(liveness=LivenessPolicy(timeout=3600))
        runtime.open_session("s1", request("s1"), RecordingListener()).close()
        self.reactor.advance(300)
        self.assertEqual(self.idle, [runtime])

    def test_never_without_timeout(self):
        """Without idle_timeout (the default), a runtime never goes idle."""
        self.idle = []
        self.started_runtime(on_idle=self.idle.append, liveness=LivenessPolicy(timeout=10**6))
        self.reactor.advance(10**5)
        self.assertEqual(self.idle, [])

    def test_stopped_runtime_leaves_no_idle_timer(self):
        """stop() cancels the idle clock."""
        self.reactor.fatal_signals = frozenset({"TERM", "KILL"})
        runtime = self.idle_runtime()
        stopped = runtime.stop()
        self.reactor.advance(0)
        self.successResultOf(stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.idle, [])
