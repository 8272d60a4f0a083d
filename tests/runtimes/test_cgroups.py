"""
Tests for difydaemon.runtimes.cgroups: the cgroup v2 form of a plugin's
memory limit, against a fake cgroupfs in a temporary directory (this host
has cgroup v1), the real launcher joining a cgroup, and a LocalRuntime
whose instances get one.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys

from twisted.logger import LogLevel, globalLogPublisher

from difydaemon.runtimes.cgroups import Detection, MemoryCgroups, PluginCgroup, detect_memory_cgroups, memory_enforcement
from difydaemon.runtimes.local import CGROUP_REMOVE_DELAY, LivenessPolicy
from difydaemon.runtimes.parent_death import ParentDeathSignal, child_argv
from difydaemon.testing.cases import SynchronousTestCase
from tests.runtimes.listeners import RecordingListener
from tests.runtimes.test_local import LocalRuntimeTestsMixin, request
from tests.runtimes.test_memory import KILLED, LIMIT

OWN = "system.slice/difydaemon.service"


def _write(path, text):
    with open(path, "w") as file:
        file.write(text)


def _read(path):
    with open(path) as file:
        return file.read()


class FakeCgroupfs:
    """A cgroup v2 tree in a directory: the root, the daemon's cgroup, and /proc/self/cgroup."""

    def __init__(self, test, controllers="cpu io memory pids", enabled=""):
        self.root = os.path.abspath(test.mktemp())
        self.own = os.path.join(self.root, OWN)
        os.makedirs(self.own)
        _write(os.path.join(self.root, "cgroup.controllers"), "cpuset cpu io memory hugetlb pids rdma misc\n")
        _write(os.path.join(self.own, "cgroup.controllers"), controllers + "\n")
        _write(os.path.join(self.own, "cgroup.subtree_control"), enabled)
        self.self_cgroup = os.path.join(self.root, "self-cgroup")
        _write(self.self_cgroup, f"0::/{OWN}\n")

    def detect(self):
        return detect_memory_cgroups(self.root, self.self_cgroup, getpid=lambda: 4242)


def _fake_rmdir(path):
    """A cgroupfs directory's files vanish with it; a temporary directory's must be removed."""
    shutil.rmtree(path)


class DetectionTests(SynchronousTestCase):
    """Whether the daemon may give plugin processes memory cgroups, and why not."""

    def test_delegated_cgroup_is_used(self):
        """A cgroup v2 cgroup with the memory controller: it is enabled for sub-cgroups and used."""
        fs = FakeCgroupfs(self)
        found = fs.detect()
        self.assertIsNone(found.reason)
        self.assertEqual((found.cgroups.base, found.cgroups.prefix), (fs.own, "difydaemon-4242-"))
        self.assertEqual(_read(os.path.join(fs.own, "cgroup.subtree_control")), "+memory")

    def test_enabled_controller_is_left_alone(self):
        """A memory controller already enabled for sub-cgroups is not written again."""
        fs = FakeCgroupfs(self, enabled="memory pids\n")
        self.assertIsNotNone(fs.detect().cgroups)
        self.assertEqual(_read(os.path.join(fs.own, "cgroup.subtree_control")), "memory pids\n")

    def test_cgroup_v1(self):
        """A daemon in cgroup v1 hierarchies only (this host) gets none, and is told so."""
        fs = FakeCgroupfs(self)
        _write(fs.self_cgroup, "12:memory:/user.slice\n1:name=systemd:/user.slice\n")
        self.assertEqual(fs.detect(), Detection(None, "the daemon is in no cgroup v2 hierarchy (cgroup v1)"))

    def test_not_mounted(self):
        """A cgroup v2 line with no cgroup2 mounted at the root gets none."""
        fs = FakeCgroupfs(self)
        os.remove(os.path.join(fs.root, "cgroup.controllers"))
        found = fs.detect()
        self.assertIsNone(found.cgroups)
        self.assertIn("no cgroup v2 hierarchy is mounted", found.reason)

    def test_memory_not_delegated(self):
        """Without the memory controller in the daemon's cgroup there is none."""
        found = FakeCgroupfs(self, controllers="cpu pids").detect()
        self.assertIsNone(found.cgroups)
        self.assertIn("memory controller is not delegated", found.reason)

    def test_enabling_refused(self):
        """A subtree_control that cannot be written (EBUSY: the daemon's own cgroup holds it) gets none."""
        fs = FakeCgroupfs(self)
        subtree = os.path.join(fs.own, "cgroup.subtree_control")
        os.remove(subtree)
        os.mkdir(subtree)
        found = fs.detect()
        self.assertIsNone(found.cgroups)
        self.assertIn("cannot enable the memory controller", found.reason)

    def test_unreadable_self_cgroup(self):
        """No /proc/self/cgroup: none, never an exception."""
        found = detect_memory_cgroups(self.mktemp(), os.path.abspath(self.mktemp()))
        self.assertIsNone(found.cgroups)
        self.assertIn("cannot read", found.reason)

    def test_mechanism_logged_once(self):
        """memory_enforcement logs which mechanism is used, and why not cgroups; nothing without the launcher."""
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        cgroups = MemoryCgroups("/sys/fs/cgroup/x")
        self.assertIs(memory_enforcement(True, lambda: Detection(cgroups, None)), cgroups)
        self.assertIsNone(memory_enforcement(True, lambda: Detection(None, "cgroup v1")))
        self.assertIsNone(memory_enforcement(False, lambda: self.fail("detected without a launcher")))
        said = [e for e in logged if "plugin memory limits" in e.get("log_format", "")]
        self.assertEqual([e.get("base") or e.get("reason") for e in said], ["/sys/fs/cgroup/x", "cgroup v1"])


class PluginCgroupTests(SynchronousTestCase):
    """One plugin process's cgroup: made with its limit, read for OOM kills, removed."""

    def setUp(self):
        super().setUp()
        self.fs = FakeCgroupfs(self, enabled="memory")
        self.cgroups = MemoryCgroups(self.fs.own, prefix="difydaemon-7-", rmdir=_fake_rmdir)

    def test_created_with_the_limit_and_no_swap(self):
        """Each cgroup is new, with memory.max the limit and memory.swap.max 0."""
        first, second = self.cgroups.create(LIMIT), self.cgroups.create(LIMIT)
        self.assertEqual(first.path, os.path.join(self.fs.own, "difydaemon-7-0"))
        self.assertEqual(second.path, os.path.join(self.fs.own, "difydaemon-7-1"))
        self.assertEqual(_read(os.path.join(first.path, "memory.max")), str(LIMIT))
        self.assertEqual(_read(os.path.join(first.path, "memory.swap.max")), "0")

    def test_leftover_name_skipped(self):
        """A cgroup left by an earlier daemon of the same pid is not reused."""
        os.mkdir(os.path.join(self.fs.own, "difydaemon-7-0"))
        self.assertEqual(self.cgroups.create(LIMIT).path, os.path.join(self.fs.own, "difydaemon-7-1"))

    def test_oom_kill_read_from_memory_events(self):
        """oom_kill above 0 in memory.events is a kill for memory; 0 or no file is not."""
        cgroup = self.cgroups.create(LIMIT)
        events = os.path.join(cgroup.path, "memory.events")
        self.assertFalse(cgroup.oom_killed())
        _write(events, "low 0\nhigh 0\nmax 12\noom 1\noom_kill 0\n")
        self.assertFalse(cgroup.oom_killed())
        _write(events, "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n")
        self.assertTrue(cgroup.oom_killed())

    def test_removed(self):
        """remove() deletes the cgroup; one already gone counts as removed."""
        cgroup = self.cgroups.create(LIMIT)
        self.assertTrue(cgroup.remove())
        self.assertFalse(os.path.exists(cgroup.path))
        self.assertTrue(cgroup.remove())

    def test_busy_cgroup_has_its_processes_killed(self):
        """A cgroup still holding processes is not removed: they are killed through cgroup.kill."""

        def busy(path):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

        path = os.path.join(self.fs.own, "busy")
        os.mkdir(path)
        _write(os.path.join(path, "cgroup.kill"), "")
        self.assertFalse(PluginCgroup(path, busy).remove())
        self.assertEqual(_read(os.path.join(path, "cgroup.kill")), "1")


class LauncherCgroupTests(SynchronousTestCase):
    """The launcher's cgroup= option."""

    def test_option_replaces_the_rlimit(self):
        """With a cgroup the launcher is told cgroup=<dir> before the user switch, and no data= rlimit."""
        wrapper = ParentDeathSignal("/py", getpid=lambda: 1)
        self.assertEqual(child_argv(wrapper, ["/x"], 1024, "/sys/fs/cgroup/d/p-0")[6], "setsid,cgroup=/sys/fs/cgroup/d/p-0")
        self.assertEqual(child_argv(wrapper, ["/x"], 1024)[6], "setsid,data=1024")

    def test_child_joins_before_exec(self):
        """The real launcher writes the child's own pid into the cgroup's cgroup.procs before the program runs."""
        cgroup = os.path.abspath(self.mktemp())
        os.mkdir(cgroup)
        _write(os.path.join(cgroup, "cgroup.procs"), "")
        show = "import os; print(os.getpid(), open(os.environ['PROCS']).read())"
        argv = ParentDeathSignal(sys.executable).wrap([sys.executable, "-I", "-c", show], LIMIT, cgroup)
        result = subprocess.run(argv, capture_output=True, timeout=60, check=False,
                                env={"PROCS": os.path.join(cgroup, "cgroup.procs")})
        self.assertEqual(result.returncode, 0, result.stderr)
        pid, joined = result.stdout.split()
        self.assertEqual(pid, joined)

    def test_cgroup_that_cannot_be_joined_is_fatal(self):
        """A cgroup the child cannot join ends the launcher with 126: the plugin never runs without its limit."""
        marker = os.path.abspath(self.mktemp())
        argv = ParentDeathSignal(sys.executable).wrap(["/bin/touch", marker], LIMIT, os.path.abspath(self.mktemp()))
        result = subprocess.run(argv, capture_output=True, timeout=60, check=False)
        self.assertEqual(result.returncode, 126)
        self.assertIn(b"difydaemon launcher: cannot isolate the child", result.stderr)
        self.assertFalse(os.path.exists(marker))


class CgroupRuntimeTests(LocalRuntimeTestsMixin, SynchronousTestCase):
    """A runtime whose instances each get a memory cgroup, and what an OOM kill in it does."""

    def setUp(self):
        super().setUp()
        self.fs = FakeCgroupfs(self, enabled="memory")
        self.cgroups = MemoryCgroups(self.fs.own, prefix="difydaemon-7-", rmdir=_fake_rmdir)

    def cgroup_runtime(self, **kwargs):
        return self.started_runtime(
            memory_limit=LIMIT,
            memory_cgroups=self.cgroups,
            parent_death=ParentDeathSignal("/daemon/python", getpid=lambda: 77),
            liveness=LivenessPolicy(timeout=3600),
            **kwargs,
        )

    def oom_kill(self, index=-1):
        """The kernel kills the instance's process for memory, as a cgroup OOM kill is seen."""
        _write(os.path.join(self.fs.own, f"difydaemon-7-{len(self.reactor.spawned) - 1}", "memory.events"),
               "oom 1\noom_kill 1\n")
        self.process(index).kill_by_signal(9)

    def test_launched_in_its_cgroup(self):
        """Each instance is launched into a new cgroup holding the manifest's limit, not with the rlimit."""
        self.cgroup_runtime()
        path = os.path.join(self.fs.own, "difydaemon-7-0")
        self.assertEqual(self.reactor.spawned[0].args[6], f"setsid,cgroup={path}")
        self.assertEqual(_read(os.path.join(path, "memory.max")), str(LIMIT))

    def test_oom_kill_reported_as_a_memory_kill(self):
        """An OOM kill in the cgroup fails the sessions with the memory message, is logged, counted, and restarted for that reason."""
        runtime = self.cgroup_runtime()
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        self.oom_kill()
        self.assertEqual(listener.calls, [KILLED])
        self.assertEqual(runtime.memory_kills, 1)
        self.assertTrue(any(
            e["log_level"] == LogLevel.error and "killed by the kernel" in e["log_format"] for e in self.logged
        ))
        restarts = [e for e in self.logged if "restarting plugin" in e.get("log_format", "")]
        self.assertEqual([e["reason"] for e in restarts], [f"killed by signal 9: {KILLED[2]}"])

    def test_cgroup_removed_when_the_process_ends(self):
        """An instance's cgroup goes when its process ends; its replacement gets a new one."""
        self.cgroup_runtime()
        self.process().exit(1)
        self.assertFalse(os.path.exists(os.path.join(self.fs.own, "difydaemon-7-0")))
        self.reactor.advance(1)
        self.assertEqual(self.reactor.spawned[-1].args[6], f"setsid,cgroup={os.path.join(self.fs.own, 'difydaemon-7-1')}")

    def test_plain_exit_is_not_a_memory_kill(self):
        """A process that ends without an oom_kill in its cgroup is an ordinary exit."""
        runtime = self.cgroup_runtime()
        self.process().exit(1)
        self.assertEqual(runtime.memory_kills, 0)

    def test_busy_cgroup_tried_again_once(self):
        """A cgroup still holding processes at the exit is tried again a second later, then left with a warning."""
        attempts = []

        def busy(path):
            attempts.append(path)
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

        self.cgroups = MemoryCgroups(self.fs.own, prefix="difydaemon-7-", rmdir=busy)
        self.cgroup_runtime()
        self.process().exit(1)
        self.assertEqual(len(attempts), 1)
        self.reactor.advance(CGROUP_REMOVE_DELAY)
        self.assertEqual(len([a for a in attempts if a.endswith("difydaemon-7-0")]), 2)
        self.assertTrue(any("cannot remove its cgroup" in e.get("log_format", "") for e in self.logged))

    def test_cgroup_that_cannot_be_made_falls_back_to_the_rlimit(self):
        """When the cgroup cannot be made, that instance gets the rlimit, and the log says why."""
        shutil.rmtree(self.fs.own)
        self.cgroup_runtime()
        self.assertEqual(self.reactor.spawned[0].args[6], f"setsid,data={LIMIT}")
        self.assertTrue(any("using RLIMIT_DATA" in e.get("log_format", "") for e in self.logged))
