"""
Dispatch clients that go away (issue 11, item 12), on both stacks: the
dispatch channel and twisted.web.  A client that leaves is forgotten: its
plugin session is abandoned (or never opened), nothing more is written and
nothing is logged as a failure.
"""

from __future__ import annotations

import gc

from twisted.logger import LogLevel, globalLogPublisher

from difydaemon import errors
from difydaemon.testing.cases import SynchronousTestCase
from tests.api.test_dispatch import TEXT_HI, TEXT_HO
from tests.api.test_dispatch_channel import Connection, post


class _LogLevels:
    """The levels of the log events emitted while it listens."""

    def __init__(self, test) -> None:
        self.levels: list = []
        globalLogPublisher.addObserver(self._observe)
        test.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event) -> None:
        self.levels.append(event.get("log_level"))

    def failures(self) -> int:
        """How many events were at error level or above."""
        return sum(1 for level in self.levels if level in (LogLevel.error, LogLevel.critical))


def assert_nothing_logged_as_failure(test, logged: _LogLevels) -> None:
    """
    No failure was logged, not even one of a Deferred that ended in an
    unhandled error (logged when it is collected, hence the collection).
    """
    gc.collect()
    test.assertEqual(test.flushLoggedErrors(), [])
    test.assertEqual(logged.failures(), 0)


class DepartureTestsMixin:
    """What every stack does with a client that goes away; ``lean`` picks the stack."""

    lean: bool

    def connect(self, **options) -> Connection:
        """A connection whose installation lookups wait for the test."""
        return Connection(self, lean=self.lean, script=False, hold_lookups=True, **options)

    def open_after_slow_lookup(self):
        """A request whose lookup was held, then released: (connection, runtime, session id)."""
        connection = self.connect()
        connection.send(post())
        connection.daemon.lookups.release()
        runtime = connection.daemon.runtime
        return connection, runtime, runtime.last_session_id

    def test_gone_during_lookup_opens_no_session(self):
        """A client that leaves before its installation is found gets no session, no write and no failure log."""
        logged = _LogLevels(self)
        connection = self.connect()
        runtime = connection.daemon.runtime
        connection.send(post())
        self.assertEqual(len(connection.daemon.lookups.pending), 1)
        connection.disconnect()
        connection.daemon.lookups.release()
        connection.clock.advance(1000)
        self.assertEqual(runtime.requests, [])
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual(connection.clock.getDelayedCalls(), [])
        self.assertEqual((connection.counter.active, connection.counter.active_dispatch), (0, 0))
        assert_nothing_logged_as_failure(self, logged)

    def test_gone_during_lookup_of_missing_plugin(self):
        """A client that leaves before its lookup finds no installation gets no answer and no failure log."""
        logged = _LogLevels(self)
        connection = self.connect(install=False)
        connection.send(post())
        connection.disconnect()
        connection.daemon.lookups.release()
        self.assertEqual(connection.transport.value(), b"")
        assert_nothing_logged_as_failure(self, logged)

    def test_gone_during_failed_lookup(self):
        """A lookup that fails (a DaemonError) after the client left writes nothing and logs no failure."""
        logged = _LogLevels(self)
        connection = self.connect()
        connection.send(post())
        connection.disconnect()
        connection.daemon.lookups.fail(errors.InternalServerError("database unavailable"))
        self.assertEqual(connection.transport.value(), b"")
        assert_nothing_logged_as_failure(self, logged)

    def test_lookup_bug_after_departure_is_logged_once(self):
        """A lookup that fails with a bug after the client left is logged as that bug only, and nothing is written."""
        connection = self.connect()
        connection.send(post())
        connection.disconnect()
        connection.daemon.lookups.fail(ZeroDivisionError("bug"))
        self.assertEqual(connection.transport.value(), b"")
        gc.collect()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_gone_after_lookup_abandons_session(self):
        """A client that leaves mid-stream after a slow lookup closes the session; the end writes and logs nothing."""
        logged = _LogLevels(self)
        connection, runtime, session = self.open_after_slow_lookup()
        runtime.stream(session, TEXT_HI)
        connection.clock.advance(0)
        written = connection.transport.value()
        self.assertIn(b"text/event-stream", written)
        connection.disconnect()
        self.assertFalse(runtime.is_open(session))
        runtime.stream(session, TEXT_HO)
        runtime.end(session)
        connection.clock.advance(1000)
        self.assertEqual(connection.transport.value(), written)
        self.assertEqual(connection.clock.getDelayedCalls(), [])
        assert_nothing_logged_as_failure(self, logged)

    def test_answered_after_slow_lookup(self):
        """A client that stays through a slow lookup is served as usual."""
        connection, runtime, session = self.open_after_slow_lookup()
        runtime.stream(session, TEXT_HI)
        runtime.end(session)
        raw = connection.transport.value()
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK\r\n"), raw)
        self.assertTrue(raw.endswith(b"\r\n0\r\n\r\n"), raw)


class DispatchChannelDepartureTests(DepartureTestsMixin, SynchronousTestCase):
    """Clients that go away, served by the dispatch channel."""

    lean = True


class TwistedWebDepartureTests(DepartureTestsMixin, SynchronousTestCase):
    """Clients that go away, served by twisted.web."""

    lean = False
