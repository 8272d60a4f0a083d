"""Tests for difydaemon.testing.process: the fake process reactor itself."""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from zope.interface.verify import verifyObject

from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.process import FakeProcessReactor


class RecordingProtocol(ProcessProtocol):
    """Records every ProcessProtocol callback in order."""

    def __init__(self):
        self.events = []

    def connectionMade(self):
        self.events.append(("connectionMade",))

    def outReceived(self, data):
        self.events.append(("out", data))

    def errReceived(self, data):
        self.events.append(("err", data))

    def processExited(self, reason):
        self.events.append(("exited", reason))

    def processEnded(self, reason):
        self.events.append(("ended", reason))


class FakeProcessReactorTests(SynchronousTestCase):
    """The fake reactor records spawns and lets a test play the child."""

    def setUp(self):
        super().setUp()
        self.reactor = FakeProcessReactor()
        self.protocol = RecordingProtocol()
        self.transport = self.reactor.spawnProcess(
            self.protocol, "/venv/bin/python", ["/venv/bin/python", "-m", "main"],
            env={"A": "1"}, path="/work",
        )

    def test_interfaces(self):
        """The reactor provides IReactorProcess and IReactorTime; the transport IProcessTransport."""
        self.assertTrue(verifyObject(IReactorProcess, self.reactor))
        self.assertTrue(verifyObject(IReactorTime, self.reactor))
        self.assertTrue(verifyObject(IProcessTransport, self.transport))

    def test_spawn_recorded_and_connected(self):
        """spawnProcess records its arguments and calls connectionMade."""
        [spawned] = self.reactor.spawned
        self.assertEqual(spawned.executable, "/venv/bin/python")
        self.assertEqual(spawned.args, ["/venv/bin/python", "-m", "main"])
        self.assertEqual(spawned.env, {"A": "1"})
        self.assertEqual(spawned.path, "/work")
        self.assertIs(spawned.transport, self.transport)
        self.assertIs(spawned.protocol, self.protocol)
        self.assertIs(self.protocol.transport, self.transport)
        self.assertEqual(self.protocol.events, [("connectionMade",)])
        self.assertIsInstance(self.transport.pid, int)

    def test_pids_differ(self):
        """Each spawned process gets its own pid."""
        other = self.reactor.spawnProcess(RecordingProtocol(), "x", ["x"])
        self.assertNotEqual(other.pid, self.transport.pid)
        self.assertEqual(len(self.reactor.running_processes), 2)

    def test_writes_recorded(self):
        """Writes to stdin are recorded in order and can be joined."""
        self.transport.write(b"a\n")
        self.transport.writeSequence([b"b", b"c\n"])
        self.assertEqual(self.transport.written, [b"a\n", b"b", b"c\n"])
        self.assertEqual(self.transport.stdin_bytes(), b"a\nbc\n")
        self.assertRaises(TypeError, self.transport.write, "text")

    def test_close_stdin(self):
        """Closing stdin is remembered."""
        self.transport.closeStdin()
        self.assertTrue(self.transport.stdin_closed)

    def test_output_delivered(self):
        """stdout() and stderr() reach outReceived and errReceived."""
        self.transport.stdout(b"out")
        self.transport.stderr(b"err")
        self.assertEqual(self.protocol.events[1:], [("out", b"out"), ("err", b"err")])

    def test_exit_code(self):
        """exit(0) ends with ProcessDone, exit(n) with ProcessTerminated(exitCode=n)."""
        self.transport.exit(3)
        exited, ended = self.protocol.events[-2:]
        self.assertEqual(exited[0], "exited")
        self.assertEqual(ended[0], "ended")
        ended[1].trap(error.ProcessTerminated)
        self.assertEqual(ended[1].value.exitCode, 3)
        self.assertTrue(self.transport.ended)
        self.assertIsNone(self.transport.pid)
        self.assertEqual(self.reactor.running_processes, [])

        protocol = RecordingProtocol()
        self.reactor.spawnProcess(protocol, "x", ["x"]).exit(0)
        protocol.events[-1][1].trap(error.ProcessDone)

    def test_exit_holding_pipes(self):
        """A child whose pipes are held is reaped (processExited) and ends only when the parent closes its pipes."""
        self.transport.exit_holding_pipes(0)
        self.assertEqual(self.protocol.events[-1][0], "exited")
        self.assertTrue(self.transport.reaped)
        self.assertFalse(self.transport.ended)
        self.assertRaises(error.ProcessExitedAlready, self.transport.signalProcess, "TERM")
        self.transport.loseConnection()
        self.assertEqual(self.protocol.events[-1][0], "ended")
        self.assertTrue(self.transport.ended)
        self.assertTrue(self.transport.pipes_closed_by_parent)

    def test_release_pipes(self):
        """When what held the pipes ends, processEnded follows without the parent closing them."""
        self.transport.exit_holding_pipes(2)
        self.transport.release_pipes()
        self.protocol.events[-1][1].trap(error.ProcessTerminated)
        self.assertFalse(self.transport.pipes_closed_by_parent)

    def test_signals_recorded_and_kill_ends(self):
        """TERM is only recorded; KILL ends the process on the next reactor turn."""
        self.transport.signalProcess("TERM")
        self.reactor.advance(0)
        self.assertFalse(self.transport.ended)
        self.transport.signalProcess("KILL")
        self.assertFalse(self.transport.ended)
        self.reactor.advance(0)
        self.assertTrue(self.transport.ended)
        self.assertEqual(self.transport.signals, ["TERM", "KILL"])
        reason = self.protocol.events[-1][1]
        reason.trap(error.ProcessTerminated)
        self.assertEqual(reason.value.signal, 9)

    def test_configurable_fatal_signals(self):
        """A transport can be made to obey TERM too."""
        self.transport.fatal_signals = frozenset({"TERM"})
        self.transport.signalProcess("TERM")
        self.reactor.advance(0)
        self.assertEqual(self.protocol.events[-1][1].value.signal, 15)

    def test_signal_after_exit(self):
        """Signalling an ended process raises ProcessExitedAlready."""
        self.transport.exit(0)
        self.assertRaises(error.ProcessExitedAlready, self.transport.signalProcess, "KILL")

    def test_output_after_exit_refused(self):
        """The test cannot play output or a second exit after the process ended."""
        self.transport.exit(0)
        self.assertRaises(error.ProcessExitedAlready, self.transport.stdout, b"x")
        self.assertRaises(error.ProcessExitedAlready, self.transport.exit, 1)

    def test_exit_before_scheduled_kill(self):
        """A process that exits before its KILL lands is not ended twice."""
        self.transport.signalProcess("KILL")
        self.transport.exit(1)
        self.reactor.advance(0)
        self.assertEqual([e[0] for e in self.protocol.events].count("ended"), 1)

    def test_spawn_error(self):
        """spawn_error makes the next spawnProcess raise, once."""
        self.reactor.spawn_error = OSError(2, "No such file")
        self.assertRaises(OSError, self.reactor.spawnProcess, RecordingProtocol(), "x", ["x"])
        self.reactor.spawnProcess(RecordingProtocol(), "x", ["x"])
        self.assertEqual(len(self.reactor.spawned), 2)
