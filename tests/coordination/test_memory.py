"""The in-memory coordination set against the coordination contract."""

from twisted.internet.testing import MemoryReactorClock

from difydaemon.coordination import memory_coordination
from difydaemon.testing.cases import SynchronousTestCase
from tests.coordination.contract import CoordinationContract


class MemoryCoordinationTests(CoordinationContract, SynchronousTestCase):
    """The in-memory implementations keep the contract with fired Deferreds and a fake clock."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        self.coordination = memory_coordination(self.clock)
        # one process: the other replica's view is the same objects
        self.other = self.coordination

    def run_check(self, check):
        self.successResultOfCoroutine(check)

    async def wait(self, seconds):
        self.clock.advance(seconds)

    async def delivered(self, deferred):
        self.clock.advance(0)
        return self.successResultOf(deferred)
