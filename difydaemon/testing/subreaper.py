"""
Process trees for tests of what outlives a killed parent (Linux only).

An orphan is normally re-parented to PID 1, and the SDK ends itself when its
parent becomes PID 1, which would hide a plugin that outlived its daemon.
Under systemd (``--user``), ``tini -s`` or a container shim the orphan goes
to a *subreaper* instead and lives on.  :func:`subreaper_argv` reproduces
that: the command runs under a small Python process that has
``PR_SET_CHILD_SUBREAPER`` set, reaps every descendant that ends, and exits
only when none is left -- so its own exit means the whole tree is gone.

The ``/proc`` readers tell a running process from a zombie or a missing one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

#: ``<python> -c SUBREAPER <program> <args...>``: 36 is ``PR_SET_CHILD_SUBREAPER``.
SUBREAPER = """\
import ctypes, os, subprocess, sys
if ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) != 0:
    sys.exit("cannot become a child subreaper")
subprocess.Popen(sys.argv[1:])
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def subreaper_argv(argv: Sequence[str]) -> list[str]:
    """The command line that runs ``argv`` (``argv[0]`` a path) under a subreaper."""
    return [sys.executable, "-c", SUBREAPER, *argv]


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            # the command name, in parentheses, may itself hold ")" and blanks
            return stat.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``R``, ``S``, ``Z``...), or None when there is no such process."""
    fields = _stat_fields(pid)
    return None if not fields else fields[0].decode()


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has ended)."""
    return process_state(pid) not in (None, "Z", "X")


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid``, or None when there is no such process."""
    fields = _stat_fields(pid)
    return None if fields is None or len(fields) < 2 else int(fields[1])


def children_of(pid: int) -> list[int]:
    """The running processes whose parent is ``pid``."""
    children = []
    for name in os.listdir("/proc"):
        if name.isdigit() and parent_pid(int(name)) == pid and is_running(int(name)):
            children.append(int(name))
    return sorted(children)


def command_line(pid: int) -> list[str]:
    """The arguments of ``pid`` (empty when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return [part.decode("utf-8", "replace") for part in cmdline.read().split(b"\0") if part]
    except (FileNotFoundError, ProcessLookupError):
        return []
