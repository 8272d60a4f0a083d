"""
The process table as the kernel shows it (:class:`LinuxProcessTable`, from
``/proc``) and an in-memory one for tests (:class:`MemoryProcessTable`),
both providing :class:`~difydaemon.interfaces.IProcessTable`.

The supervisor of local plugins uses it to tell a stopped plugin (SIGSTOP,
a debugger) from a busy one, and to signal a plugin's whole process group:
what the plugin spawned itself is stopped and killed with it.
"""

from __future__ import annotations

import os
import signal as signal_module

from attrs import frozen
from zope.interface import implementer

from difydaemon.interfaces import IProcessTable

#: The states of a process that will not run until it gets SIGCONT.
STOPPED_STATES = frozenset({"T", "t"})


@frozen
class ProcessStatus:
    """
    The fields of one ``/proc/<pid>/stat`` line a supervisor needs.

    :ivar state: the state letter (``R``, ``S``, ``T``...).
    :ivar parent: the parent's pid.
    :ivar group: the process group id.
    """

    state: str
    parent: int
    group: int


def parse_stat(line: bytes) -> ProcessStatus:
    """
    Parse a ``/proc/<pid>/stat`` line.  The command name, in parentheses,
    may itself hold blanks and ``)``: the fields are those after its last
    ``)``.

    :raises ValueError: if the line is not of that form.
    """
    head, sep, tail = line.rpartition(b")")
    fields = tail.split()
    if not sep or b"(" not in head or len(fields) < 3:
        raise ValueError(f"not a /proc stat line: {line[:200]!r}")
    return ProcessStatus(fields[0].decode("ascii", "replace"), int(fields[1]), int(fields[2]))


def is_stopped(state: str | None) -> bool:
    """Whether ``state`` is a stopped process's (it runs no code until continued)."""
    return state in STOPPED_STATES


def _signal_number(name: str) -> int:
    return int(getattr(signal_module, "SIG" + name))


@implementer(IProcessTable)
class LinuxProcessTable:
    """
    :class:`IProcessTable` read from ``/proc`` (Linux).

    Reading ``/proc/<pid>/stat`` does no disk I/O (the kernel writes the
    line on demand), so it runs on the reactor thread.

    :param proc: where procfs is mounted.
    :param killpg: ``os.killpg`` (tests replace it).
    """

    def __init__(self, proc: str = "/proc", killpg=os.killpg) -> None:
        self._proc = proc
        self._killpg = killpg

    def status(self, pid: int) -> ProcessStatus | None:
        """The :class:`ProcessStatus` of ``pid``, or None when there is no such process."""
        try:
            with open(os.path.join(self._proc, str(pid), "stat"), "rb") as stat:
                return parse_stat(stat.read())
        except (OSError, ValueError):
            return None

    def state(self, pid: int) -> str | None:
        """The state letter of ``pid``, or None when there is no such process."""
        status = self.status(pid)
        return None if status is None else status.state

    def signal_group(self, pgid: int, name: str) -> bool:
        """Signal every process of the group ``pgid``; False when none is left."""
        try:
            self._killpg(pgid, _signal_number(name))
        except ProcessLookupError:
            return False
        return True


@implementer(IProcessTable)
class MemoryProcessTable:
    """
    :class:`IProcessTable` kept in memory: the test says which processes
    exist, in which state and group, and what a signal does to them.

    :ivar signals: every ``(pgid, name)`` sent to a group that had a
        process, in order.
    """

    def __init__(self) -> None:
        self._processes: dict[int, list] = {}
        self.signals: list[tuple[int, str]] = []

    def add(self, pid: int, group: int | None = None, state: str = "S", on_signal=None) -> None:
        """
        A process ``pid`` in ``group`` (default: its own) and ``state``;
        ``on_signal(name)`` is called for each signal it receives.
        """
        self._processes[pid] = [group if group is not None else pid, state, on_signal]

    def set_state(self, pid: int, state: str) -> None:
        """The process ``pid`` is now in ``state``."""
        self._processes[pid][1] = state

    def remove(self, pid: int) -> None:
        """The process ``pid`` has ended and been reaped."""
        self._processes.pop(pid, None)

    def members(self, pgid: int) -> list[int]:
        """The pids of the group ``pgid``."""
        return sorted(pid for pid, (group, _, _) in self._processes.items() if group == pgid)

    def state(self, pid: int) -> str | None:
        """The state of ``pid``, or None when there is no such process."""
        process = self._processes.get(pid)
        return None if process is None else process[1]

    def signal_group(self, pgid: int, name: str) -> bool:
        """Record the signal and hand it to each member; False when the group is empty."""
        _signal_number(name)
        members = self.members(pgid)
        if not members:
            return False
        self.signals.append((pgid, name))
        for pid in members:
            process = self._processes.get(pid)
            if process is not None and process[2] is not None:
                process[2](name)
        return True
