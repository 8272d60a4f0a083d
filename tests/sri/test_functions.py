"""
A function's process on a fake process reactor: started through the
parent-death launcher, healthy when ``/health`` answers, restarted with a
doubling delay when it dies, stopped with TERM then KILL.
"""

from __future__ import annotations

from difydaemon.runtimes.parent_death import LAUNCHER, ParentDeathSignal
from difydaemon.sri.functions import (
    LIVENESS_FAILURES,
    LIVENESS_INTERVAL,
    MAX_RESTART_DELAY,
    MIN_RESTART_DELAY,
    STABLE_AFTER,
    STATE_RESTARTING,
    STATE_RUNNING,
    STATE_STOPPED,
    STOP_GRACE_PERIOD,
    Function,
    FunctionSpec,
    FunctionStartError,
    FunctionTable,
)
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.process import FakeProcessReactor
from tests.sri.fakes import FakeProbe

SPEC = FunctionSpec(
    filename="acme@echo@0.0.1@abc.difypkg",
    name="acme-echo",
    function_id="f1",
    host="127.0.0.1",
    port=41000,
    argv=("/w/.venv/bin/python", "-m", "main"),
    env={"INSTALL_METHOD": "serverless"},
    path="/w",
)


class FunctionTests(SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.reactor = FakeProcessReactor()
        self.probe = FakeProbe(healthy=False)
        self.function = Function(self.reactor, SPEC, self.probe, start_timeout=5.0, stop_grace_period=2.0)

    def started(self):
        """Start the function and make it healthy."""
        self.probe.healthy = True
        self.successResultOf(self.function.start())
        return self.reactor.spawned[-1]

    def test_start_waits_for_health(self):
        """A start fires only once /health answers; the function is then running."""
        started = self.function.start()
        self.assertNoResult(started)
        self.reactor.advance(0.5)
        self.assertNoResult(started)
        self.probe.healthy = True
        self.reactor.advance(0.1)
        self.successResultOf(started)
        self.assertEqual(self.function.state, STATE_RUNNING)
        self.assertEqual(self.probe.checked[-1], "http://127.0.0.1:41000")
        spawned = self.reactor.spawned[0]
        self.assertEqual((spawned.args, spawned.env, spawned.path), (list(SPEC.argv), dict(SPEC.env), "/w"))

    def test_through_parent_death_launcher(self):
        """With a parent-death signal the process is started through the launcher, in a session of its own."""
        function = Function(self.reactor, SPEC, FakeProbe(), ParentDeathSignal("/usr/bin/python3", lambda: 77))
        self.successResultOf(function.start())
        args = self.reactor.spawned[0].args
        self.assertEqual(args[:7], ["/usr/bin/python3", "-I", "-S", "-c", LAUNCHER, "77", "setsid"])
        self.assertEqual(args[7:], list(SPEC.argv))

    def test_exit_before_health(self):
        """A process that exits before answering fails the start with its exit and stderr."""
        started = self.function.start()
        transport = self.reactor.spawned[0].transport
        transport.stderr(b"Traceback...\nModuleNotFoundError: No module named 'gevent'\n")
        transport.exit(1)
        self.reactor.advance(0.1)
        error = self.failureResultOf(started, FunctionStartError).value
        self.assertIn("exited with code 1", str(error))
        self.assertIn("No module named 'gevent'", str(error))
        self.assertEqual(self.function.state, STATE_STOPPED)
        self.reactor.advance(MAX_RESTART_DELAY)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_never_healthy(self):
        """A process that never answers fails the start after the bounded wait, and is killed."""
        started = self.function.start()
        for _ in range(60):
            self.reactor.advance(0.1)
        self.failureResultOf(started, FunctionStartError)
        self.assertIn("KILL", self.reactor.spawned[0].transport.signals)
        self.reactor.advance(1)
        self.assertEqual(self.reactor.running_processes, [])

    def test_spawn_error(self):
        """A process that cannot be spawned fails the start."""
        self.reactor.spawn_error = OSError("no such file")
        self.failureResultOf(self.function.start(), FunctionStartError)

    def test_restart_with_backoff(self):
        """A function that keeps dying is restarted on the same port after 1 s, then 2 s, then 4 s."""
        self.started()
        for delay in (MIN_RESTART_DELAY, 2 * MIN_RESTART_DELAY, 4 * MIN_RESTART_DELAY):
            count = len(self.reactor.spawned)
            self.reactor.spawned[-1].transport.kill_by_signal(9)
            self.assertEqual(self.function.state, STATE_RESTARTING)
            self.reactor.advance(delay - 0.01)
            self.assertEqual(len(self.reactor.spawned), count)
            self.reactor.advance(0.01)
            self.assertEqual(len(self.reactor.spawned), count + 1)
            self.assertEqual(self.reactor.spawned[-1].args, list(SPEC.argv))
            self.reactor.advance(0)
            self.assertEqual(self.function.state, STATE_RUNNING)
        self.assertEqual(self.function.restarts, 3)

    def test_stable_run_resets_backoff(self):
        """A death after a long healthy run is restarted after the shortest delay again."""
        self.started()
        self.reactor.spawned[-1].transport.exit(1)
        self.reactor.advance(MIN_RESTART_DELAY)
        self.reactor.spawned[-1].transport.exit(1)
        self.reactor.advance(2 * MIN_RESTART_DELAY)
        self.reactor.advance(STABLE_AFTER)
        count = len(self.reactor.spawned)
        self.reactor.spawned[-1].transport.exit(1)
        self.reactor.advance(MIN_RESTART_DELAY)
        self.assertEqual(len(self.reactor.spawned), count + 1)

    def test_stop_term_then_kill(self):
        """A stop sends TERM, then KILL after the grace period, and fires once the process ended."""
        spawned = self.started()
        self.reactor.fatal_signals = frozenset()
        spawned.transport.fatal_signals = frozenset()
        stopped = self.function.stop()
        self.assertEqual(spawned.transport.signals, ["TERM"])
        self.assertNoResult(stopped)
        self.reactor.advance(2.0)
        self.assertEqual(spawned.transport.signals, ["TERM", "KILL"])
        spawned.transport.kill_by_signal(9)
        self.successResultOf(stopped)
        self.reactor.advance(MAX_RESTART_DELAY)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_stop_cancels_pending_restart(self):
        """A stop while a restart is pending means no restart."""
        self.started()
        self.reactor.spawned[-1].transport.exit(1)
        self.successResultOf(self.function.stop())
        self.reactor.advance(MAX_RESTART_DELAY)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertEqual(self.function.state, STATE_STOPPED)


class FunctionTableTests(SynchronousTestCase):
    def test_stop_all(self):
        """Stopping the table stops every function and empties it."""
        reactor = FakeProcessReactor()
        table = FunctionTable()
        for port in (41000, 41001):
            function = Function(reactor, FunctionSpec(f"f{port}", "n", "i", "127.0.0.1", port, ("p",), {}, "/"), FakeProbe())
            self.successResultOf(function.start())
            table.add(function)
        self.assertEqual(table.ports(), {41000, 41001})
        stopped = table.stop_all()
        # the fake's processes ignore TERM: KILL after the grace period ends them
        reactor.advance(STOP_GRACE_PERIOD)
        reactor.advance(0)
        self.successResultOf(stopped)
        self.assertEqual((len(table), reactor.running_processes), (0, []))

    def test_remove(self):
        """Removing a package's function stops it; removing an unknown one says so."""
        reactor = FakeProcessReactor()
        table = FunctionTable()
        function = Function(reactor, SPEC, FakeProbe())
        self.successResultOf(function.start())
        table.add(function)
        removed = table.remove(SPEC.filename)
        reactor.advance(STOP_GRACE_PERIOD)
        reactor.advance(0)
        self.assertTrue(self.successResultOf(removed))
        self.assertFalse(self.successResultOf(table.remove(SPEC.filename)))
        self.assertEqual(reactor.running_processes, [])


class LivenessTests(SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.reactor = FakeProcessReactor()
        self.probe = FakeProbe(healthy=True)
        self.function = Function(self.reactor, SPEC, self.probe)
        self.successResultOf(self.function.start())

    def test_hung_function_killed_and_restarted(self):
        """A running function that stops answering /health is killed after three checks, then restarted."""
        self.probe.healthy = False
        for _ in range(LIVENESS_FAILURES - 1):
            self.reactor.advance(LIVENESS_INTERVAL)
        self.assertEqual(self.reactor.spawned[0].transport.signals, [])
        self.reactor.advance(LIVENESS_INTERVAL)
        self.assertEqual(self.reactor.spawned[0].transport.signals, ["KILL"])
        self.reactor.advance(0)
        self.assertEqual(self.function.state, STATE_RESTARTING)
        self.probe.healthy = True
        self.reactor.advance(MIN_RESTART_DELAY)
        self.assertEqual((len(self.reactor.spawned), self.function.state), (2, STATE_RUNNING))

    def test_one_missed_check_forgiven(self):
        """Checks that fail fewer than three times in a row kill nothing."""
        for _ in range(5):
            self.probe.healthy = False
            self.reactor.advance(LIVENESS_INTERVAL * (LIVENESS_FAILURES - 1))
            self.probe.healthy = True
            self.reactor.advance(LIVENESS_INTERVAL)
        self.assertEqual(self.reactor.spawned[0].transport.signals, [])

    def test_no_checks_after_stop(self):
        """A stopped function is not checked any more."""
        self.function.stop()
        self.reactor.advance(STOP_GRACE_PERIOD)
        checks = len(self.probe.checked)
        self.reactor.advance(LIVENESS_INTERVAL * 5)
        self.assertEqual(len(self.probe.checked), checks)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
