"""Tests for difydaemon.runtimes.sessions: routing, timeouts, fail-all."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from difydaemon.interfaces import ISessionListener
from difydaemon.runtimes.codec import SessionMessage
from difydaemon.runtimes.sessions import SessionDrain, SessionTable
from difydaemon.testing.cases import SynchronousTestCase
from tests.runtimes.listeners import RecordingListener


def stream(session_id, chunk):
    return SessionMessage(session_id, "stream", chunk, b"raw:" + repr(chunk).encode())


def end(session_id):
    return SessionMessage(session_id, "end", {}, None)


def error(session_id, data):
    return SessionMessage(session_id, "error", data, None)


class SessionTableTests(SynchronousTestCase):
    """SessionTable routes each message to the right listener exactly once."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.table = SessionTable(self.clock, 600)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def test_listener_provides_interface(self):
        """The recording listener used here is a real ISessionListener."""
        self.assertTrue(verifyObject(ISessionListener, RecordingListener()))

    def test_stream_then_end(self):
        """Chunks go to stream with their raw bytes, then end closes the session."""
        listener = RecordingListener()
        self.table.open("s1", listener)
        self.table.deliver(stream("s1", {"a": 1}))
        self.table.deliver(end("s1"))
        self.assertEqual(
            listener.calls, [("stream", {"a": 1}, b"raw:{'a': 1}"), ("end",)]
        )
        self.assertNotIn("s1", self.table)
        self.assertEqual(len(self.table), 0)

    def test_routing_by_session_id(self):
        """Two sessions each get only their own messages."""
        first, second = RecordingListener(), RecordingListener()
        self.table.open("s1", first)
        self.table.open("s2", second)
        self.table.deliver(stream("s2", 2))
        self.table.deliver(stream("s1", 1))
        self.assertEqual([c[1] for c in first.calls], [1])
        self.assertEqual([c[1] for c in second.calls], [2])

    def test_invoke(self):
        """An invoke message reaches invoke and leaves the session open."""
        listener = RecordingListener()
        self.table.open("s1", listener)
        request = {"type": "storage", "backwards_request_id": "b1", "request": {}}
        self.table.deliver(SessionMessage("s1", "invoke", request, None))
        self.assertEqual(listener.calls, [("invoke", request)])
        self.assertIn("s1", self.table)

    def test_error_then_end_is_swallowed(self):
        """The plugin's error closes the session; the SDK's trailing end is dropped."""
        listener = RecordingListener()
        self.table.open("s1", listener)
        self.table.deliver(
            error("s1", {"error_type": "ValueError", "message": "bad", "args": {"traceback": "t"}})
        )
        self.table.deliver(end("s1"))
        self.assertEqual(listener.calls, [("error", "ValueError", "bad", {"traceback": "t"})])

    def test_odd_error_data(self):
        """An error with odd fields still closes the session with usable values."""
        listener = RecordingListener()
        self.table.open("s1", listener)
        self.table.deliver(error("s1", {"message": 5, "args": ["x"]}))
        self.assertEqual(listener.calls, [("error", "unknown_error", "5", None)])

    def test_unknown_type_fails_the_session(self):
        """An unknown session message type ends the session with unknown_stream_message_type."""
        listener = RecordingListener()
        self.table.open("s1", listener)
        self.table.deliver(SessionMessage("s1", "weird", {}, None))
        self.assertEqual(
            listener.calls,
            [("error", "unknown_stream_message_type", "unknown stream message type: weird", None)],
        )

    def test_unknown_session_dropped(self):
        """A message for an unknown session is dropped and logged at debug."""
        self.table.deliver(stream("nobody", 1))
        self.assertEqual(len(self.table), 0)
        self.assertEqual([e["log_level"].name for e in self.logged], ["debug"])

    def test_timeout(self):
        """A session past its timeout gets 'killed by timeout' once; later messages are dropped."""
        listener = RecordingListener()
        self.table.open("s1", listener)
        self.clock.advance(599)
        self.assertEqual(listener.calls, [])
        self.clock.advance(1)
        self.assertEqual(
            listener.calls, [("error", "PluginDaemonInternalServerError", "killed by timeout", None)]
        )
        self.table.deliver(stream("s1", 1))
        self.table.deliver(end("s1"))
        self.assertEqual(len(listener.calls), 1)

    def test_explicit_timeout(self):
        """A per-session timeout replaces the table's default."""
        listener = RecordingListener()
        self.table.open("s1", listener, timeout=5)
        self.clock.advance(5)
        self.assertEqual(listener.calls[0][2], "killed by timeout")

    def test_no_default_timeout(self):
        """A table without a default timeout schedules no timer."""
        table = SessionTable(self.clock, None)
        table.open("s1", RecordingListener())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timer_cancelled_on_finish(self):
        """Finishing a session cancels its timer."""
        self.table.open("s1", RecordingListener())
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.table.deliver(end("s1"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close(self):
        """close() abandons the session silently and cancels its timer; twice is harmless."""
        listener = RecordingListener()
        handle = self.table.open("s1", listener)
        self.assertTrue(handle.is_open)
        handle.close()
        handle.close()
        self.table.deliver(stream("s1", 1))
        self.assertFalse(handle.is_open)
        self.assertEqual(listener.calls, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_after_reuse_of_id_leaves_new_session(self):
        """A stale handle does not close a later session with the same id."""
        old = self.table.open("s1", RecordingListener())
        self.table.deliver(end("s1"))
        new_listener = RecordingListener()
        self.table.open("s1", new_listener)
        old.close()
        self.assertIn("s1", self.table)

    def test_duplicate_open_refused(self):
        """Opening an id that is already open raises ValueError."""
        self.table.open("s1", RecordingListener())
        self.assertRaises(ValueError, self.table.open, "s1", RecordingListener())

    def test_fail_all(self):
        """fail_all sends the same error to every open session at once and empties the table."""
        listeners = [RecordingListener() for _ in range(3)]
        for number, listener in enumerate(listeners):
            self.table.open(f"s{number}", listener)
        self.table.fail_all("ConnectionClosedError", "plugin instance exited")
        for listener in listeners:
            self.assertEqual(
                listener.calls, [("error", "ConnectionClosedError", "plugin instance exited", None)]
            )
        self.assertEqual(len(self.table), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_listener_exception_does_not_break_routing(self):
        """A listener that raises is logged with log.failure; other sessions still get messages."""
        broken, healthy = RecordingListener(fail_on="stream"), RecordingListener()
        self.table.open("s1", broken)
        self.table.open("s2", healthy)
        self.table.deliver(stream("s1", 1))
        self.table.deliver(stream("s2", 2))
        self.table.deliver(end("s1"))
        self.assertEqual(healthy.calls[0][1], 2)
        self.assertEqual(broken.calls[-1], ("end",))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_listener_exception_in_error_during_fail_all(self):
        """A listener raising in error() does not stop fail_all reaching the others."""
        broken, healthy = RecordingListener(fail_on="error"), RecordingListener()
        self.table.open("s1", broken)
        self.table.open("s2", healthy)
        self.table.fail_all("ConnectionClosedError", "gone")
        self.assertEqual(healthy.calls, [("error", "ConnectionClosedError", "gone", None)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_drained(self):
        """drained() fires at once when empty, otherwise after the last session finishes."""
        self.successResultOf(self.table.drained())
        self.table.open("s1", RecordingListener())
        handle = self.table.open("s2", RecordingListener())
        waiting = self.table.drained()
        self.table.deliver(end("s1"))
        self.assertNoResult(waiting)
        handle.close()
        self.successResultOf(waiting)


    def test_on_empty_each_time_the_last_session_ends(self):
        """on_empty is called whenever the table empties: by end, error, close, timeout or fail_all."""
        emptied = []
        table = SessionTable(self.clock, 10, on_empty=lambda: emptied.append(len(table)))
        table.open("s1", RecordingListener())
        table.open("s2", RecordingListener())
        table.deliver(end("s1"))
        self.assertEqual(emptied, [])
        table.open("s3", RecordingListener()).close()
        self.assertEqual(emptied, [])
        table.deliver(end("s2"))
        self.assertEqual(emptied, [0])
        table.open("s4", RecordingListener())
        self.clock.advance(10)
        table.open("s5", RecordingListener())
        table.fail_all("E", "m")
        self.assertEqual(emptied, [0, 0, 0])


class SessionDrainTests(SynchronousTestCase):
    """SessionDrain waits for sessions up to a deadline that can only come sooner."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.tables = [SessionTable(self.clock, None), SessionTable(self.clock, None)]
        self.done = []

    def drain(self) -> SessionDrain:
        return SessionDrain(self.clock, self.tables, lambda: self.done.append(self.clock.seconds()))

    def test_nothing_open(self):
        """With no open session the drain is over at once."""
        self.drain().start(10)
        self.assertEqual(self.done, [0])

    def test_done_when_sessions_end(self):
        """The drain ends when the last session of every table ends, and leaves no timer."""
        self.tables[0].open("s1", RecordingListener())
        self.tables[1].open("s2", RecordingListener())
        self.drain().start(10)
        self.clock.advance(2)
        self.tables[0].deliver(end("s1"))
        self.assertEqual(self.done, [])
        self.clock.advance(1)
        self.tables[1].deliver(end("s2"))
        self.assertEqual(self.done, [3])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_reason_given_to_sessions_open_at_the_deadline(self):
        """At the deadline the open sessions fail with the reason, then the drain is over."""
        listener = RecordingListener()
        self.tables[1].open("s1", listener)
        self.drain().start(8, "the plugin daemon is shutting down")
        self.clock.advance(8)
        self.assertEqual(
            listener.calls, [("error", "PluginDaemonInternalServerError", "the plugin daemon is shutting down", None)]
        )
        self.assertEqual(self.done, [8])

    def test_without_reason_sessions_stay_open(self):
        """Without a reason the deadline ends the drain and leaves the sessions to their runtime."""
        listener = RecordingListener()
        self.tables[0].open("s1", listener)
        self.drain().start(8)
        self.clock.advance(8)
        self.assertEqual((listener.calls, self.done), ([], [8]))
        self.assertIn("s1", self.tables[0])

    def test_limit_only_brings_the_deadline_forward(self):
        """A later, shorter limit wins; a later, longer one changes nothing; done is called once."""
        self.tables[0].open("s1", RecordingListener())
        drain = self.drain()
        drain.start(600)
        self.clock.advance(10)
        drain.limit(5, "the plugin daemon is shutting down")
        drain.limit(100)
        self.clock.advance(5)
        self.assertEqual(self.done, [15])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_limit_waits(self):
        """A None timeout waits for the sessions however long they take."""
        self.tables[0].open("s1", RecordingListener())
        self.drain().start(None)
        self.clock.advance(10**6)
        self.assertEqual(self.done, [])
        self.tables[0].deliver(end("s1"))
        self.assertEqual(self.done, [10**6])
