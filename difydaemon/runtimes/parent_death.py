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

Two consequences:

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

#: The launcher's code: ``<python> -I -S -c LAUNCHER <daemon pid> <program> <args...>``.
#: 1 is ``PR_SET_PDEATHSIG``, 9 ``SIGKILL``.  It never raises: a missing
#: ``ctypes`` or a refused ``prctl`` is reported on stderr and the program
#: still runs; a program that cannot be executed exits 127 with one line.
LAUNCHER = """\
import os, sys
parent, argv = int(sys.argv[1]), sys.argv[2:]
try:
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0) != 0:
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
class ParentDeathSignal:
    """
    Starts children through :data:`LAUNCHER`, so that the kernel kills them
    when the daemon dies.

    :ivar interpreter: the Python that runs the launcher (the daemon's own).
    :ivar getpid: the daemon's pid, asked at every spawn: ``twistd``
        without ``-n`` forks after the daemon is built.
    """

    interpreter: str
    getpid: Callable[[], int] = field(default=os.getpid, eq=False, repr=False)

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """The command line that runs ``argv`` (``argv[0]`` being the program's path) through the launcher."""
        return [self.interpreter, "-I", "-S", "-c", LAUNCHER, str(self.getpid()), *argv]


def parent_death_signal(platform: str = sys.platform, interpreter: str | None = sys.executable) -> ParentDeathSignal | None:
    """The launcher for this platform: None where ``PR_SET_PDEATHSIG`` does not exist or no interpreter is known."""
    if not platform.startswith("linux") or not interpreter:
        return None
    return ParentDeathSignal(interpreter)


def child_argv(parent_death: ParentDeathSignal | None, argv: Sequence[str]) -> list[str]:
    """The command line to spawn for ``argv``: through the launcher when there is one."""
    return list(argv) if parent_death is None else parent_death.wrap(argv)
