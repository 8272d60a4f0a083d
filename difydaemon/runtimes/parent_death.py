"""
Children that die with the daemon, even when the daemon is SIGKILLed.

An orderly stop ends every plugin process and build step, but a daemon
killed by SIGKILL or by the OOM killer runs no code: its children would be
re-parented and live on, holding ports, memory and open sessions.  Linux's
``prctl(PR_SET_PDEATHSIG, SIGKILL)`` makes the kernel kill a process when
its parent dies, and the setting survives ``execve`` (of a program that is
not set-user-ID).  Twisted's ``spawnProcess`` has no hook to run code
between fork and exec, so the child is started through a launcher,
:data:`LAUNCHER`: a few lines run by ``python -I -S -c`` (no ``site``, no
``PYTHON*`` variables, about 20 ms) that set the signal, check that the
parent is still the daemon (it may have died before the signal was set),
and ``exec`` the real program with the same pid, arguments and environment.

The launcher also contains the child, before the ``exec``:

- ``setsid``: the child leads a session and a process group whose id is its
  pid, and whatever it spawns stays in that group (unless it calls
  ``setsid`` itself), so the daemon can signal the whole group when it
  stops the plugin and kill what is left of it when the plugin exits.
- with ``PLUGIN_RUN_AS_USER`` (a daemon running as root), it drops to that
  user and its primary group, so that a plugin cannot read the daemon's
  files, ``/proc/<daemon pid>/environ`` or its memory.

Two consequences of the parent-death signal:

- The signal fires when the *thread* that spawned the child ends, so every
  child must be spawned on the reactor thread (it is: the reactor spawns
  them all).
- It covers the daemon's own children: the plugin processes, the uv and
  compileall steps and the interpreter probes.  Processes a plugin starts
  itself are not covered; a supervisor that kills the whole control group
  (systemd's default ``KillMode``, a container stop) covers those.

When the locale is unset, the launcher's Python sets ``LC_CTYPE=C.UTF-8``
(PEP 538) before the ``exec``; a plugin's Python would set the same itself.

Linux only: :func:`parent_death_signal` gives None elsewhere, and children
are then started directly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from attrs import field, frozen

#: The launcher's code:
#: ``<python> -I -S -c LAUNCHER <daemon pid> <options> <program> <args...>``.
#: ``options`` is ``-`` or a comma-separated list of ``setsid`` (the child
#: leads a session and process group of its own, so that its whole group
#: can be signalled), ``user=<uid>:<gid>`` (it drops to that user, with
#: no supplementary group), ``data=<bytes>`` (its ``RLIMIT_DATA``: the
#: plugin's memory limit, see :mod:`difydaemon.runtimes.memory`) and
#: ``cgroup=<directory>`` (it moves itself into that cgroup v2 cgroup, the
#: other form of the memory limit, see :mod:`difydaemon.runtimes.cgroups`).  The parent-death signal is set after the change
#: of user, which would clear it; ``ctypes`` is loaded before that change,
#: as the new user may not read the daemon's Python (under ``/root``).  1 is
#: ``PR_SET_PDEATHSIG``, 9 ``SIGKILL``.
#: A missing ``ctypes`` or a refused ``prctl`` is reported on stderr and the
#: program still runs; a session, user, cgroup or limit that cannot be had ends the
#: launcher with 126 and one line (a plugin must never run as root by
#: mistake); a program that cannot be executed exits 127 with one line.
LAUNCHER = """\
import os, sys
parent, options, argv = int(sys.argv[1]), sys.argv[2].split(","), sys.argv[3:]
try:
    import ctypes
    prctl = ctypes.CDLL(None, use_errno=True).prctl
except Exception as e:
    prctl, missing = None, e
try:
    if "setsid" in options:
        os.setsid()
    for option in options:
        if option.startswith("cgroup="):
            with open(option[7:] + "/cgroup.procs", "w") as procs:
                procs.write(str(os.getpid()))
    for option in options:
        if option.startswith("data="):
            import resource
            resource.setrlimit(resource.RLIMIT_DATA, (int(option[5:]),) * 2)
    for option in options:
        if option.startswith("user="):
            uid, gid = (int(n) for n in option[5:].split(":"))
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
except (OSError, ValueError, OverflowError) as e:
    os.write(2, ("difydaemon launcher: cannot isolate the child (%s): %s\\n" % (sys.argv[2], getattr(e, "strerror", None) or e)).encode())
    os._exit(126)
try:
    if prctl is None:
        raise missing
    if prctl(1, 9, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
except Exception as e:
    os.write(2, ("difydaemon launcher: cannot set the parent-death signal: %s\\n" % e).encode())
if os.getppid() != parent:
    os.write(2, b"difydaemon launcher: the daemon exited before the child started\\n")
    os._exit(1)
try:
    os.execv(argv[0], argv)
except OSError as e:
    os.write(2, ("cannot start %s: %s\\n" % (argv[0], e.strerror)).encode())
    os._exit(127)
"""


@frozen
class RunAs:
    """
    The user plugin processes and their builds run as
    (``PLUGIN_RUN_AS_USER``).

    :ivar name: the user's name (for messages).
    :ivar uid: its user id.
    :ivar gid: its primary group id.
    """

    name: str
    uid: int
    gid: int


def resolve_user(text: str, getpwnam=None, getpwuid=None) -> RunAs:
    """
    The user ``text`` names: a user name, or a numeric uid.

    :raises ValueError: saying that no such user exists.
    """
    import pwd

    getpwnam = getpwnam or pwd.getpwnam
    getpwuid = getpwuid or pwd.getpwuid
    text = text.strip()
    try:
        entry = getpwuid(int(text)) if text.isdigit() else getpwnam(text)
    except KeyError:
        raise ValueError(f"no user {text!r} on this machine")
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


@frozen
class ParentDeathSignal:
    """
    Starts children through :data:`LAUNCHER`: each leads a process group of
    its own (so that what it spawns can be ended with it), runs as
    ``run_as`` when one is given, and is killed by the kernel when the
    daemon dies.

    :ivar interpreter: the Python that runs the launcher (the daemon's own).
    :ivar getpid: the daemon's pid, asked at every spawn: ``twistd``
        without ``-n`` forks after the daemon is built.
    :ivar run_as: the user children run as (``PLUGIN_RUN_AS_USER``; only a
        daemon running as root can switch), or None for the daemon's own.
    """

    interpreter: str
    getpid: Callable[[], int] = field(default=os.getpid, eq=False, repr=False)
    run_as: RunAs | None = None

    def options(self, memory_limit: int | None = None, cgroup: str | None = None) -> str:
        """
        The launcher's ``options`` argument (``memory_limit``: bytes of
        ``RLIMIT_DATA``; ``cgroup``: the cgroup directory the child joins,
        which then enforces the limit instead).
        """
        options = ["setsid"]
        if cgroup is not None:
            # before the change of user: the cgroup is the daemon's to write
            options.append(f"cgroup={cgroup}")
        elif memory_limit is not None:
            # before the change of user: lowering a limit needs no privilege
            options.append(f"data={int(memory_limit)}")
        if self.run_as is not None:
            options.append(f"user={self.run_as.uid}:{self.run_as.gid}")
        return ",".join(options)

    def wrap(self, argv: Sequence[str], memory_limit: int | None = None, cgroup: str | None = None) -> list[str]:
        """
        The command line that runs ``argv`` (``argv[0]`` being the
        program's path) through the launcher, with at most ``memory_limit``
        bytes of data memory when one is given, or in ``cgroup``.
        """
        return [
            self.interpreter, "-I", "-S", "-c", LAUNCHER, str(self.getpid()), self.options(memory_limit, cgroup),
            *argv,
        ]


def parent_death_signal(
    platform: str = sys.platform, interpreter: str | None = sys.executable, run_as: RunAs | None = None
) -> ParentDeathSignal | None:
    """
    The launcher for this platform: None where ``PR_SET_PDEATHSIG`` does
    not exist or no interpreter is known.

    :raises ValueError: when ``run_as`` is given but there is no launcher to
        switch user (a plugin would silently run as the daemon's user).
    """
    if not platform.startswith("linux") or not interpreter:
        if run_as is not None:
            raise ValueError("running plugins as another user needs Linux")
        return None
    return ParentDeathSignal(interpreter, run_as=run_as)


def child_argv(
    parent_death: ParentDeathSignal | None,
    argv: Sequence[str],
    memory_limit: int | None = None,
    cgroup: str | None = None,
) -> list[str]:
    """
    The command line to spawn for ``argv``: through the launcher when there
    is one (which alone can enforce ``memory_limit`` or join ``cgroup``).
    """
    return list(argv) if parent_death is None else parent_death.wrap(argv, memory_limit, cgroup)
