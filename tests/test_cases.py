"""Tests for the shared test-case bases."""

from twisted.trial.reporter import TestResult

from difydaemon.testing.cases import SynchronousTestCase


def _run(case):
    result = TestResult()
    case.run(result)
    return result


class SilentPassGuardTests(SynchronousTestCase):
    """The base class fails coroutine tests instead of passing them."""

    def test_async_test_fails(self):
        """An async def test on the synchronous base is reported as a failure."""

        class Coroutine(SynchronousTestCase):
            async def test_never_runs(self):
                raise AssertionError("not reached")

        result = _run(Coroutine("test_never_runs"))
        self.assertEqual(len(result.failures), 1)
        self.assertIn("would never run", str(result.failures[0][1].value))

    def test_plain_test_passes(self):
        """A plain synchronous test still runs and passes."""

        class Plain(SynchronousTestCase):
            def test_plain(self):
                pass

        result = _run(Plain("test_plain"))
        self.assertTrue(result.wasSuccessful())
        self.assertEqual(result.successes, 1)
