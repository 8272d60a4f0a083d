"""Tests of the public fake runtime factory, :class:`difydaemon.testing.launchers.FakeRuntimeFactory`."""

from __future__ import annotations

from twisted.internet.defer import CancelledError

from difydaemon.errors import InternalServerError
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.launchers import FakeRuntimeFactory

A = "acme/a:0.0.1@" + "a" * 64


class FakeRuntimeFactoryTests(SynchronousTestCase):
    """Attempts wait for the test, which settles, fails or watches them cancelled."""

    def setUp(self):
        super().setUp()
        self.factory = FakeRuntimeFactory(installed=[A])

    def test_installed(self):
        """installed() reports the identifiers given."""
        self.assertEqual(self.successResultOf(self.factory.installed()), [A])

    def test_attempts_recorded_and_settled(self):
        """Both kinds of attempt are recorded; succeed() and fail() settle the pending one."""
        runtime = object()
        first = self.factory.launch(A, {}, b"", lambda line: None)
        self.assertNoResult(first)
        self.factory.succeed(A, runtime)
        self.assertIs(self.successResultOf(first), runtime)
        second = self.factory.launch_installed(A, lambda line: None)
        self.factory.fail(A, "broken")
        self.assertEqual(self.failureResultOf(second, InternalServerError).value.message, "broken")
        self.assertEqual(self.factory.attempts, [(A, "install"), (A, "installed")])
        self.assertEqual(self.factory.count(A), 2)

    def test_cancel_recorded(self):
        """A cancelled attempt is listed in cancelled."""
        attempt = self.factory.launch_installed(A, lambda line: None)
        attempt.cancel()
        self.failureResultOf(attempt, CancelledError)
        self.assertEqual(self.factory.cancelled, [A])

    def test_not_local(self):
        """launch_installed answers None at once for identifiers that are not local plugins."""
        self.factory.not_local.add(A)
        self.assertIsNone(self.successResultOf(self.factory.launch_installed(A, lambda line: None)))
        self.assertEqual(self.factory.attempts, [])

    def test_discard(self):
        """discard() is recorded."""
        self.successResultOf(self.factory.discard(A))
        self.assertEqual(self.factory.discarded, [A])
