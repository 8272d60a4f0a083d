"""Install tasks held under leases by the replica running them, and what the cluster is told."""

from __future__ import annotations

from twisted.internet.defer import Deferred

from difydaemon.coordination.memory import MemoryLeaseService
from difydaemon.coordination.tasks import TASK_LEASE_TTL, TaskLeases, task_lease_name
from difydaemon.management.installer import ORPHANED_MESSAGE, SHUTDOWN_MESSAGE, Installer
from difydaemon.persistence.records import TASK_FAILED, TASK_RUNNING, TASK_SUCCESS
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.launchers import RecordingLauncher
from difydaemon.testing.packages import build_package, echo_plugin_files

from tests.coordination.test_membership import OutageMembership as PartitionedLeases

from .harness import TENANT, DaemonHarness, error_of


class RecordingCluster:
    """Records what the installer tells the other replicas."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def plugin_installed(self, identifier):
        self.events.append(("installed", identifier))

    def plugin_retired(self, identifier):
        self.events.append(("retired", identifier))


class TaskLeaseTests(SynchronousTestCase):
    """Two replicas (A, B) share the database and the leases; A runs the install."""

    def setUp(self):
        super().setUp()
        self.cluster = RecordingCluster()
        self.a = DaemonHarness(self, cluster=self.cluster)
        # on the harness's clock, which it makes itself
        self.shared = MemoryLeaseService(self.a.clock)
        self.leases_a = PartitionedLeases(self.shared)
        self.a.installer._task_leases = TaskLeases(self.a.clock, self.leases_a)
        self.b = Installer(self.a.clock, self.a.persistence, self.a.storage, self.a.packages, RecordingLauncher(),
                           task_leases=TaskLeases(self.a.clock, self.shared))
        self.ident = self.a.upload(build_package(echo_plugin_files()))["data"]["unique_identifier"]

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds)):
            self.a.clock.advance(1)

    def task(self, task_id):
        return self.a.ok("GET", f"/plugin/{TENANT}/management/install/tasks/{task_id}")

    def holder(self, task_id):
        return self.successResultOf(self.shared.holder(task_lease_name(task_id)))

    def start_held_install(self):
        self.a.launcher.hold_all = True
        return self.a.install(self.ident)["task_id"]

    def test_running_task_holds_its_lease_until_it_ends(self):
        """A running task's lease is held and renewed past its ttl; the task's success releases it."""
        task_id = self.start_held_install()
        self.advance(TASK_LEASE_TTL * 3)
        self.assertIsNotNone(self.holder(task_id))
        self.a.launcher.release(self.ident)
        self.assertEqual(self.task(task_id)["status"], TASK_SUCCESS)
        self.assertIsNone(self.holder(task_id))

    def test_start_of_another_replica_spares_a_live_task(self):
        """B starting (or sweeping) leaves A's running task alone: its lease is held."""
        task_id = self.start_held_install()
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(self.b.fail_unfinished_tasks(SHUTDOWN_MESSAGE))), 0)
        self.assertEqual(self.task(task_id)["status"], TASK_RUNNING)

    def test_task_of_a_partitioned_replica_is_failed_by_the_survivor(self):
        """A cut off from Redis loses the lease after its ttl, stops the job and writes nothing; B's sweep fails the task."""
        task_id = self.start_held_install()
        self.b.start_sweeping(TASK_LEASE_TTL)
        self.addCleanup(self.b.stop_sweeping)
        self.leases_a.down = True
        self.advance(TASK_LEASE_TTL * 2)
        self.assertIn(task_id, self.a.installer._lost)
        task = self.task(task_id)
        self.assertEqual((task["status"], task["plugins"][0]["message"]), (TASK_FAILED, ORPHANED_MESSAGE))
        # the fenced holder's late launch success changes nothing
        self.a.launcher.release(self.ident)
        self.assertEqual(self.task(task_id)["plugins"][0]["message"], ORPHANED_MESSAGE)

    def test_install_refused_while_redis_is_down(self):
        """No lease, no task: the install answers "redis unavailable" and writes no task and no installation."""
        self.leases_a.down = True
        env = self.a.call(
            "POST", f"/plugin/{TENANT}/management/install/identifiers",
            json={"plugin_unique_identifiers": [self.ident], "source": "package", "metas": [{}]},
        )
        self.assertEqual(env["code"], -500)
        self.assertIn("redis unavailable", error_of(env)["message"])
        tasks = self.successResultOf(self.a.persistence.list_tasks_by_status([TASK_RUNNING]))
        self.assertEqual(tasks, [])
        self.assertEqual(self.a.launcher.launched, [])

    def test_stop_fails_only_this_replicas_tasks(self):
        """A stopping fails its own running task, not B's."""
        task_a = self.start_held_install()
        other = build_package(echo_plugin_files(name="other"))
        ident_b = self.a.upload(other)["data"]["unique_identifier"]
        self.b._launcher.hold_all = True
        task_b = self.successResultOf(Deferred.fromCoroutine(
            self.b.install_from_identifiers(TENANT, [ident_b], "package", [{}])))["task_id"]
        self.successResultOf(Deferred.fromCoroutine(self.a.installer.stop()))
        self.assertEqual(self.task(task_a)["status"], TASK_FAILED)
        self.assertEqual(self.task(task_b)["status"], TASK_RUNNING)
        self.assertIsNone(self.holder(task_a))

    def test_cluster_told_of_install_and_uninstall(self):
        """The other replicas are told once the install's rows are written, and when the last uninstall retires it."""
        self.a.install(self.ident)
        self.assertEqual(self.cluster.events, [("installed", self.ident)])
        installation = self.a.ok("GET", f"/plugin/{TENANT}/management/list",
                                 params={"page": 1, "page_size": 10})["list"][0]
        self.a.ok("POST", f"/plugin/{TENANT}/management/uninstall", json={"plugin_installation_id": installation["id"]})
        self.assertEqual(self.cluster.events, [("installed", self.ident), ("retired", self.ident)])
