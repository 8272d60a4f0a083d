"""Replicas on a fake clock sharing in-memory coordination, as replicas share Redis."""

from __future__ import annotations

from twisted.internet.defer import fail, succeed
from twisted.internet.testing import MemoryReactorClock

from difydaemon.coordination import Coordination
from difydaemon.coordination.memory import MemoryKeyValueStore, MemoryLeaseService, MemoryMembership, MemoryPubSub
from difydaemon.coordination.membership import NODE_TTL
from difydaemon.coordination.replica import CacheInvalidation, Replica
from difydaemon.errors import CoordinationUnavailableError
from difydaemon.management.debugging import DebuggingKeys
from difydaemon.management.installations import InstallationCache
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.runtimes.registry import RuntimeRegistry
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.launchers import FakeRuntimeFactory
from difydaemon.testing.runtimes import FakeRuntime
from tests.coordination.contract import node

ECHO = "acme/echo:0.0.1@" + "a" * 64
TENANT = "0193a8a4-0000-7000-8000-000000000001"


class MissablePubSub:
    """A MemoryPubSub whose subscriptions the test can cut (``missed()``) or refuse (``down``)."""

    def __init__(self, pubsub) -> None:
        self._pubsub = pubsub
        self.on_missed = []
        self.down = False

    def publish(self, channel, message):
        if self.down:
            return fail(CoordinationUnavailableError("connection lost: test outage"))
        return self._pubsub.publish(channel, message)

    def subscribe(self, channel, on_message, on_missed=None):
        if self.down:
            return fail(CoordinationUnavailableError("connection lost: test outage"))
        if on_missed is not None:
            self.on_missed.append(on_missed)
        return self._pubsub.subscribe(channel, on_message, on_missed)

    def missed(self) -> None:
        for on_missed in self.on_missed:
            on_missed()


class Cluster:
    """What several replicas share (Redis, the database), and one replica per node id."""

    def __init__(self, test) -> None:
        self.test = test
        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.memory_pubsub = MemoryPubSub(self.clock)
        self.membership = MemoryMembership(self.clock)
        self.leases = MemoryLeaseService(self.clock)
        self.kv = MemoryKeyValueStore(self.clock)
        self.persistence = MemoryPersistence(self.clock)
        self.installed: list[str] = []

    def replica(self, node_id: str, restore_idle: bool = False):
        """A replica with its own pub/sub connection, registry and caches (``restore_idle``: idle stop on)."""
        pubsub = MissablePubSub(self.memory_pubsub)
        coordination = Coordination(kv=self.kv, pubsub=pubsub, leases=self.leases, membership=self.membership,
                                    uses_redis=True)
        factory = FakeRuntimeFactory()
        registry = RuntimeRegistry(self.clock, factory, restore_idle=restore_idle)
        caches = CacheInvalidation(pubsub, node_id)
        installations = InstallationCache(self.clock, self.persistence)
        caches.register("installations", installations)
        installations.on_invalidate = lambda t, p: caches.invalidated("installations", t, p)
        replica = Replica(self.clock, coordination, node(node_id), registry,
                          installed=lambda: succeed(list(self.installed)), caches=caches, reconcile_interval=30.0)
        replica.factory = factory
        replica.pubsub = pubsub
        replica.installations = installations
        return replica


class ReplicaTests(SynchronousTestCase):
    """What one replica does is heard by the others."""

    def setUp(self):
        super().setUp()
        self.cluster = Cluster(self)
        self.a = self.cluster.replica("a")
        self.b = self.cluster.replica("b")
        self.a.start()
        self.b.start()
        self.addCleanup(lambda: (self.a.stop(), self.b.stop()))

    def deliver(self):
        self.cluster.clock.advance(0)

    def test_install_elsewhere_starts_the_plugin_here(self):
        """A's install message makes B start the plugin from storage; A does not start it twice."""
        self.successResultOf(self.a.plugin_installed(ECHO))
        self.deliver()
        self.assertEqual(self.b.factory.attempts, [(ECHO, "installed")])
        self.assertEqual(self.a.factory.attempts, [])

    def test_uninstall_elsewhere_stops_the_plugin_here(self):
        """A's uninstall message stops B's runtime and discards its files."""
        self.successResultOf(self.a.plugin_installed(ECHO))
        self.deliver()
        runtime = self.b.factory.succeed(ECHO, FakeRuntime(self.cluster.clock, ECHO))
        self.successResultOf(self.a.plugin_retired(ECHO))
        self.deliver()
        self.assertTrue(runtime.stopped)
        self.assertIsNone(self.b._registry.get(ECHO))
        self.assertEqual(self.b.factory.discarded, [ECHO])

    def test_missed_messages_reconcile_with_the_database(self):
        """After missed messages B starts what is installed and, seen absent twice, stops what is not."""
        stale = "acme/old:0.0.1@" + "b" * 64
        self.b._registry.prepare(stale)
        self.b.factory.succeed(stale, FakeRuntime(self.cluster.clock, stale))
        self.cluster.installed = [ECHO]
        self.b.pubsub.missed()
        self.assertIn((ECHO, "installed"), self.b.factory.attempts)
        self.assertIsNotNone(self.b._registry.get(stale))
        self.b.pubsub.missed()
        self.assertIsNone(self.b._registry.get(stale))
        self.assertEqual(self.b.factory.count(ECHO), 1)

    def test_periodic_reconciliation(self):
        """Without any message, a plugin installed meanwhile is started by the next reconciliation."""
        self.cluster.installed = [ECHO]
        self.cluster.clock.advance(30)
        self.assertEqual(self.b.factory.attempts, [(ECHO, "installed")])

    def test_installation_cache_invalidated_everywhere(self):
        """An installation A invalidates is read again by B at its next lookup, without waiting for the TTL."""
        self.successResultOf(self.b.installations.get(TENANT, "acme/echo"))
        self.successResultOf(self.cluster.persistence.install_plugin(
            TENANT, ECHO, "acme/echo", "local", "package", {}, {}))
        self.assertIsNone(self.successResultOf(self.b.installations.get(TENANT, "acme/echo")))
        self.a.installations.invalidate(TENANT, "acme/echo")
        self.deliver()
        self.assertEqual(self.successResultOf(self.b.installations.get(TENANT, "acme/echo")).plugin_unique_identifier,
                         ECHO)

    def test_missed_invalidations_clear_the_cache(self):
        """A subscription cut off drops every cached installation."""
        self.successResultOf(self.b.installations.get(TENANT, "acme/echo"))
        self.successResultOf(self.cluster.persistence.install_plugin(
            TENANT, ECHO, "acme/echo", "local", "package", {}, {}))
        self.b.pubsub.missed()
        self.assertIsNotNone(self.successResultOf(self.b.installations.get(TENANT, "acme/echo")))

    def test_own_messages_ignored(self):
        """A replica's own invalidation does not come back as a remote one, nor its install as one to start."""
        self.successResultOf(self.a.plugin_installed(ECHO))
        self.a.installations.invalidate(TENANT, "acme/echo")
        self.deliver()
        self.assertEqual(self.a.factory.attempts, [])

    def test_debug_plugin_claimed_while_connected(self):
        """A debug runtime registered on A makes B see A as its holder; unregistered, A is no holder."""
        runtime = FakeRuntime(self.cluster.clock, ECHO)
        self.a._registry.register(runtime)
        holders = self.successResultOf(self.b.holders(ECHO))
        self.assertEqual([n.node_id for n in holders], ["a"])
        self.assertEqual(self.successResultOf(self.a.holders(ECHO)), [])
        self.a._registry.unregister(runtime)
        self.assertEqual(self.successResultOf(self.b.holders(ECHO)), [])

    def test_claim_of_a_dead_node_expires(self):
        """A replica that stops beating (killed) is no holder once its ttl has passed."""
        self.a._registry.register(FakeRuntime(self.cluster.clock, ECHO))
        self.a.presence._loop.stop()
        self.cluster.clock.advance(NODE_TTL + 1)
        self.assertEqual(self.successResultOf(self.b.holders(ECHO)), [])

    def test_stop_withdraws(self):
        """A stopped replica is gone from the live nodes at once, with its claims."""
        self.a._registry.register(FakeRuntime(self.cluster.clock, ECHO))
        self.successResultOf(self.a.stop())
        live = self.successResultOf(self.cluster.membership.live_nodes())
        self.assertEqual([n.node_id for n in live], ["b"])
        self.assertEqual(self.successResultOf(self.b.holders(ECHO)), [])


class IdleStopReplicaTests(SynchronousTestCase):
    """With PLUGIN_IDLE_TIMEOUT, news of an install elsewhere and a reconciliation build the plugin here but launch nothing."""

    def setUp(self):
        super().setUp()
        self.cluster = Cluster(self)
        self.a = self.cluster.replica("a", restore_idle=True)
        self.b = self.cluster.replica("b", restore_idle=True)
        self.a.start()
        self.b.start()
        self.addCleanup(lambda: (self.a.stop(), self.b.stop()))

    def test_install_elsewhere_builds_without_launching(self):
        """A's install (or the new version of an upgrade) is built on B and left idle; B's first call launches it."""
        self.successResultOf(self.a.plugin_installed(ECHO))
        self.cluster.clock.advance(0)
        self.assertEqual(self.b.factory.attempts, [(ECHO, "build")])
        self.b.factory.succeed(ECHO, None)
        self.assertEqual(self.b._registry.status(ECHO).state, "idle")
        self.assertIsNone(self.b._registry.get(ECHO))
        waiting = self.b._registry.when_ready(ECHO, 120)
        runtime = self.b.factory.succeed(ECHO, FakeRuntime(self.cluster.clock, ECHO))
        self.assertIs(self.successResultOf(waiting), runtime)
        self.assertEqual(self.b.factory.attempts, [(ECHO, "build"), (ECHO, "installed")])

    def test_reconciliation_builds_without_launching(self):
        """A plugin a periodic reconciliation finds missing is built and left idle, not launched."""
        self.cluster.installed = [ECHO]
        self.cluster.clock.advance(30)
        self.assertEqual(self.b.factory.attempts, [(ECHO, "build")])
        self.b.factory.succeed(ECHO, None)
        self.cluster.clock.advance(30)
        self.assertEqual(self.b.factory.attempts, [(ECHO, "build")])
        self.assertEqual(self.b._registry.status(ECHO).state, "idle")


class ReplicaOutageTests(SynchronousTestCase):
    """Redis down at start: the replica serves, subscribes when it is back, and catches up."""

    def test_subscribes_when_redis_is_back(self):
        """Subscriptions refused at start are retried; once made, the replica reconciles and hears installs."""
        cluster = Cluster(self)
        b = cluster.replica("b")
        b.pubsub.down = True
        b.start()
        self.addCleanup(b.stop)
        cluster.installed = [ECHO]
        cluster.clock.advance(2)
        self.assertEqual(b.factory.attempts, [])
        b.pubsub.down = False
        cluster.clock.advance(2)
        self.assertEqual(b.factory.attempts, [(ECHO, "installed")])
        a = cluster.replica("a")
        other = "acme/other:0.0.1@" + "c" * 64
        self.successResultOf(a.plugin_installed(other))
        cluster.clock.advance(0)
        self.assertIn((other, "installed"), b.factory.attempts)

    def test_publish_while_down_does_not_fail(self):
        """An install message Redis refuses is logged; the caller's Deferred succeeds."""
        cluster = Cluster(self)
        a = cluster.replica("a")
        a.pubsub.down = True
        self.assertIsNone(self.successResultOf(a.plugin_installed(ECHO)))
        self.assertIsNone(self.successResultOf(a.caches.invalidated("installations", TENANT, "x")))


class DebuggingKeyInvalidationTests(SynchronousTestCase):
    """A tenant's debugging key made or extended on one replica is read again by the others."""

    def test_key_forgotten_elsewhere(self):
        """B forgets what it knew of a tenant's key when A extends it, and drops every key on missed messages."""
        cluster = Cluster(self)
        pubsub_a = MissablePubSub(cluster.memory_pubsub)
        pubsub_b = MissablePubSub(cluster.memory_pubsub)
        keys_a = DebuggingKeys(cluster.clock, cluster.persistence)
        keys_b = DebuggingKeys(cluster.clock, cluster.persistence)
        caches_a = CacheInvalidation(pubsub_a, "a")
        caches_b = CacheInvalidation(pubsub_b, "b")
        caches_b.register("debugging_keys", keys_b)
        keys_a.on_invalidate = lambda tenant: caches_a.invalidated("debugging_keys", tenant)
        self.successResultOf(pubsub_b.subscribe("caches", caches_b.message, caches_b.missed))
        key = self.successResultOf(keys_b.key_for(TENANT))
        self.assertIn(key, keys_b._known)
        self.successResultOf(keys_a.key_for(TENANT))
        cluster.clock.advance(0)
        self.assertNotIn(key, keys_b._known)
        self.assertEqual(self.successResultOf(keys_b.tenant_of(key)), TENANT)
        pubsub_b.missed()
        self.assertEqual(keys_b._known, {})
