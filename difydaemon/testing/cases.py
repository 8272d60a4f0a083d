"""
Base classes for the daemon's trial tests.

They guard against the silent-pass trap: an ``async def test_*`` on a
:class:`twisted.trial.unittest.SynchronousTestCase` returns a coroutine that
nobody awaits, and the test "passes" without running.  Both bases here fail
such a test loudly; :class:`AsyncTestCase` runs coroutines properly.
"""

from __future__ import annotations

import inspect

from twisted.internet.defer import Deferred
from twisted.trial import unittest


class SynchronousTestCase(unittest.SynchronousTestCase):
    """A synchronous test case that refuses coroutine test methods."""

    def setUp(self):
        method = getattr(self, self._testMethodName)
        if inspect.iscoroutinefunction(method):
            self.fail(
                f"{self._testMethodName} is 'async def' on a SynchronousTestCase: "
                "it would never run; use AsyncTestCase"
            )
        return super().setUp()

    def successResultOfCoroutine(self, coroutine):
        """The result of a coroutine that must finish synchronously."""
        return self.successResultOf(Deferred.fromCoroutine(coroutine))

    def failureResultOfCoroutine(self, coroutine, *types):
        """The failure of a coroutine that must fail synchronously."""
        return self.failureResultOf(Deferred.fromCoroutine(coroutine), *types)


class AsyncTestCase(unittest.TestCase):
    """
    A real-reactor test case whose ``async def`` tests run as Deferreds.

    trial already handles coroutine methods on ``TestCase``; this base only
    exists so that every test module imports its cases from one place.
    """
