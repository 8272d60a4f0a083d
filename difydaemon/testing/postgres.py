"""
A private PostgreSQL cluster for tests that need the database to go away.

Tests of outages must never stop the machine's shared server, so
:class:`PrivatePostgres` makes a cluster of its own: ``initdb`` in a
temporary directory owned by the ``postgres`` user, a free TCP port on
127.0.0.1, its unix socket in that directory, trust authentication, and no
fsync (the data is thrown away).  The test starts, stops, freezes
(``SIGSTOP``) and thaws it at will.

:func:`private_postgres_for` shares one cluster between the tests of a
class: the first test creates it, the last one's clean-up destroys it, and
an ``atexit`` hook destroys whatever a partial run left behind.

The binaries come from ``$DIFYDAEMON_TEST_PG_BIN`` or the newest
``/usr/lib/postgresql/*/bin``; as root they run as ``postgres`` through
``runuser``.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest

BIN_VARIABLE = "DIFYDAEMON_TEST_PG_BIN"
SERVER_USER = "postgres"


def postgres_bin_dir(environ=None) -> str:
    """
    The directory of ``initdb`` and ``pg_ctl``.

    :raises SkipTest: when PostgreSQL's server binaries are not installed,
        unless ``$CI`` is set (then RuntimeError: CI must have them).
    """
    environ = os.environ if environ is None else environ
    candidates = [environ[BIN_VARIABLE]] if environ.get(BIN_VARIABLE) else []

    def version(path):
        name = os.path.basename(os.path.dirname(path))
        try:
            return float(name)
        except ValueError:
            return 0.0

    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    for candidate in candidates:
        if os.path.exists(os.path.join(candidate, "initdb")):
            return candidate
    message = f"no PostgreSQL server binaries (set ${BIN_VARIABLE})"
    if environ.get("CI"):
        raise RuntimeError(message)
    raise SkipTest(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivatePostgresError(Exception):
    """An ``initdb`` or ``pg_ctl`` command failed; carries its output."""


class PrivatePostgres:
    """
    One PostgreSQL cluster in a temporary directory.

    :param reactor: runs the commands of :meth:`start` and :meth:`stop`.
    :param bin_dir: where ``initdb`` and ``pg_ctl`` are (found when None).
    :ivar port: the TCP port on 127.0.0.1.
    :ivar directory: the temporary directory (data, socket, log).
    """

    host = "127.0.0.1"
    user = SERVER_USER

    def __init__(self, reactor, bin_dir: str | None = None) -> None:
        self._reactor = reactor
        self._bin = bin_dir or postgres_bin_dir()
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="difydaemon-pg-")
        self._data = os.path.join(self.directory, "data")
        self._log = os.path.join(self.directory, "server.log")
        self._initialised = False
        self._destroyed = False
        self.running = False
        self.frozen = False
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
            self._as_server_user = ["/sbin/runuser", "-u", SERVER_USER, "--"]
            if not os.path.exists(self._as_server_user[0]):
                self._as_server_user[0] = shutil.which("runuser") or "runuser"
        else:
            self._as_server_user = []
        atexit.register(self.destroy)

    def dsn(self, dbname: str = "postgres") -> str:
        """A libpq connection string for ``dbname`` over TCP."""
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname}"

    def _command(self, tool: str, *args: str) -> list:
        return self._as_server_user + [os.path.join(self._bin, tool), *args]

    async def _run(self, tool: str, *args: str) -> bytes:
        argv = self._command(tool, *args)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        out, err, code = await getProcessOutputAndValue(
            argv[0], argv[1:], env=env, path=self.directory, reactor=self._reactor
        )
        if code != 0:
            raise PrivatePostgresError(
                f"{' '.join(argv)} exited {code}:\n{out.decode(errors='replace')}{err.decode(errors='replace')}"
                f"\n{self.server_log()}"
            )
        return out

    def server_log(self) -> str:
        """The server's log so far (for failure messages)."""
        try:
            with open(self._log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _server_options(self) -> str:
        settings = [
            "-p", str(self.port),
            "-k", self.directory,
            "-c", f"listen_addresses={self.host}",
            "-c", "fsync=off",
            "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
        ]
        return " ".join(shlex.quote(s) for s in settings)

    async def start(self) -> None:
        """Create the cluster the first time, then start it and wait until it accepts connections."""
        if self._destroyed:
            raise PrivatePostgresError("this cluster has been destroyed")
        if self.frozen:
            self.thaw()
        if self.running:
            return
        if not self._initialised:
            await self._run(
                "initdb", "-D", self._data, "-U", SERVER_USER, "-A", "trust",
                "-E", "UTF8", "--no-sync", "--locale=C",
            )
            self._initialised = True
        await self._run("pg_ctl", "-D", self._data, "-l", self._log, "-o", self._server_options(), "-w", "start")
        self.running = True

    async def stop(self, mode: str = "fast") -> None:
        """
        Stop the server (``fast``: clients are told and disconnected;
        ``immediate``: a crash, as with a power cut).
        """
        if not self.running:
            return
        if self.frozen:
            self.thaw()
        await self._run("pg_ctl", "-D", self._data, "-m", mode, "-w", "stop")
        self.running = False

    def _pids(self) -> list:
        try:
            with open(os.path.join(self._data, "postmaster.pid"), encoding="ascii") as f:
                postmaster = int(f.readline().strip())
        except (OSError, ValueError):
            return []
        pids = [postmaster]
        # every backend and auxiliary process is a child of the postmaster
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            # a backend that has exited waits, a zombie, for the postmaster
            if fields[1] == str(postmaster) and fields[0] != "Z":
                pids.append(int(entry))
        return pids

    def _signal_all(self, signum: int) -> None:
        for pid in self._pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def freeze(self) -> None:
        """``SIGSTOP`` the server and all its processes: it accepts TCP connections but never answers."""
        # a process forked while the others are being stopped would run on:
        # stop what appears until the set of processes holds still
        stopped: set[int] = set()
        for _ in range(50):
            new = set(self._pids()) - stopped
            if not new:
                break
            for pid in new:
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    pass
            stopped |= new
        self.frozen = True

    def thaw(self) -> None:
        """``SIGCONT`` what :meth:`freeze` stopped."""
        self._signal_all(signal.SIGCONT)
        self.frozen = False

    def destroy(self) -> None:
        """Stop the server at once and delete the directory (blocking; safe to call twice)."""
        if self._destroyed:
            return
        self._destroyed = True
        try:
            if self.frozen:
                self.thaw()
            if self.running or os.path.exists(os.path.join(self._data, "postmaster.pid")):
                subprocess.run(
                    self._command("pg_ctl", "-D", self._data, "-m", "immediate", "-w", "stop"),
                    capture_output=True,
                    timeout=60,
                    check=False,
                )
            self.running = False
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            atexit.unregister(self.destroy)


_shared: dict = {}


def _test_names(case_class) -> set:
    return {name for name in dir(case_class) if name.startswith("test") and callable(getattr(case_class, name))}


async def private_postgres_for(case, reactor) -> PrivatePostgres:
    """
    The cluster shared by the tests of ``case``'s class, running and thawed.

    The first test of the class creates it; each test's clean-up counts
    itself done, and the last one destroys the cluster.  A run of only some
    of the tests leaves it to the ``atexit`` hook.
    """

    key = type(case)
    entry = _shared.get(key)
    if entry is None:
        entry = _shared[key] = {"cluster": PrivatePostgres(reactor), "left": set(_test_names(key))}
    cluster = entry["cluster"]

    def done():
        entry["left"].discard(case._testMethodName)
        if not entry["left"]:
            _shared.pop(key, None)
            cluster.destroy()

    case.addCleanup(done)
    await cluster.start()
    return cluster
