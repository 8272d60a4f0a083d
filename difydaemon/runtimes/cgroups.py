"""
A plugin's memory limit as a cgroup v2 ``memory.max``, where the daemon can
have one.

The rlimit of :mod:`difydaemon.runtimes.memory` counts each process on its
own and only its data segment; a cgroup counts everything the plugin's
processes charge (page cache, kernel memory, the processes it spawns,
together) and the kernel's OOM killer ends it at the limit, whatever the
process is doing.  It needs what a container or a service manager rarely
gives: a cgroup v2 hierarchy, the memory controller available to the
daemon's own cgroup and enabled for its sub-cgroups
(``cgroup.subtree_control``), and the right to create those.  So
:func:`detect_memory_cgroups` looks once, at start; when anything is
missing the daemon keeps the rlimit and says why, once.

Each plugin process gets a cgroup of its own under the daemon's, made
before the spawn with ``memory.max`` (and ``memory.swap.max`` 0, so that
the limit is not a limit on RAM alone); the launcher moves the child into
it before it ``exec``s the plugin, so that nothing the plugin allocates
escapes it.  When the process has ended, ``memory.events``' ``oom_kill``
says whether the kernel killed it for memory, and the cgroup is removed.

The cgroup files are in a kernel filesystem: reading and writing them does
not wait on a disk, so they are used on the reactor thread.  The root of
the hierarchy and ``/proc/self/cgroup`` are parameters, so that the tests
run against a fake cgroupfs in a temporary directory.
"""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable

from attrs import field, frozen
from twisted.logger import Logger

log = Logger()

#: Where the cgroup v2 hierarchy is mounted.
CGROUP_ROOT = "/sys/fs/cgroup"
#: The file that says which cgroup this process is in.
SELF_CGROUP = "/proc/self/cgroup"


@frozen
class Detection:
    """
    What :func:`detect_memory_cgroups` found.

    :ivar cgroups: the :class:`MemoryCgroups` to use, or None.
    :ivar reason: why there is none (None when there is).
    """

    cgroups: MemoryCgroups | None
    reason: str | None


def _read(path: str) -> str:
    with open(path) as file:
        return file.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)


def detect_memory_cgroups(
    root: str = CGROUP_ROOT, self_cgroup: str = SELF_CGROUP, getpid: Callable[[], int] = os.getpid
) -> Detection:
    """
    Whether plugin processes can get cgroups with a memory limit: the
    daemon's cgroup v2 cgroup offers the memory controller to sub-cgroups
    (enabling it there if it may) and is writable.  Never raises.
    """
    try:
        text = _read(self_cgroup)
    except OSError as exc:
        return Detection(None, f"cannot read {self_cgroup}: {exc.strerror}")
    relative = None
    for line in text.splitlines():
        # the cgroup v2 line is "0::<path>"; v1 lines name their controllers
        if line.startswith("0::"):
            relative = line[3:].strip()
    if relative is None:
        return Detection(None, "the daemon is in no cgroup v2 hierarchy (cgroup v1)")
    if not os.path.exists(os.path.join(root, "cgroup.controllers")):
        return Detection(None, f"no cgroup v2 hierarchy is mounted at {root}")
    own = os.path.normpath(os.path.join(root, relative.lstrip("/")))
    if "," in own:
        # the launcher's options are comma-separated
        return Detection(None, f"the daemon's cgroup path {own} has a comma")
    try:
        available = _read(os.path.join(own, "cgroup.controllers")).split()
    except OSError as exc:
        return Detection(None, f"cannot read the daemon's cgroup {own}: {exc.strerror}")
    if "memory" not in available:
        return Detection(None, f"the memory controller is not delegated to the daemon's cgroup {own}")
    subtree = os.path.join(own, "cgroup.subtree_control")
    try:
        enabled = _read(subtree).split()
        if "memory" not in enabled:
            # refused (EBUSY) when the daemon's cgroup holds processes (the
            # daemon's own), unless it is the root of a cgroup namespace
            _write(subtree, "+memory")
    except OSError as exc:
        return Detection(
            None, f"cannot enable the memory controller for sub-cgroups of {own}: {exc.strerror or exc}"
        )
    if not os.access(own, os.W_OK):
        return Detection(None, f"the daemon may not create cgroups under {own}")
    return Detection(MemoryCgroups(own, prefix=f"difydaemon-{getpid()}-"), None)


@frozen
class MemoryCgroups:
    """
    Makes a cgroup per plugin process under the daemon's own.

    :ivar base: the daemon's cgroup directory.
    :ivar prefix: what the cgroups' names start with (the daemon's pid:
        two daemons in one cgroup do not collide).
    :ivar rmdir: removes a cgroup directory (``os.rmdir``; the tests'
        fake cgroupfs holds real files, which a cgroupfs directory does not).
    """

    base: str
    prefix: str = "difydaemon-"
    rmdir: Callable[[str], None] = field(default=os.rmdir, eq=False, repr=False)
    _names: itertools.count = field(factory=itertools.count, eq=False, repr=False)

    def create(self, limit: int) -> PluginCgroup:
        """
        A new cgroup whose processes may use ``limit`` bytes together and no
        swap.  ``OSError`` when it cannot be made (the caller falls back to
        the rlimit); nothing is left behind then.
        """
        while True:
            path = os.path.join(self.base, f"{self.prefix}{next(self._names)}")
            try:
                os.mkdir(path, 0o755)
                break
            except FileExistsError:
                # left by a daemon of the same pid that was SIGKILLed
                continue
        cgroup = PluginCgroup(path, self.rmdir)
        try:
            _write(os.path.join(path, "memory.max"), str(int(limit)))
        except OSError:
            cgroup.remove()
            raise
        try:
            # without it, a plugin over its limit would swap instead of ending
            _write(os.path.join(path, "memory.swap.max"), "0")
        except FileNotFoundError:
            # a kernel without swap accounting: nothing to swap to in the cgroup's name
            pass
        except OSError:
            cgroup.remove()
            raise
        return cgroup


@frozen
class PluginCgroup:
    """
    The cgroup of one plugin process.

    :ivar path: its directory (the launcher's ``cgroup=`` option).
    """

    path: str
    _rmdir: Callable[[str], None] = field(default=os.rmdir, eq=False, repr=False)

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of this cgroup for going over ``memory.max``."""
        try:
            text = _read(os.path.join(self.path, "memory.events"))
        except OSError:
            return False
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return value.strip().isdigit() and int(value) > 0
        return False

    def remove(self) -> bool:
        """
        Remove the cgroup; True when it is gone.  A cgroup still holding
        processes (ones the plugin started in sessions of their own, which
        its group's KILL missed) cannot be removed: they are killed through
        ``cgroup.kill`` and False is returned, for the caller to try again.
        """
        try:
            self._rmdir(self.path)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
        kill = os.path.join(self.path, "cgroup.kill")
        if os.path.exists(kill):
            _write(kill, "1")
        return False


def memory_enforcement(launcher: bool, detect: Callable[[], Detection] = detect_memory_cgroups):
    """
    The :class:`MemoryCgroups` plugins' memory limits use, or None for the
    launcher's rlimit; logs once which, and why not cgroups.  ``launcher``:
    whether children start through the launcher, which alone can apply
    either (without it no limit is enforced, and nothing is logged here).
    """
    if not launcher:
        return None
    found = detect()
    if found.cgroups is not None:
        log.info(
            "plugin memory limits: a cgroup v2 memory.max per plugin process, under {base}",
            base=found.cgroups.base,
        )
    else:
        log.info("plugin memory limits: RLIMIT_DATA per plugin process (no cgroup: {reason})", reason=found.reason)
    return found.cgroups
