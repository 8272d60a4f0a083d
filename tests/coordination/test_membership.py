"""NodePresence on a fake clock, over the in-memory membership."""

from __future__ import annotations

from twisted.internet.defer import fail
from twisted.internet.testing import MemoryReactorClock

from difydaemon.coordination.memory import MemoryMembership
from difydaemon.coordination.membership import NODE_TTL, NodePresence
from difydaemon.errors import CoordinationUnavailableError
from difydaemon.testing.cases import SynchronousTestCase
from tests.coordination.contract import ECHO, node


class OutageMembership:
    """A membership (or any coordination service) whose calls fail with the redis-unavailable error while ``down``."""

    def __init__(self, membership) -> None:
        self._membership = membership
        self.down = False

    def __getattr__(self, name):
        method = getattr(self._membership, name)

        def call(*args):
            if self.down:
                return fail(CoordinationUnavailableError("connection lost: test outage"))
            return method(*args)

        return call


class NodePresenceTests(SynchronousTestCase):
    """A node stays listed while its heartbeat runs, and is gone after its ttl when it stops."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.memory = MemoryMembership(self.clock)
        self.membership = OutageMembership(self.memory)
        self.presence = NodePresence(self.clock, self.membership, node("n1"))

    def live(self):
        return [n.node_id for n in self.successResultOf(self.memory.live_nodes())]

    def holders(self):
        return [n.node_id for n in self.successResultOf(self.memory.plugin_holders(ECHO))]

    def test_heartbeat_keeps_node_and_claims(self):
        """Announced at start and every ttl / 3, the node and its claims outlive many ttls, with a fresh heartbeat stamp."""
        self.presence.start()
        self.assertEqual(self.live(), ["n1"])
        self.successResultOf(self.presence.claim(ECHO))
        for _ in range(30):
            self.clock.advance(NODE_TTL / 3)
        self.assertEqual((self.live(), self.holders()), (["n1"], ["n1"]))
        self.assertEqual(self.successResultOf(self.memory.live_nodes())[0].heartbeat_at, 1000 + 10 * NODE_TTL)

    def test_gone_after_ttl_without_heartbeat(self):
        """A node whose heartbeat stopped without leaving (a crash) is gone after its ttl, its claims with it."""
        self.presence.start()
        self.successResultOf(self.presence.claim(ECHO))
        self.presence._loop.stop()
        self.clock.advance(NODE_TTL - 0.001)
        self.assertEqual(self.live(), ["n1"])
        self.clock.advance(0.001)
        self.assertEqual((self.live(), self.holders()), ([], []))

    def test_stop_leaves_at_once(self):
        """stop drops the claims and withdraws the node at once."""
        self.presence.start()
        self.successResultOf(self.presence.claim(ECHO))
        self.successResultOf(self.presence.stop())
        self.assertEqual((self.live(), self.holders()), ([], []))
        self.clock.advance(NODE_TTL)
        self.assertEqual(self.live(), [])

    def test_unclaim(self):
        """unclaim drops the claim at once and it is not written again."""
        self.presence.start()
        self.successResultOf(self.presence.claim(ECHO))
        self.successResultOf(self.presence.unclaim(ECHO))
        self.clock.advance(NODE_TTL)
        self.assertEqual((self.holders(), self.presence.claims), ([], frozenset()))

    def test_heartbeat_survives_outage(self):
        """Failed heartbeats are logged and the next ones go on; a claim made during the outage is written once it is over."""
        self.presence.start()
        self.membership.down = True
        self.failureResultOf(self.presence.claim(ECHO), CoordinationUnavailableError)
        self.clock.advance(NODE_TTL)
        self.assertEqual(self.live(), [])
        self.membership.down = False
        self.clock.advance(NODE_TTL / 3)
        self.assertEqual((self.live(), self.holders()), (["n1"], ["n1"]))

    def test_stop_while_down(self):
        """A stop while Redis is down completes; the entries then expire by themselves."""
        self.presence.start()
        self.membership.down = True
        self.successResultOf(self.presence.stop())
        self.assertEqual(self.live(), ["n1"])
        self.clock.advance(NODE_TTL)
        self.assertEqual(self.live(), [])
