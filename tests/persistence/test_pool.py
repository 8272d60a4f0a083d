"""ConnectionPool: connections opened on demand and replaced when they break."""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock

from difydaemon.persistence.pool import ConnectionPool, PoolClosedError
from difydaemon.testing.cases import SynchronousTestCase


class Unreachable(Exception):
    """The fake database refuses connections."""


class FakeDatabase:
    """Opens numbered fake connections, or holds/fails the opening when told."""

    def __init__(self) -> None:
        self.opened = []
        self.closed = []
        self.refusing = False
        self.holding = []
        self.hold = False

    def open(self):
        if self.refusing:
            return fail(Unreachable("refused"))
        connection = f"connection-{len(self.opened) + 1}"
        self.opened.append(connection)
        if self.hold:
            d = Deferred()
            self.holding.append((d, connection))
            return d
        return connection

    def close(self, connection) -> None:
        self.closed.append(connection)


class PoolTests(SynchronousTestCase):
    """Lending, replacing and closing connections."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.database = FakeDatabase()

    def pool(self, size=2, **kwargs) -> ConnectionPool:
        return ConnectionPool(self.clock, self.database.open, self.database.close, size, **kwargs)

    def test_opens_on_demand_and_reuses(self):
        """Nothing opens before it is needed; a returned connection is lent again."""
        pool = self.pool()
        self.assertEqual(self.database.opened, [])
        first = self.successResultOf(pool.acquire())
        pool.release(first)
        self.assertEqual(self.successResultOf(pool.acquire()), first)
        self.assertEqual(self.database.opened, ["connection-1"])

    def test_waits_when_all_lent(self):
        """With every connection lent, a caller waits for the next one returned."""
        pool = self.pool(size=1)
        first = self.successResultOf(pool.acquire())
        waiting = pool.acquire()
        self.assertNoResult(waiting)
        self.assertEqual(pool.waiting_count, 1)
        pool.release(first)
        self.assertEqual(self.successResultOf(waiting), first)
        self.assertEqual(self.database.opened, ["connection-1"])

    def test_broken_connection_is_replaced(self):
        """A connection released as not reusable is closed; the waiting caller gets a new one."""
        pool = self.pool(size=1)
        first = self.successResultOf(pool.acquire())
        waiting = pool.acquire()
        pool.release(first, reusable=False)
        self.assertEqual(self.database.closed, ["connection-1"])
        self.assertEqual(self.successResultOf(waiting), "connection-2")
        self.assertEqual(pool.open_count, 1)

    def test_broken_connection_frees_its_slot(self):
        """After a broken connection is closed, the next call opens a new one."""
        pool = self.pool(size=1)
        pool.release(self.successResultOf(pool.acquire()), reusable=False)
        self.assertEqual(self.successResultOf(pool.acquire()), "connection-2")

    def test_failed_connect_fails_every_waiter(self):
        """A refused connect fails its caller and everyone waiting, and the slot is free again."""
        pool = self.pool(size=1)
        self.database.hold = True
        opening = pool.acquire()
        waiting = [pool.acquire(), pool.acquire()]
        held, connection = self.database.holding.pop()
        held.errback(Unreachable("refused"))
        self.failureResultOf(opening, Unreachable)
        for d in waiting:
            self.failureResultOf(d, Unreachable)
        self.assertEqual((pool.open_count, pool.waiting_count), (0, 0))
        self.database.hold = False
        self.assertEqual(self.successResultOf(pool.acquire()), "connection-2")

    def test_refused_connect_recovers(self):
        """While connects are refused each call fails; the first call after recovery succeeds."""
        pool = self.pool()
        self.database.refusing = True
        self.failureResultOf(pool.acquire(), Unreachable)
        self.failureResultOf(pool.acquire(), Unreachable)
        self.database.refusing = False
        self.assertEqual(self.successResultOf(pool.acquire()), "connection-1")

    def test_lost_idle_connection(self):
        """An idle connection found dead is closed and never lent."""
        pool = self.pool()
        first = self.successResultOf(pool.acquire())
        pool.release(first)
        pool.lost(first)
        self.assertEqual(self.database.closed, [first])
        self.assertEqual(self.successResultOf(pool.acquire()), "connection-2")

    def test_lost_lent_connection_is_left_to_its_user(self):
        """lost() of a connection in use changes nothing until it is released."""
        pool = self.pool()
        first = self.successResultOf(pool.acquire())
        pool.lost(first)
        self.assertEqual((self.database.closed, pool.open_count), ([], 1))

    def test_discard_idle(self):
        """discard_idle closes every idle connection and not the lent ones."""
        pool = self.pool(size=3)
        a, b, c = (self.successResultOf(pool.acquire()) for _ in range(3))
        pool.release(a)
        pool.release(b)
        self.assertEqual(pool.discard_idle(), 2)
        self.assertEqual(sorted(self.database.closed), [a, b])
        self.assertEqual((pool.open_count, pool.idle_count), (1, 0))
        pool.release(c)
        self.assertEqual(pool.idle_count, 1)

    def test_max_idle(self):
        """Returned connections beyond max_idle are closed."""
        pool = self.pool(size=3, max_idle=1)
        a, b = self.successResultOf(pool.acquire()), self.successResultOf(pool.acquire())
        pool.release(a)
        pool.release(b)
        self.assertEqual((self.database.closed, pool.idle_count, pool.open_count), ([b], 1, 1))

    def test_max_lifetime(self):
        """A connection older than max_lifetime is replaced instead of lent again."""
        pool = self.pool(max_lifetime=60)
        first = self.successResultOf(pool.acquire())
        pool.release(first)
        self.clock.advance(59)
        self.assertEqual(self.successResultOf(pool.acquire()), first)
        self.clock.advance(1)
        pool.release(first)
        self.assertEqual(self.database.closed, [first])
        second = self.successResultOf(pool.acquire())
        self.assertEqual(second, "connection-2")
        pool.release(second)
        self.clock.advance(60)
        self.assertEqual(self.successResultOf(pool.acquire()), "connection-3")
        self.assertEqual(self.database.closed, [first, second])

    def test_close(self):
        """close() closes idle connections, fails waiters and later calls, and closes lent ones on return."""
        pool = self.pool(size=2)
        a, b = self.successResultOf(pool.acquire()), self.successResultOf(pool.acquire())
        pool.release(a)
        lent = self.successResultOf(pool.acquire())
        waiting = pool.acquire()
        pool.close()
        self.failureResultOf(waiting, PoolClosedError)
        self.failureResultOf(pool.acquire(), PoolClosedError)
        self.assertEqual(self.database.closed, [])
        pool.release(lent)
        pool.release(b)
        self.assertEqual((self.database.closed, pool.open_count), ([a, b], 0))

    def test_close_idle(self):
        """close() closes idle connections at once."""
        pool = self.pool()
        pool.release(self.successResultOf(pool.acquire()))
        pool.close()
        self.assertEqual((self.database.closed, pool.open_count), (["connection-1"], 0))

    def test_close_while_connecting(self):
        """A connection that opens after close() is closed, and its caller fails."""
        pool = self.pool()
        self.database.hold = True
        opening = pool.acquire()
        pool.close()
        held, connection = self.database.holding.pop()
        held.callback(connection)
        self.failureResultOf(opening, PoolClosedError)
        self.assertEqual((self.database.closed, pool.open_count), ([connection], 0))
