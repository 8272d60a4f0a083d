"""MemoryPersistence against the IPersistence contract."""

from twisted.internet.testing import MemoryReactorClock

from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.testing.cases import SynchronousTestCase
from tests.persistence.contract import PersistenceContract


class MemoryPersistenceTests(PersistenceContract, SynchronousTestCase):
    """The in-memory implementation keeps the contract with fired Deferreds."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        self.persistence = MemoryPersistence(self.clock)
        self.successResultOf(self.persistence.migrate())

    def run_check(self, check):
        self.successResultOfCoroutine(check)
