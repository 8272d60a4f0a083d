"""
Tests for difydaemon.coordination.debug_plugins: debug installations left
by a replica that died are removed by the survivors, and only then (in-memory
coordination on a fake clock).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.testing import MemoryReactorClock

from difydaemon import errors
from difydaemon.coordination import memory_coordination
from difydaemon.coordination.debug_plugins import (
    DebugInstallationSweeper,
    DebugInstallGuard,
    install_lock_name,
)
from difydaemon.coordination.membership import NODE_TTL
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.testing.cases import SynchronousTestCase
from tests.coordination.contract import node
from tests.runtimes.test_debug import TENANT as DEBUG_TENANT
from tests.runtimes.test_debug import DebugHarness

TENANT = "7b7a0f0c-0000-4000-8000-000000000001"
ECHO = "acme/echo:0.0.1@" + "a" * 64


class SweeperTests(SynchronousTestCase):
    """Survivors remove the debug installations no live replica has claimed for a ttl."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.clock.advance(1_700_000_000)
        self.coordination = memory_coordination(self.clock)
        self.persistence = MemoryPersistence(self.clock)
        self.guard = DebugInstallGuard(self.clock, self.coordination.leases, self.coordination.membership, "b")
        self.invalidated = []
        self.owned = set()
        self.sweeper = DebugInstallationSweeper(
            self.clock, self.persistence, self.guard, lambda *key: self.invalidated.append(key),
            lambda tenant_id, plugin_id: (tenant_id, plugin_id) in self.owned,
        )
        self.installation = self.install()

    def install(self, runtime_type="remote", plugin_id="acme/echo", identifier=ECHO):
        return self.successResultOf(self.persistence.install_plugin(
            TENANT, identifier, plugin_id, runtime_type, runtime_type, {}, {"tool": "echo"}
        ))

    def sweep(self) -> int:
        return self.successResultOfCoroutine(self.sweeper.sweep())

    def present(self) -> bool:
        return self.successResultOf(self.persistence.get_installation_by_id(TENANT, self.installation.id)) is not None

    def announce(self, node_id: str):
        membership = self.coordination.membership
        self.successResultOf(membership.announce(node(node_id), NODE_TTL))
        self.successResultOf(membership.claim_plugin(ECHO, node_id, NODE_TTL))

    def test_orphan_removed_after_grace(self):
        """An unclaimed debug installation is kept by the first sweep and removed by one a ttl later; caches are told."""
        self.assertEqual(self.sweep(), 0)
        self.assertTrue(self.present())
        self.clock.advance(NODE_TTL - 1)
        self.assertEqual(self.sweep(), 0)
        self.assertTrue(self.present())
        self.clock.advance(1)
        self.assertEqual(self.sweep(), 1)
        self.assertFalse(self.present())
        self.assertEqual(self.invalidated, [(TENANT, "acme/echo")])
        self.assertIsNone(self.successResultOf(self.persistence.get_plugin(ECHO)))

    def test_live_holder_kept(self):
        """An installation a live replica keeps claiming is never removed."""
        for _ in range(6):
            self.announce("a")
            self.assertEqual(self.sweep(), 0)
            self.clock.advance(NODE_TTL / 3)
        self.assertTrue(self.present())

    def test_dead_holder(self):
        """When its holder's membership expires, the installation goes a ttl after a sweep first finds it unclaimed."""
        self.announce("a")
        self.sweep()
        self.clock.advance(NODE_TTL)  # a's last heartbeat expires
        self.assertEqual(self.sweep(), 0)
        self.assertTrue(self.present())
        self.clock.advance(NODE_TTL)
        self.assertEqual(self.sweep(), 1)
        self.assertFalse(self.present())

    def test_claim_between_sweeps(self):
        """A plugin claimed again between two sweeps (it reconnected) is kept, and its grace starts over."""
        self.sweep()
        self.clock.advance(NODE_TTL)
        self.announce("c")
        self.assertEqual(self.sweep(), 0)
        self.clock.advance(NODE_TTL)  # c's claim expires
        self.assertEqual(self.sweep(), 0)
        self.assertTrue(self.present())
        self.clock.advance(NODE_TTL)
        self.assertEqual(self.sweep(), 1)

    def test_owned_here_kept(self):
        """An installation a connection of this replica owns is never removed, claimed or not."""
        self.owned.add((TENANT, "acme/echo"))
        self.sweep()
        self.clock.advance(NODE_TTL * 3)
        self.assertEqual(self.sweep(), 0)
        self.assertTrue(self.present())

    def test_being_written_kept(self):
        """While another replica holds the installation's lease (writing it), the sweep leaves it; afterwards it goes."""
        leases = self.coordination.leases
        self.sweep()
        self.clock.advance(NODE_TTL)
        token = self.successResultOf(leases.acquire(install_lock_name(TENANT, "acme/echo"), NODE_TTL))
        self.assertEqual(self.sweep(), 0)
        self.assertTrue(self.present())
        self.successResultOf(leases.release(install_lock_name(TENANT, "acme/echo"), token))
        self.assertEqual(self.sweep(), 1)
        # the sweeper let its own lease go
        self.assertIsNone(self.successResultOf(leases.holder(install_lock_name(TENANT, "acme/echo"))))

    def test_other_runtime_types_untouched(self):
        """Local installations are never the sweeper's business."""
        other = "acme/local:0.0.1@" + "b" * 64
        local = self.install(runtime_type="local", plugin_id="acme/local", identifier=other)
        self.sweep()
        self.clock.advance(NODE_TTL * 3)
        self.sweep()
        self.assertIsNotNone(self.successResultOf(self.persistence.get_installation_by_id(TENANT, local.id)))

    def test_runs_every_interval(self):
        """Started, the sweeper sweeps every interval; stopped, it stops."""
        self.sweeper.startService()
        self.clock.advance(NODE_TTL)
        self.assertTrue(self.present())
        self.clock.advance(NODE_TTL)
        self.assertFalse(self.present())
        self.sweeper.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_database_down_is_a_warning(self):
        """A sweep the database refuses is logged as a warning, and the next sweep tries again."""

        def down(runtime_type):
            raise errors.DatabaseUnavailableError("connection refused")

        list_them = self.persistence.list_installations_by_runtime_type
        self.persistence.list_installations_by_runtime_type = lambda t: maybeDeferred(down, t)
        self.sweeper.startService()
        self.clock.advance(NODE_TTL)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.persistence.list_installations_by_runtime_type = list_them
        self.clock.advance(NODE_TTL)
        self.clock.advance(NODE_TTL)
        self.assertFalse(self.present())
        self.sweeper.stopService()


class GuardTests(SynchronousTestCase):
    """The lease writers of a debug installation hold."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.coordination = memory_coordination(self.clock)
        self.guard = DebugInstallGuard(self.clock, self.coordination.leases, self.coordination.membership, "b",
                                       wait=1.0)

    def test_waits_then_refuses(self):
        """A held lease is waited for, then refused with a clear error."""
        name = install_lock_name(TENANT, "acme/echo")
        self.successResultOf(self.coordination.leases.acquire(name, 60))
        d = Deferred.fromCoroutine(self.guard.hold(TENANT, "acme/echo"))
        self.assertNoResult(d)
        self.clock.pump([0.05] * 25)
        failure = self.failureResultOf(d, errors.InternalServerError)
        self.assertIn("another replica", failure.value.message)

    def test_waits_for_release(self):
        """A lease released while waited for is taken."""
        name = install_lock_name(TENANT, "acme/echo")
        token = self.successResultOf(self.coordination.leases.acquire(name, 60))
        held = Deferred.fromCoroutine(self.guard.hold(TENANT, "acme/echo"))
        self.clock.advance(0.05)
        self.successResultOf(self.coordination.leases.release(name, token))
        self.clock.advance(0.05)
        lease = self.successResultOf(held)
        self.assertTrue(lease.held)
        self.successResultOf(lease.release())


class FencedInstallTests(SynchronousTestCase):
    """A debug plugin's installation is written under its lease and claimed before the lease goes."""

    def test_install_claims_under_lease(self):
        """After the handshake the identifier is claimed by this replica and the lease is free again."""
        harness = DebugHarness(self)
        coordination = memory_coordination(harness.clock)
        coordination.membership.announce(node("b"), 3600)
        harness.factory.guard = DebugInstallGuard(harness.clock, coordination.leases, coordination.membership, "b")
        harness.register()
        installation = harness.installation()
        self.assertEqual(installation.runtime_type, "remote")
        holders = self.successResultOf(coordination.membership.plugin_holders(installation.plugin_unique_identifier))
        self.assertEqual([n.node_id for n in holders], ["b"])
        self.assertIsNone(self.successResultOf(
            coordination.leases.holder(install_lock_name(installation.tenant_id, "acme/echo"))
        ))
        self.assertTrue(harness.factory.owns(installation.tenant_id, "acme/echo"))

    def test_install_refused_while_redis_down(self):
        """With Redis down a debug plugin is refused with 'redis unavailable' and nothing is installed."""
        harness = DebugHarness(self)
        coordination = memory_coordination(harness.clock)

        class Down:
            def acquire(self, name, ttl):
                return fail(errors.CoordinationUnavailableError("connection refused"))

        harness.factory.guard = DebugInstallGuard(harness.clock, Down(), coordination.membership, "b")
        protocol, transport = harness.register()
        self.assertIn(b"redis unavailable: connection refused", transport.value())
        self.assertIsNone(harness.installation())
        self.assertFalse(harness.factory.owns(DEBUG_TENANT, "acme/echo"))
