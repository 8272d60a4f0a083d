"""Tests for :mod:`difydaemon.background`."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from difydaemon.background import start_tracked
from difydaemon.testing.cases import SynchronousTestCase


class StartTrackedTests(SynchronousTestCase):
    def test_tracked_until_done(self):
        """Work is in the pending set until it ends, then leaves it; its Deferred fires with None."""
        gate: Deferred = Deferred()

        async def work():
            await gate

        pending: set = set()
        done = start_tracked(work(), pending, "work failed")
        self.assertEqual(pending, {done})
        gate.callback(None)
        self.assertEqual(pending, set())
        self.assertIsNone(self.successResultOf(done))

    def test_failure_logged(self):
        """A failure is logged, not passed on, and the work leaves the pending set."""
        gate: Deferred = Deferred()

        async def work():
            await gate
            raise ValueError("boom")

        pending: set = set()
        done = start_tracked(work(), pending, "work {name} failed", name="x")
        gate.callback(None)
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(pending, set())
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_already_done_not_tracked(self):
        """Work that ends at once is never in the pending set."""

        async def work():
            return None

        pending: set = set()
        self.assertIsNone(self.successResultOf(start_tracked(work(), pending, "work failed")))
        self.assertEqual(pending, set())
