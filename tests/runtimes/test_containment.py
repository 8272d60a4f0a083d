"""
Tests for difydaemon.runtimes.containment and the containment of real plugin
processes: the daemon's memory hidden from them, their own HOME and user,
and what they spawn ended with them.
"""

from __future__ import annotations

import os
import pwd
import secrets
import signal
import stat
import subprocess
import sys

from twisted.internet import reactor, task
from twisted.logger import globalLogPublisher

from difydaemon.errors import ConfigError
from difydaemon.runtimes.containment import (
    PR_SET_DUMPABLE,
    exposed_mode,
    give_to,
    hide_process_memory,
    plugin_home,
    prepare_private_directory,
    run_as_user,
    warn_if_exposed,
    with_plugin_home,
)
from difydaemon.runtimes.local import LocalRuntime
from difydaemon.runtimes.parent_death import ParentDeathSignal, RunAs
from difydaemon.runtimes.process_table import LinuxProcessTable
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from difydaemon.testing.subreaper import is_running
from tests.runtimes.test_local import EndingListener

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: The Python a throwaway user can run (the tests' own may live under /root).
SYSTEM_PYTHON = "/usr/bin/python3"


def is_root() -> bool:
    return os.geteuid() == 0


def throwaway_user(case) -> RunAs:
    """A system user made for this test and deleted after it (root only)."""
    name = "difyd" + secrets.token_hex(4)
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        check=True, capture_output=True, timeout=60,
    )
    case.addCleanup(subprocess.run, ["userdel", name], capture_output=True, timeout=60, check=False)
    entry = pwd.getpwnam(name)
    return RunAs(name, entry.pw_uid, entry.pw_gid)


class HideProcessMemoryTests(SynchronousTestCase):
    """The daemon makes itself non-dumpable where it can, and says so where it cannot."""

    def test_prctl_called(self):
        """On Linux, prctl(PR_SET_DUMPABLE, 0) is called."""
        calls = []
        self.assertTrue(hide_process_memory("linux", lambda *args: calls.append(args) or 0))
        self.assertEqual(calls, [(PR_SET_DUMPABLE, 0, 0, 0, 0)])

    def test_refused_or_elsewhere(self):
        """A refused prctl, or another platform, gives False with a log line instead of an exception."""
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        self.assertFalse(hide_process_memory("linux", lambda *args: -1))
        self.assertFalse(hide_process_memory("darwin", lambda *args: self.fail("called")))
        self.assertEqual(len(logged), 2)
        self.assertEqual(logged[1]["platform"], "darwin")


#: ``<python> -c DAEMON <hide|show>``: plays the daemon: optionally hides its
#: memory, then starts a child through the launcher, exactly as plugins are
#: started, which tries to read the daemon's environment; prints the child's
#: exit status and output.
DAEMON = """\
import ctypes, os, subprocess, sys
from difydaemon.runtimes.containment import hide_process_memory
from difydaemon.runtimes.parent_death import ParentDeathSignal
mode, python = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3:
    # as root: everything is imported, now become the daemon's user (the
    # virtualenv may be unreadable to it); changing user clears the dumpable
    # flag, so set it back as for a daemon started as that user
    uid, gid = int(sys.argv[3]), int(sys.argv[4])
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    ctypes.CDLL(None, use_errno=True).prctl(4, 1, 0, 0, 0)
if mode == "hide" and not hide_process_memory():
    sys.exit("could not hide")
child = "import os\\ntry:\\n  data = open('/proc/%d/environ' % os.getppid(), 'rb').read()\\n  print('read', b'DAEMON_SECRET=s3cret' in data)\\nexcept OSError as e:\\n  print('refused', e.errno)"
result = subprocess.run(ParentDeathSignal(python).wrap([python, "-I", "-c", child]), capture_output=True, cwd="/")
print(result.returncode, result.stdout.decode().strip(), result.stderr.decode().strip())
"""


class DaemonEnvironmentTests(SynchronousTestCase):
    """A plugin of the daemon's user cannot read the environment of a daemon that hid its memory."""

    def run_daemon(self, mode: str) -> str:
        """Run :data:`DAEMON` as a non-root user (a throwaway one when the test runs as root: it imports as root, then switches)."""
        site = [p for p in sys.path if p.endswith("site-packages")]
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.pathsep.join([REPOSITORY, *site]), "DAEMON_SECRET": "s3cret"}
        argv = [sys.executable, "-c", DAEMON, mode, sys.executable]
        if is_root():
            user = throwaway_user(self)
            if not os.access(SYSTEM_PYTHON, os.X_OK):
                self.skipTest(f"no {SYSTEM_PYTHON} for a non-root user")
            # the child runs as that user: an interpreter it may execute
            argv = [sys.executable, "-c", DAEMON, mode, SYSTEM_PYTHON, str(user.uid), str(user.gid)]
        # blocking is fine: nothing else runs meanwhile
        result = subprocess.run(argv, capture_output=True, env=env, timeout=60, check=False, cwd="/")
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.decode().strip()

    def test_environment_unreadable_once_hidden(self):
        """After hide_process_memory, a child of the same user gets EACCES on /proc/<daemon>/environ."""
        self.assertEqual(self.run_daemon("hide"), "0 refused 13")

    def test_environment_readable_otherwise(self):
        """Without it, the same child reads the daemon's secret: what the test above guards against."""
        self.assertEqual(self.run_daemon("show"), "0 read True")


class FilesTests(SynchronousTestCase):
    """Plugin HOME, directory hand-over and the .env check."""

    def test_plugin_home(self):
        """Plugins' HOME is .plugin-home under the working path; pyenv is still looked for under the daemon's HOME."""
        self.assertEqual(plugin_home("/var/lib/dify/cwd"), "/var/lib/dify/cwd/.plugin-home")
        env = with_plugin_home({"HOME": "/root", "PATH": "/bin"}, "/w/.plugin-home")
        self.assertEqual(env, {"HOME": "/w/.plugin-home", "PATH": "/bin", "PYENV_ROOT": "/root/.pyenv"})
        env = with_plugin_home({"HOME": "/root", "PYENV_ROOT": "/opt/pyenv"}, "/w/.plugin-home")
        self.assertEqual(env["PYENV_ROOT"], "/opt/pyenv")

    def test_private_directory(self):
        """The plugins' HOME is created 0700, and an existing one made 0700."""
        path = os.path.join(os.path.abspath(self.mktemp()), ".plugin-home")
        prepare_private_directory(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)
        os.chmod(path, 0o755)
        prepare_private_directory(path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700)

    def test_give_to(self):
        """A tree is given to the plugin user, links themselves but never their targets."""
        if not is_root():
            self.skipTest("only root can give files away")
        root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(root, "sub"))
        with open(os.path.join(root, "sub", "main.py"), "w"):
            pass
        outside = os.path.abspath(self.mktemp())
        with open(outside, "w"):
            pass
        os.symlink(outside, os.path.join(root, "link"))
        give_to(root, RunAs("p", 54321, 54322))
        for name in ("", "sub", "sub/main.py", "link"):
            info = os.lstat(os.path.join(root, name))
            self.assertEqual((info.st_uid, info.st_gid), (54321, 54322), name)
        self.assertEqual(os.stat(outside).st_uid, 0)

    def test_exposed_mode(self):
        """A file readable by group or others is exposed; 0600 and a missing file are not."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w"):
            pass
        for mode, exposed in ((0o600, None), (0o640, 0o640), (0o604, 0o604), (0o644, 0o644)):
            os.chmod(path, mode)
            self.assertEqual(exposed_mode(path), exposed, oct(mode))
        self.assertIsNone(exposed_mode(path + ".missing"))
        os.chmod(path, 0o640)
        self.assertTrue(warn_if_exposed(path))
        self.assertFalse(warn_if_exposed(path + ".missing"))


class RunAsUserTests(SynchronousTestCase):
    """PLUGIN_RUN_AS_USER resolved at start."""

    def resolve(self, text):
        if text != "plugins":
            raise ValueError(f"no user {text!r} on this machine")
        return RunAs("plugins", 1500, 1500)

    def test_unset(self):
        """Unset: children keep the daemon's user."""
        self.assertIsNone(run_as_user("", lambda: 0, self.resolve))

    def test_root_switches(self):
        """A root daemon runs children as the named user."""
        self.assertEqual(run_as_user("plugins", lambda: 0, self.resolve), RunAs("plugins", 1500, 1500))

    def test_missing_user_refused(self):
        """A user that does not exist is refused, naming the variable and the user."""
        with self.assertRaises(ConfigError) as caught:
            run_as_user("ghost", lambda: 0, self.resolve)
        self.assertIn("PLUGIN_RUN_AS_USER", str(caught.exception))
        self.assertIn("'ghost'", str(caught.exception))

    def test_non_root_refused_unless_itself(self):
        """A daemon that is not root cannot switch: refused, unless the user is the daemon's own."""
        self.assertIsNone(run_as_user("plugins", lambda: 1500, self.resolve))
        with self.assertRaises(ConfigError) as caught:
            run_as_user("plugins", lambda: 1000, self.resolve)
        self.assertIn("only a daemon running as root", str(caught.exception))


#: A fake plugin (not the SDK: the user it may run as cannot reach the SDK's
#: Python): heartbeats, then answers each request's ``action``.
CONTAINED_PLUGIN = r'''
import json, os, subprocess, sys, time

out = sys.stdout


def send(message):
    out.write(json.dumps(message, separators=(",", ":")) + "\n\n")
    out.flush()


send({"event": "heartbeat", "session_id": None, "data": {}})
for line in sys.stdin:
    request = json.loads(line)
    action = request["data"]["action"]
    if action == "whoami":
        try:
            open("/proc/%d/environ" % os.getppid(), "rb").read()
            environ = "read"
        except OSError as e:
            environ = "refused %d" % e.errno
        data = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "pid": os.getpid(),
                "pgid": os.getpgid(0), "sid": os.getsid(0), "home": os.environ.get("HOME"), "environ": environ}
    elif action == "spawn":
        data = {"pid": subprocess.Popen(["sleep", "600"]).pid}
    elif action == "double_fork":
        r, w = os.pipe()
        if os.fork() == 0:
            if os.fork() == 0:
                os.write(w, str(os.getpid()).encode())
                time.sleep(600)
                os._exit(0)
            os._exit(0)
        os.close(w)
        os.wait()
        data = {"pid": int(os.read(r, 64))}
    elif action == "escape":
        data = {"pid": subprocess.Popen(["sleep", "600"], start_new_session=True).pid}
    elif action == "exit":
        os._exit(3)
    send({"event": "session", "session_id": request["session_id"], "data": {"type": "stream", "data": data}})
    send({"event": "session", "session_id": request["session_id"], "data": {"type": "end", "data": {}}})
while True:
    time.sleep(0.05)
'''


def kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class ContainedPluginTests(AsyncTestCase):
    """Real plugin processes, started as the daemon starts them, are contained."""

    timeout = 60

    def runtime(self, python: str = sys.executable, run_as: RunAs | None = None) -> LocalRuntime:
        working_dir = os.path.abspath(self.mktemp())
        os.makedirs(working_dir)
        # trial's temporary directories are 0700: the plugin's user must reach its code
        for path in (os.path.dirname(working_dir), working_dir):
            os.chmod(path, 0o755)
        with open(os.path.join(working_dir, "main.py"), "w") as source:
            source.write(CONTAINED_PLUGIN)
        os.chmod(os.path.join(working_dir, "main.py"), 0o644)
        runtime = LocalRuntime(
            reactor, "acme/contained:0.0.1@" + "0" * 64, "acme/contained", working_dir, python,
            env={"PATH": "/usr/bin:/bin", "HOME": "/tmp/plugin-home"},
            readiness_timeout=20, stop_grace_period=1, session_timeout=30,
            parent_death=ParentDeathSignal(sys.executable, run_as=run_as),
            process_table=LinuxProcessTable(),
        )
        self.addCleanup(runtime.stop, drain_timeout=0)
        return runtime

    async def ask(self, runtime: LocalRuntime, action: str):
        """The stream chunk the plugin answers ``action`` with (None if it answers none)."""
        listener = EndingListener()
        session_id = secrets.token_hex(4)
        runtime.open_session(session_id, {"session_id": session_id, "data": {"action": action}}, listener)
        await listener.finished_d
        calls = listener.calls
        return calls[0][1] if calls[0][0] == "stream" else calls

    async def spawned(self, runtime: LocalRuntime, action: str) -> int:
        pid = (await self.ask(runtime, action))["pid"]
        self.addCleanup(kill_quietly, pid)
        self.assertTrue(is_running(pid))
        return pid

    async def gone(self, pid: int) -> bool:
        for _ in range(200):
            if not is_running(pid):
                return True
            await task.deferLater(reactor, 0.05, lambda: None)
        return False

    async def test_own_session_and_group(self):
        """A plugin leads its own session and process group."""
        runtime = self.runtime()
        await runtime.start()
        me = await self.ask(runtime, "whoami")
        self.assertEqual((me["pgid"], me["sid"]), (me["pid"], me["pid"]))
        self.assertNotEqual(me["pgid"], os.getpgid(0))

    async def test_stop_ends_what_the_plugin_spawned(self):
        """Stopping a plugin also ends its child and a double-forked grandchild (re-parented away from it)."""
        runtime = self.runtime()
        await runtime.start()
        child = await self.spawned(runtime, "spawn")
        orphan = await self.spawned(runtime, "double_fork")
        await runtime.stop(drain_timeout=0)
        self.assertTrue(await self.gone(child), f"child {child} outlived its plugin")
        self.assertTrue(await self.gone(orphan), f"double-forked {orphan} outlived its plugin")

    async def test_exit_ends_what_the_plugin_spawned(self):
        """A plugin that exits by itself takes what it spawned with it, and is restarted."""
        runtime = self.runtime()
        await runtime.start()
        [instance] = runtime.instances
        child = await self.spawned(runtime, "spawn")
        calls = await self.ask(runtime, "exit")
        self.assertEqual(calls, [("error", "ConnectionClosedError", "plugin instance exited", None)])
        self.assertTrue(await self.gone(child), f"child {child} outlived its plugin")
        self.assertEqual(instance.describe_exit(), "exited with code 3")

    async def test_escaped_grandchild_does_not_hold_the_session(self):
        """A plugin that exits while a process it put in another session holds its stdout still ends its sessions."""
        runtime = self.runtime()
        await runtime.start()
        holder = await self.spawned(runtime, "escape")
        calls = await self.ask(runtime, "exit")
        self.assertEqual(calls, [("error", "ConnectionClosedError", "plugin instance exited", None)])
        # out of the group: only a supervisor of the whole cgroup reaches it
        self.assertTrue(is_running(holder))

    def test_parent_death_signal_kept_for_another_user(self):
        """A child dropped to another user still has SIGKILL as its parent-death signal (set after the switch, which clears it)."""
        if not is_root():
            self.skipTest("only root can switch users")
        user = throwaway_user(self)
        show = "import ctypes; n = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(n), 0, 0, 0); print(n.value)"
        wrapper = ParentDeathSignal(sys.executable, run_as=user)
        # blocking is fine: nothing else runs meanwhile
        result = subprocess.run(
            wrapper.wrap([SYSTEM_PYTHON, "-I", "-c", show]), capture_output=True, timeout=60, check=False, cwd="/"
        )
        self.assertEqual((result.returncode, result.stdout.strip()), (0, str(int(signal.SIGKILL)).encode()), result.stderr)

    async def test_run_as_user(self):
        """With a user to run as, a plugin runs with its uid and gid, no other group, and cannot read the daemon's environment."""
        if not is_root():
            self.skipTest("only a daemon running as root can run plugins as another user")
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            self.skipTest(f"no {SYSTEM_PYTHON} for a non-root user")
        user = throwaway_user(self)
        runtime = self.runtime(python=SYSTEM_PYTHON, run_as=user)
        await runtime.start()
        me = await self.ask(runtime, "whoami")
        self.assertEqual((me["uid"], me["gid"], me["groups"]), (user.uid, user.gid, []))
        self.assertEqual((me["environ"], me["home"]), ("refused 13", "/tmp/plugin-home"))
        self.assertEqual(me["pgid"], me["pid"])
