"""
The coordination contract (IKeyValueStore, IPubSub, ILeaseService,
IMembership), run against every implementation.

Each check is a coroutine wrapped by :func:`contract` into a test method
that hands it to ``self.run_check`` (as in tests/persistence/contract.py).
A concrete case provides ``self.coordination`` and ``self.other`` (a second
replica's view of the same shared state: another connection for Redis, the
same objects in memory), and two ways of letting time pass:
``await self.wait(seconds)`` and ``await self.delivered(deferred)``, which
waits for a message to arrive.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from difydaemon.coordination.nodes import NodeInfo
from difydaemon.interfaces import IKeyValueStore, ILeaseService, IMembership, IPubSub, ISubscription
from tests.persistence.contract import contract

ECHO = "acme/echo:0.0.1@" + "a" * 64
OTHER = "acme/other:1.0.0@" + "b" * 64


def node(node_id: str, port: int = 5002, heartbeat_at: float = 1.0) -> NodeInfo:
    """A node record on loopback."""
    return NodeInfo(node_id=node_id, host="127.0.0.1", port=port, started_at=0.5, heartbeat_at=heartbeat_at)


class Inbox:
    """Collects a subscription's messages; ``next()`` is a Deferred of the next one."""

    def __init__(self) -> None:
        self.messages: list = []
        self.missed = 0
        self._waiting: list[Deferred] = []

    def __call__(self, message) -> None:
        self.messages.append(message)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(message)

    def on_missed(self) -> None:
        self.missed += 1

    def next(self) -> Deferred:
        d = Deferred()
        self._waiting.append(d)
        return d


class KeyValueContract:
    """What every IKeyValueStore does."""

    @contract
    async def test_kv_provides(self):
        """The store provides IKeyValueStore."""
        self.assertTrue(verifyObject(IKeyValueStore, self.coordination.kv))

    @contract
    async def test_kv_round_trip(self):
        """A JSON value comes back as decoded JSON; absent keys give None."""
        kv = self.coordination.kv
        self.assertIsNone(await kv.get("missing"))
        value = {"text": "héllo", "n": 3, "f": 1.5, "list": [1, None, True], "nested": {"a": []}}
        self.assertIsNone(await kv.set("k", value))
        self.assertEqual(await kv.get("k"), value)
        await kv.set("k", ("a", "b"))
        self.assertEqual(await kv.get("k"), ["a", "b"])
        await kv.set("zero", 0)
        self.assertEqual(await kv.get("zero"), 0)
        self.assertEqual(await self.other.kv.get("k"), ["a", "b"])

    @contract
    async def test_kv_value_is_copied(self):
        """Changing a value after storing it, or after reading it, changes nothing stored."""
        kv = self.coordination.kv
        value = {"list": [1]}
        await kv.set("k", value)
        value["list"].append(2)
        read = await kv.get("k")
        read["list"].append(3)
        self.assertEqual(await kv.get("k"), {"list": [1]})

    @contract
    async def test_kv_refuses_bad_input(self):
        """Non-JSON values, empty keys and bad ttls are refused with ValueError and nothing is written."""
        kv = self.coordination.kv
        for call in (
            lambda: kv.set("k", {1, 2}),
            lambda: kv.set("k", object()),
            lambda: kv.set("k", {1: "non-string key"}),
            lambda: kv.set("", 1),
            lambda: kv.set(None, 1),
            lambda: kv.set("k", 1, ttl=0),
            lambda: kv.set("k", 1, ttl=-1),
            lambda: kv.set("k", 1, ttl=float("inf")),
            lambda: kv.set_if_absent("k", {1}),
            lambda: kv.touch("k", 0),
            lambda: kv.get(""),
        ):
            self.assertRaises(ValueError, call)
        self.assertIsNone(await kv.get("k"))

    @contract
    async def test_kv_ttl(self):
        """A value with a ttl is gone after it; one without stays; set without ttl clears an expiry."""
        kv = self.coordination.kv
        await kv.set("short", "v", ttl=0.2)
        await kv.set("long", "v")
        await kv.set("cleared", "v", ttl=0.2)
        await kv.set("cleared", "w")
        self.assertEqual(await kv.get("short"), "v")
        await self.wait(0.3)
        self.assertIsNone(await kv.get("short"))
        self.assertEqual(await kv.get("long"), "v")
        self.assertEqual(await kv.get("cleared"), "w")

    @contract
    async def test_kv_set_if_absent(self):
        """set_if_absent stores only into an absent or expired key, and says whether it did."""
        kv = self.coordination.kv
        self.assertTrue(await kv.set_if_absent("k", "first", ttl=0.2))
        self.assertFalse(await self.other.kv.set_if_absent("k", "second"))
        self.assertEqual(await kv.get("k"), "first")
        await self.wait(0.3)
        self.assertTrue(await self.other.kv.set_if_absent("k", "third"))
        self.assertEqual(await kv.get("k"), "third")

    @contract
    async def test_kv_delete_and_touch(self):
        """delete and touch say whether the key existed; touch moves the expiry."""
        kv = self.coordination.kv
        self.assertFalse(await kv.delete("k"))
        self.assertFalse(await kv.touch("k", 1))
        await kv.set("k", 1, ttl=0.2)
        self.assertTrue(await kv.touch("k", 60))
        await self.wait(0.3)
        self.assertEqual(await kv.get("k"), 1)
        self.assertTrue(await kv.delete("k"))
        self.assertIsNone(await kv.get("k"))


class PubSubContract:
    """What every IPubSub does."""

    @contract
    async def test_pubsub_provides(self):
        """The pub/sub provides IPubSub, and its subscriptions ISubscription."""
        self.assertTrue(verifyObject(IPubSub, self.coordination.pubsub))
        subscription = await self.coordination.pubsub.subscribe("c", Inbox())
        self.assertTrue(verifyObject(ISubscription, subscription))
        self.assertEqual(subscription.channel, "c")
        await subscription.unsubscribe()

    @contract
    async def test_pubsub_delivers_to_every_subscriber(self):
        """A message reaches every subscriber of its channel, on this and the other replica, decoded."""
        mine, theirs, elsewhere = Inbox(), Inbox(), Inbox()
        await self.coordination.pubsub.subscribe("invalidate", mine)
        await self.other.pubsub.subscribe("invalidate", theirs)
        await self.other.pubsub.subscribe("other-channel", elsewhere)
        got_mine, got_theirs = mine.next(), theirs.next()
        await self.coordination.pubsub.publish("invalidate", {"plugin": "acme/echo"})
        self.assertEqual(await self.delivered(got_mine), {"plugin": "acme/echo"})
        self.assertEqual(await self.delivered(got_theirs), {"plugin": "acme/echo"})
        # an unrelated message afterwards shows nothing else was delivered
        got = elsewhere.next()
        await self.coordination.pubsub.publish("other-channel", 2)
        self.assertEqual(await self.delivered(got), 2)
        self.assertEqual((mine.messages, theirs.messages, elsewhere.messages), ([{"plugin": "acme/echo"}], [{"plugin": "acme/echo"}], [2]))

    @contract
    async def test_pubsub_not_inside_publish(self):
        """Subscribers are called after publish returns, never inside it."""
        inbox = Inbox()
        await self.coordination.pubsub.subscribe("c", inbox)
        got = inbox.next()
        await self.coordination.pubsub.publish("c", 1)
        self.assertEqual(inbox.messages, [])
        self.assertEqual(await self.delivered(got), 1)

    @contract
    async def test_pubsub_unsubscribe(self):
        """After unsubscribe a subscription gets nothing; others on the channel still do; repeating is harmless."""
        gone, staying = Inbox(), Inbox()
        subscription = await self.coordination.pubsub.subscribe("c", gone)
        await self.coordination.pubsub.subscribe("c", staying)
        await subscription.unsubscribe()
        await subscription.unsubscribe()
        got = staying.next()
        await self.other.pubsub.publish("c", "after")
        self.assertEqual(await self.delivered(got), "after")
        self.assertEqual(gone.messages, [])

    @contract
    async def test_pubsub_failing_subscriber(self):
        """A subscriber that raises does not keep the message from the others."""

        def broken(message):
            raise RuntimeError("subscriber bug")

        inbox = Inbox()
        await self.coordination.pubsub.subscribe("c", broken)
        await self.coordination.pubsub.subscribe("c", inbox)
        got = inbox.next()
        await self.coordination.pubsub.publish("c", 1)
        self.assertEqual(await self.delivered(got), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @contract
    async def test_pubsub_refuses_bad_input(self):
        """Non-JSON messages and empty channels are refused with ValueError."""
        pubsub = self.coordination.pubsub
        self.assertRaises(ValueError, pubsub.publish, "c", {1})
        self.assertRaises(ValueError, pubsub.publish, "", 1)
        self.assertRaises(ValueError, pubsub.subscribe, "", Inbox())


class LeaseContract:
    """What every ILeaseService does."""

    @contract
    async def test_lease_provides(self):
        """The lease service provides ILeaseService."""
        self.assertTrue(verifyObject(ILeaseService, self.coordination.leases))

    @contract
    async def test_lease_is_exclusive(self):
        """While held, a lease cannot be acquired, from either replica; another name can."""
        leases = self.coordination.leases
        token = await leases.acquire("leader", 30)
        self.assertIsInstance(token, int)
        self.assertIsNone(await leases.acquire("leader", 30))
        self.assertIsNone(await self.other.leases.acquire("leader", 30))
        self.assertEqual(await self.other.leases.holder("leader"), token)
        self.assertIsInstance(await leases.acquire("another", 30), int)

    @contract
    async def test_lease_only_its_token_renews_and_releases(self):
        """renew and release succeed with the holding token only."""
        leases = self.coordination.leases
        token = await leases.acquire("l", 30)
        self.assertFalse(await leases.renew("l", token + 1, 30))
        self.assertFalse(await leases.release("l", token - 1))
        self.assertTrue(await self.other.leases.renew("l", token, 30))
        self.assertTrue(await leases.release("l", token))
        self.assertIsNone(await leases.holder("l"))
        self.assertFalse(await leases.release("l", token))
        self.assertFalse(await leases.renew("l", token, 30))

    @contract
    async def test_lease_expiry_and_fencing(self):
        """An unrenewed lease expires; the next holder's token is larger; the old token can no longer renew."""
        leases = self.coordination.leases
        first = await leases.acquire("l", 0.2)
        await self.wait(0.3)
        self.assertIsNone(await leases.holder("l"))
        second = await self.other.leases.acquire("l", 30)
        self.assertGreater(second, first)
        self.assertFalse(await leases.renew("l", first, 30))
        self.assertFalse(await leases.release("l", first))
        self.assertEqual(await leases.holder("l"), second)
        await self.other.leases.release("l", second)
        third = await leases.acquire("l", 30)
        self.assertGreater(third, second)

    @contract
    async def test_lease_renew_extends(self):
        """A renewed lease outlives its first ttl."""
        leases = self.coordination.leases
        token = await leases.acquire("l", 0.2)
        self.assertTrue(await leases.renew("l", token, 30))
        await self.wait(0.3)
        self.assertEqual(await leases.holder("l"), token)

    @contract
    async def test_lease_refuses_bad_input(self):
        """Empty names and bad ttls are refused with ValueError."""
        leases = self.coordination.leases
        self.assertRaises(ValueError, leases.acquire, "", 1)
        self.assertRaises(ValueError, leases.acquire, "l", 0)
        self.assertRaises(ValueError, leases.renew, "l", 1, float("nan"))
        self.assertIsNone(await leases.holder("l"))


class MembershipContract:
    """What every IMembership does."""

    @contract
    async def test_membership_provides(self):
        """The membership provides IMembership."""
        self.assertTrue(verifyObject(IMembership, self.coordination.membership))

    @contract
    async def test_membership_live_nodes(self):
        """Announced nodes are listed by node id, the latest announcement winning; a withdrawn one is not."""
        membership = self.coordination.membership
        self.assertEqual(await membership.live_nodes(), [])
        await membership.announce(node("b", 5003), 30)
        await self.other.membership.announce(node("a", 5002), 30)
        await membership.announce(node("c"), 30)
        await membership.announce(node("b", 5003, heartbeat_at=2.0), 30)
        await membership.withdraw("c")
        self.assertEqual(await self.other.membership.live_nodes(), [node("a", 5002), node("b", 5003, heartbeat_at=2.0)])

    @contract
    async def test_membership_node_expires(self):
        """A node that stops announcing is gone after its ttl, while one that keeps announcing stays."""
        membership = self.coordination.membership
        # ttls wide enough that a loaded machine cannot expire "alive"
        # between its two announcements
        await membership.announce(node("gone"), 1.0)
        await membership.announce(node("alive"), 1.0)
        await self.wait(0.1)
        await membership.announce(node("alive"), 30)
        await self.wait(1.2)
        self.assertEqual([n.node_id for n in await membership.live_nodes()], ["alive"])
        # it comes back when it announces itself again
        await membership.announce(node("gone"), 30)
        self.assertEqual([n.node_id for n in await membership.live_nodes()], ["alive", "gone"])

    @contract
    async def test_membership_plugin_holders(self):
        """Live nodes claiming a plugin are its holders; released or other-plugin claims are not."""
        membership, theirs = self.coordination.membership, self.other.membership
        await membership.announce(node("a"), 30)
        await theirs.announce(node("b", 5003), 30)
        self.assertEqual(await membership.plugin_holders(ECHO), [])
        await membership.claim_plugin(ECHO, "a", 30)
        await theirs.claim_plugin(ECHO, "b", 30)
        await theirs.claim_plugin(OTHER, "b", 30)
        self.assertEqual(await theirs.plugin_holders(ECHO), [node("a"), node("b", 5003)])
        await membership.release_plugin(ECHO, "a")
        self.assertEqual(await membership.plugin_holders(ECHO), [node("b", 5003)])
        self.assertEqual(await membership.plugin_holders(OTHER), [node("b", 5003)])

    @contract
    async def test_membership_holder_must_be_live(self):
        """A claim expires with its ttl, and a claim of a node whose announcement expired or was withdrawn does not count."""
        membership = self.coordination.membership
        await membership.announce(node("a"), 0.2)
        await membership.announce(node("b"), 30)
        await membership.announce(node("c"), 30)
        await membership.claim_plugin(ECHO, "a", 30)
        await membership.claim_plugin(ECHO, "b", 0.2)
        await membership.claim_plugin(ECHO, "c", 30)
        await membership.claim_plugin(ECHO, "never-announced", 30)
        await membership.withdraw("c")
        self.assertEqual([n.node_id for n in await membership.plugin_holders(ECHO)], ["a", "b"])
        await self.wait(0.3)
        self.assertEqual(await membership.plugin_holders(ECHO), [])
        # a node that announces itself again is a holder again while its claim lives
        await membership.announce(node("a"), 30)
        self.assertEqual([n.node_id for n in await membership.plugin_holders(ECHO)], ["a"])

    @contract
    async def test_membership_refuses_bad_input(self):
        """Empty identifiers and node ids and bad ttls are refused with ValueError."""
        membership = self.coordination.membership
        self.assertRaises(ValueError, membership.announce, node(""), 1)
        self.assertRaises(ValueError, membership.announce, node("a"), 0)
        self.assertRaises(ValueError, membership.claim_plugin, "", "a", 1)
        self.assertRaises(ValueError, membership.claim_plugin, ECHO, "", 1)
        self.assertRaises(ValueError, membership.plugin_holders, "")
        self.assertEqual(await membership.live_nodes(), [])


class CoordinationContract(KeyValueContract, PubSubContract, LeaseContract, MembershipContract):
    """The whole coordination contract."""

    #: set by the concrete case: this replica's Coordination
    coordination = None
    #: set by the concrete case: another replica's view of the same state
    other = None
