"""The open-files limit raised at start."""

from __future__ import annotations

from difydaemon.file_limit import FileLimit, raise_open_files_limit
from difydaemon.testing.cases import SynchronousTestCase


class FakeResource:
    """The few names of the ``resource`` module used, over one recorded limit."""

    RLIMIT_NOFILE = 7
    RLIM_INFINITY = -1

    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.limit = (soft, hard)
        self.refuse = refuse
        self.set_calls = []

    def getrlimit(self, which):
        assert which == self.RLIMIT_NOFILE
        return self.limit

    def setrlimit(self, which, limit):
        self.set_calls.append((which, limit))
        if self.refuse:
            raise ValueError("not allowed")
        self.limit = limit


class RaiseTests(SynchronousTestCase):
    """The soft limit goes up to the hard one, when it can."""

    def test_raised(self):
        """A soft limit under the hard one is raised to it."""
        fake = FakeResource(1024, 524288)
        self.assertEqual(raise_open_files_limit(fake), FileLimit(1024, 524288, 524288))
        self.assertEqual(fake.limit, (524288, 524288))

    def test_already_there(self):
        """A soft limit at the hard one, or an unlimited hard limit, is left alone."""
        for soft, hard in ((4096, 4096), (1024, FakeResource.RLIM_INFINITY)):
            fake = FakeResource(soft, hard)
            self.assertEqual(raise_open_files_limit(fake), FileLimit(soft, soft, hard))
            self.assertEqual(fake.set_calls, [])

    def test_refused(self):
        """A system that refuses leaves the limit as it was, and says so (None)."""
        fake = FakeResource(1024, 4096, refuse=True)
        self.assertIsNone(raise_open_files_limit(fake))
        self.assertEqual(fake.limit, (1024, 4096))

    def test_real(self):
        """On this system the soft limit ends at the hard limit (or stays where it was if that is unlimited)."""
        import resource
        limit = raise_open_files_limit()
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE), (limit.after, limit.hard))
