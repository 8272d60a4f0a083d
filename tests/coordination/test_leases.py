"""HeldLease and LeaderElection on a fake clock, over the in-memory lease service."""

from __future__ import annotations

from twisted.internet.defer import fail
from twisted.internet.testing import MemoryReactorClock

from difydaemon.coordination.leases import HeldLease, LeaderElection
from difydaemon.coordination.memory import MemoryLeaseService
from difydaemon.errors import CoordinationUnavailableError
from difydaemon.testing.cases import SynchronousTestCase


class OutageLeases:
    """A lease service that fails every call with the redis-unavailable error while ``down``."""

    def __init__(self, leases) -> None:
        self._leases = leases
        self.down = False
        self.renewals = 0

    def _call(self, name, *args):
        if self.down:
            return fail(CoordinationUnavailableError("connection lost: test outage"))
        return getattr(self._leases, name)(*args)

    def acquire(self, name, ttl):
        return self._call("acquire", name, ttl)

    def renew(self, name, token, ttl):
        self.renewals += 1
        return self._call("renew", name, token, ttl)

    def release(self, name, token):
        return self._call("release", name, token)

    def holder(self, name):
        return self._call("holder", name)


class HeldLeaseTests(SynchronousTestCase):
    """A held lease is renewed, and its loss is reported once."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.memory = MemoryLeaseService(self.clock)
        self.leases = OutageLeases(self.memory)
        self.lost = []

    def acquire(self, ttl=3.0):
        return self.successResultOfCoroutine(HeldLease.acquire(self.clock, self.leases, "l", ttl, self.lost.append))

    def test_renewed_while_held(self):
        """A lease is renewed every third of its ttl and so outlives it many times over."""
        lease = self.acquire()
        for _ in range(30):
            self.clock.advance(1.0)
        self.assertTrue(lease.held)
        self.assertEqual(self.successResultOf(self.memory.holder("l")), lease.token)
        self.assertEqual(self.leases.renewals, 30)
        self.assertEqual(lease.valid_until, 33.0)
        self.assertEqual(self.lost, [])

    def test_held_elsewhere(self):
        """acquire gives None while another holder has the lease."""
        self.acquire()
        self.assertIsNone(self.successResultOfCoroutine(HeldLease.acquire(self.clock, self.leases, "l", 3.0)))

    def test_lost_when_renewal_refused(self):
        """When the token no longer holds the lease, the loss is reported at the next renewal, once, and renewing stops."""
        lease = self.acquire()
        self.successResultOf(self.memory.release("l", lease.token))
        self.successResultOf(self.memory.acquire("l", 30))
        self.clock.advance(1.0)
        self.assertEqual(self.lost, ["the lease expired or was taken over"])
        self.assertFalse(lease.held)
        renewals = self.leases.renewals
        self.clock.advance(30)
        self.assertEqual((len(self.lost), self.leases.renewals), (1, renewals))

    def test_lost_when_unrenewable_until_expiry(self):
        """While renewals fail the lease stays held until ttl after the last renewal sent, then it is lost."""
        lease = self.acquire()
        self.clock.advance(1.0)  # renewed: valid until 4.0
        self.leases.down = True
        self.clock.advance(2.9)
        self.assertTrue(lease.held)
        self.assertEqual(self.lost, [])
        self.clock.advance(0.1)
        self.assertEqual(self.lost, ["it could not be renewed before it expired"])
        self.leases.down = False
        self.clock.advance(10)
        self.assertEqual(len(self.lost), 1)
        self.assertFalse(lease.held)

    def test_short_outage_survived(self):
        """Renewals that fail for less than the ttl are retried and the lease is kept."""
        lease = self.acquire()
        self.leases.down = True
        self.clock.advance(2.0)
        self.leases.down = False
        self.clock.advance(0.5)
        self.clock.advance(0.5)
        for _ in range(10):
            self.clock.advance(1.0)
        self.assertTrue(lease.held)
        self.assertEqual(self.lost, [])

    def test_release(self):
        """release drops the lease, stops renewing, and is no loss."""
        lease = self.acquire()
        self.assertTrue(self.successResultOf(lease.release()))
        self.assertIsNone(self.successResultOf(self.memory.holder("l")))
        renewals = self.leases.renewals
        self.clock.advance(30)
        self.assertEqual((self.lost, self.leases.renewals), ([], renewals))
        self.assertFalse(self.successResultOf(lease.release()))

    def test_release_while_down(self):
        """A release while Redis is down answers False and leaves the lease to expire."""
        lease = self.acquire()
        self.leases.down = True
        self.assertFalse(self.successResultOf(lease.release()))
        self.assertEqual(self.lost, [])


class LeaderElectionTests(SynchronousTestCase):
    """Exactly one campaigner leads; another takes over, with a larger token, when the leader goes."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.leases = OutageLeases(MemoryLeaseService(self.clock))
        self.events = []

    def election(self, who):
        election = LeaderElection(
            self.clock,
            self.leases,
            "gc",
            3.0,
            lambda token: self.events.append((who, "elected", token)),
            lambda reason: self.events.append((who, "deposed", reason)),
        )
        self.addCleanup(election.stop)
        return election

    def test_one_leader_then_takeover(self):
        """The first campaigner leads; when it stops, the second leads within the ttl, with a larger token."""
        a, b = self.election("a"), self.election("b")
        a.start()
        b.start()
        for _ in range(10):
            self.clock.advance(1.0)
        self.assertEqual(self.events, [("a", "elected", 1)])
        self.assertEqual((a.is_leader, b.is_leader, a.token, b.token), (True, False, 1, None))
        self.successResultOf(a.stop())
        self.clock.advance(1.0)
        self.assertEqual(self.events[1:], [("b", "elected", 2)])
        self.assertEqual(b.token, 2)

    def test_deposed_by_outage_then_reelected(self):
        """A leader whose lease lapses in an outage is deposed and, once it is over, elected again."""
        a = self.election("a")
        a.start()
        self.clock.advance(0)
        self.leases.down = True
        for _ in range(5):
            self.clock.advance(1.0)
        self.assertEqual(self.events, [("a", "elected", 1), ("a", "deposed", "it could not be renewed before it expired")])
        self.assertFalse(a.is_leader)
        self.leases.down = False
        for _ in range(3):
            self.clock.advance(1.0)
        self.assertEqual(self.events[2:], [("a", "elected", 2)])

    def test_stop_while_campaigning(self):
        """A stopped election never becomes leader."""
        a, b = self.election("a"), self.election("b")
        a.start()
        self.clock.advance(0)
        b.start()
        self.successResultOf(b.stop())
        self.successResultOf(a.stop())
        self.clock.advance(30)
        self.assertEqual(self.events, [("a", "elected", 1)])
