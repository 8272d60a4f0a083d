"""
Tests for difydaemon.runtimes.parent_death: the launcher's command line, and
the real launcher run by real processes whose parent is SIGKILLed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from difydaemon.runtimes.parent_death import (
    LAUNCHER,
    ParentDeathSignal,
    RunAs,
    child_argv,
    parent_death_signal,
    resolve_user,
)
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.subreaper import children_of, is_running, subreaper_argv

#: Seconds a killed process gets to disappear; the kernel needs far less.
GRACE = 10.0

#: Prints its pid, then ignores TERM and sleeps: what outlives a killed parent unless the kernel kills it.
STUBBORN_CHILD = """\
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print(os.getpid(), flush=True)
time.sleep(600)
"""

#: Starts ``sys.argv[1:]`` as its child through the launcher, then sleeps: the parent the tests kill.
PARENT = """\
import subprocess, sys, time
from difydaemon.runtimes.parent_death import ParentDeathSignal
subprocess.Popen(ParentDeathSignal(sys.executable).wrap(sys.argv[1:]))
time.sleep(600)
"""


class CommandLineTests(SynchronousTestCase):
    """What is spawned for a child."""

    def test_wrap(self):
        """The launcher runs isolated from PYTHON* and site, is told the daemon's pid, and gets the argv whole."""
        wrapper = ParentDeathSignal("/usr/bin/python3", getpid=lambda: 4321)
        self.assertEqual(
            wrapper.wrap(["/venv/bin/python", "-m", "main"]),
            ["/usr/bin/python3", "-I", "-S", "-c", LAUNCHER, "4321", "setsid", "/venv/bin/python", "-m", "main"],
        )

    def test_memory_limit_option(self):
        """A memory limit is passed to the launcher as data=<bytes>, before the change of user."""
        wrapper = ParentDeathSignal("/py", getpid=lambda: 1, run_as=RunAs("plugins", 1500, 1600))
        self.assertEqual(wrapper.wrap(["/x"], 268435456)[5:], ["1", "setsid,data=268435456,user=1500:1600", "/x"])
        self.assertEqual(child_argv(wrapper, ["/x"], 1024)[6], "setsid,data=1024,user=1500:1600")
        self.assertEqual(child_argv(None, ["/x"], 1024), ["/x"])

    def test_pid_asked_at_each_spawn(self):
        """The daemon's pid is read when the child is spawned, not when the launcher is made (twistd forks)."""
        pids = iter([10, 20])
        wrapper = ParentDeathSignal("/py", getpid=lambda: next(pids))
        self.assertEqual((wrapper.wrap(["/x"])[5], wrapper.wrap(["/x"])[5]), ("10", "20"))

    def test_run_as(self):
        """With a user to run as, the launcher is told its uid and gid after setsid."""
        wrapper = ParentDeathSignal("/py", getpid=lambda: 1, run_as=RunAs("plugins", 1500, 1600))
        self.assertEqual(wrapper.wrap(["/x"])[5:], ["1", "setsid,user=1500:1600", "/x"])

    def test_resolve_user(self):
        """A user is named by name or by uid; an unknown one is refused with its name."""
        entry = type("Entry", (), {"pw_name": "plugins", "pw_uid": 1500, "pw_gid": 1600})

        def by_name(name):
            if name != "plugins":
                raise KeyError(name)
            return entry

        def by_uid(uid):
            if uid != 1500:
                raise KeyError(uid)
            return entry

        expected = RunAs("plugins", 1500, 1600)
        self.assertEqual(resolve_user("plugins", by_name, by_uid), expected)
        self.assertEqual(resolve_user(" 1500 ", by_name, by_uid), expected)
        for unknown in ("nobody-here", "99"):
            with self.assertRaises(ValueError) as caught:
                resolve_user(unknown, by_name, by_uid)
            self.assertIn(repr(unknown), str(caught.exception))

    def test_run_as_needs_a_launcher(self):
        """Where there is no launcher, asking to run as another user is refused rather than ignored."""
        self.assertRaises(ValueError, parent_death_signal, "darwin", "/usr/bin/python3", RunAs("p", 1, 1))

    def test_without_launcher(self):
        """Without a launcher the command line is spawned as it is."""
        self.assertEqual(child_argv(None, ("/uv", "venv")), ["/uv", "venv"])

    def test_platforms(self):
        """Linux gets the launcher on the daemon's interpreter; other platforms and an unknown interpreter do not."""
        self.assertEqual(parent_death_signal("linux", "/usr/bin/python3"), ParentDeathSignal("/usr/bin/python3"))
        self.assertIsNone(parent_death_signal("darwin", "/usr/bin/python3"))
        self.assertIsNone(parent_death_signal("win32", "C:/python.exe"))
        self.assertIsNone(parent_death_signal("linux", ""))


def _run_launched(parent_pid: int, argv, env=None) -> subprocess.CompletedProcess:
    """Run ``argv`` through the real launcher, told that its parent is ``parent_pid``."""
    wrapper = ParentDeathSignal(sys.executable, getpid=lambda: parent_pid)
    # Blocking is fine: nothing else runs meanwhile.
    return subprocess.run(wrapper.wrap(argv), capture_output=True, env=env, timeout=60, check=False)


class LauncherTests(SynchronousTestCase):
    """The real launcher in real processes."""

    def test_execs_program_unchanged(self):
        """The program runs in the launcher's process with its own argv and exactly the given environment."""
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": "/not/for/the/launcher", "X": "1"}
        show = "import json, os, sys; print(json.dumps([os.getpid(), os.getppid(), sys.argv, dict(os.environ)]))"
        result = _run_launched(os.getpid(), [sys.executable, "-I", "-c", show, "one", "two words"], env)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr, b"")
        pid, parent, argv, environ = json.loads(result.stdout)
        self.assertEqual(parent, os.getpid())
        self.assertEqual(argv, ["-c", "one", "two words"])
        self.assertEqual(environ, env)

    def test_parent_death_signal_set(self):
        """The program runs with SIGKILL as its parent-death signal."""
        # PR_GET_PDEATHSIG is 2; it writes the signal number into an int.
        show = (
            "import ctypes; n = ctypes.c_int(); "
            "ctypes.CDLL(None).prctl(2, ctypes.byref(n), 0, 0, 0); print(n.value)"
        )
        result = _run_launched(os.getpid(), [sys.executable, "-I", "-c", show])
        self.assertEqual((result.returncode, result.stdout.strip()), (0, str(int(signal.SIGKILL)).encode()))

    def test_memory_limit_set(self):
        """With data=<bytes>, the program runs with that RLIMIT_DATA and gets MemoryError past it."""
        show = (
            "import resource; print(resource.getrlimit(resource.RLIMIT_DATA)[0]); "
            "b = bytearray(300 * 1048576)"
        )
        wrapper = ParentDeathSignal(sys.executable)
        argv = wrapper.wrap([sys.executable, "-I", "-c", show], 200 * 1048576)
        result = subprocess.run(argv, capture_output=True, timeout=60, check=False)
        self.assertEqual(result.stdout.strip(), str(200 * 1048576).encode())
        self.assertIn(b"MemoryError", result.stderr)

    def test_memory_limit_beyond_setrlimit_is_fatal_in_one_line(self):
        """A data= setrlimit cannot take (past a C long) ends the launcher with 126 and one line, not a traceback."""
        marker = os.path.abspath(self.mktemp())
        wrapper = ParentDeathSignal(sys.executable, getpid=os.getpid)
        argv = wrapper.wrap(["/bin/touch", marker], 2**64 - 1)
        result = subprocess.run(argv, capture_output=True, timeout=60, check=False)
        self.assertEqual(result.returncode, 126, result.stderr)
        self.assertTrue(result.stderr.startswith(b"difydaemon launcher: cannot isolate the child"), result.stderr)
        self.assertFalse(os.path.exists(marker))

    def test_own_session_and_group(self):
        """The program leads a session and a process group of its own, whose id is its pid."""
        show = "import json, os; print(json.dumps([os.getpid(), os.getpgid(0), os.getsid(0)]))"
        result = _run_launched(os.getpid(), [sys.executable, "-I", "-c", show])
        self.assertEqual(result.returncode, 0, result.stderr)
        pid, group, session = json.loads(result.stdout)
        self.assertEqual((group, session), (pid, pid))
        self.assertNotEqual(group, os.getpgid(0))

    def test_user_that_cannot_be_had_is_fatal(self):
        """A user switch the kernel refuses ends the launcher with 126 and one line: the program never runs as the daemon's user."""
        if os.getuid() == 0:
            self.skipTest("root may switch to any user")
        marker = os.path.abspath(self.mktemp())
        wrapper = ParentDeathSignal(sys.executable, getpid=os.getpid, run_as=RunAs("nobody", 0, 0))
        result = subprocess.run(wrapper.wrap(["/bin/touch", marker]), capture_output=True, timeout=60, check=False)
        self.assertEqual(result.returncode, 126)
        self.assertIn(b"difydaemon launcher: cannot isolate the child", result.stderr)
        self.assertFalse(os.path.exists(marker))

    def test_parent_already_gone(self):
        """When the parent is not the daemon any more, the program is not run and the launcher says why."""
        marker = os.path.abspath(self.mktemp())
        result = _run_launched(os.getpid() + 1, ["/bin/touch", marker])
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"the daemon exited before the child started", result.stderr)
        self.assertFalse(os.path.exists(marker))

    def test_missing_program(self):
        """A program that cannot be executed ends the launcher with 127 and one line naming it."""
        result = _run_launched(os.getpid(), ["/nonexistent/python", "-m", "main"])
        self.assertEqual(result.returncode, 127)
        self.assertEqual(result.stderr, b"cannot start /nonexistent/python: No such file or directory\n")


class ParentKilledTests(SynchronousTestCase):
    """A child started through the launcher dies with its SIGKILLed parent, under a subreaper."""

    def start_tree(self):
        """Start subreaper -> parent -> child; return the subreaper, the parent's pid and the child's pid."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        argv = subreaper_argv([sys.executable, "-c", PARENT, sys.executable, "-c", STUBBORN_CHILD])
        reaper = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
        self.addCleanup(self.end_tree, reaper)
        child = int(reaper.stdout.readline())
        [parent] = children_of(reaper.pid)
        self.tree = [parent, child]
        return reaper, parent, child

    def end_tree(self, reaper) -> None:
        for pid in self.tree:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
        reaper.wait(timeout=GRACE)
        reaper.stdout.close()

    def wait_gone(self, pid: int) -> bool:
        deadline = time.monotonic() + GRACE
        while is_running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not is_running(pid)

    def test_child_killed_with_parent(self):
        """SIGKILL of the parent kills a TERM-ignoring child started through the launcher; nothing is left."""
        reaper, parent, child = self.start_tree()
        self.assertTrue(is_running(child))
        os.kill(parent, signal.SIGKILL)
        self.assertTrue(self.wait_gone(child), f"child {child} outlived its parent")
        self.assertEqual(reaper.wait(timeout=GRACE), 0)
