"""
Tests for difydaemon.runtimes.process_table: the ``/proc`` stat line parser,
and one contract run against the real table (real processes) and the
in-memory one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from zope.interface.verify import verifyObject

from difydaemon.interfaces import IProcessTable
from difydaemon.runtimes.process_table import (
    LinuxProcessTable,
    MemoryProcessTable,
    ProcessStatus,
    is_stopped,
    parse_stat,
)
from difydaemon.testing.cases import SynchronousTestCase

STAT = b"4242 (python3) S 1 4242 4242 0 -1 4194560 1100 0 0 0 3 1 0 0 20 0 1 0 123 0 0\n"


class ParseStatTests(SynchronousTestCase):
    """A ``/proc/<pid>/stat`` line gives state, parent and group."""

    def test_fields(self):
        """State, parent pid and process group are read after the command name."""
        self.assertEqual(parse_stat(STAT), ProcessStatus("S", 1, 4242))

    def test_command_name_with_parentheses_and_blanks(self):
        """A command name holding ') T 9 9' cannot forge the fields: the last ')' ends it."""
        line = b"7 (evil) T 9 9 (x) R 3 7 7 0 -1\n"
        self.assertEqual(parse_stat(line), ProcessStatus("R", 3, 7))

    def test_every_truncation_refused_or_parsed(self):
        """Every prefix of a line either parses to the whole line's fields or raises ValueError (never a wrong status)."""
        whole = parse_stat(STAT)
        for end in range(len(STAT)):
            try:
                status = parse_stat(STAT[:end])
            except ValueError:
                continue
            self.assertEqual((status.state, status.parent), (whole.state, whole.parent), STAT[:end])

    def test_garbage(self):
        """A line with no command name is refused."""
        self.assertRaises(ValueError, parse_stat, b"")
        self.assertRaises(ValueError, parse_stat, b"12 S 1 12")

    def test_stopped_states(self):
        """T (SIGSTOP) and t (tracer) are stopped; R, S, D, Z and no process are not."""
        self.assertEqual([is_stopped(s) for s in ("T", "t", "R", "S", "D", "Z", None)], [True, True] + [False] * 5)


class ProcessTableContractMixin:
    """What every IProcessTable does; ``make()`` gives (table, leader pid, member pid) of a live group."""

    def make(self):
        raise NotImplementedError

    def wait_for(self, predicate) -> bool:
        return predicate()

    def test_interface(self):
        """The table provides IProcessTable."""
        table, _, _ = self.make()
        self.assertTrue(verifyObject(IProcessTable, table))

    def test_state_of_a_live_process(self):
        """A sleeping process is in state S."""
        table, leader, member = self.make()
        self.assertTrue(self.wait_for(lambda: table.state(leader) == "S" and table.state(member) == "S"))

    def test_no_such_process(self):
        """A pid that is no process has no state, and an empty group takes no signal."""
        table, _, _ = self.make()
        self.assertIsNone(table.state(2**22 + 17))
        self.assertFalse(table.signal_group(2**22 + 17, "KILL"))

    def test_signal_reaches_every_member(self):
        """STOP to the group stops its leader and its member alike; CONT lets them run again."""
        table, leader, member = self.make()
        self.assertTrue(table.signal_group(leader, "STOP"))
        self.assertTrue(self.wait_for(lambda: is_stopped(table.state(leader)) and is_stopped(table.state(member))))
        self.assertTrue(table.signal_group(leader, "CONT"))
        self.assertTrue(self.wait_for(lambda: not is_stopped(table.state(member))))


class LinuxProcessTableTests(ProcessTableContractMixin, SynchronousTestCase):
    """The contract against real processes: a shell leading its own group with a sleeping child."""

    def make(self):
        if not sys.platform.startswith("linux"):
            self.skipTest("/proc is Linux's")
        shell = subprocess.Popen(
            ["/bin/sh", "-c", "sleep 600 & echo $!; wait"], stdout=subprocess.PIPE, start_new_session=True
        )
        member = int(shell.stdout.readline())
        self.shell = shell
        self.addCleanup(self.end, shell)
        return LinuxProcessTable(), shell.pid, member

    def end(self, shell) -> None:
        try:
            os.killpg(shell.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        shell.wait(timeout=10)
        shell.stdout.close()

    def wait_for(self, predicate) -> bool:
        # the kernel delivers a signal asynchronously; blocking is fine here
        deadline = time.monotonic() + 10
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def test_group_gone_after_kill(self):
        """Once every member is KILLed and reaped, the group takes no more signals."""
        table, leader, member = self.make()
        self.assertTrue(table.signal_group(leader, "KILL"))
        self.shell.wait(timeout=10)
        self.assertTrue(self.wait_for(lambda: table.state(member) is None))
        self.assertTrue(self.wait_for(lambda: not table.signal_group(leader, "CONT")))


class MemoryProcessTableTests(ProcessTableContractMixin, SynchronousTestCase):
    """The contract against the in-memory table, where signals do what the test says."""

    def make(self):
        table = MemoryProcessTable()

        def obey(pid):
            def on_signal(name):
                table.set_state(pid, {"STOP": "T", "CONT": "S"}.get(name, table.state(pid)))

            return on_signal

        table.add(100, on_signal=obey(100))
        table.add(101, group=100, on_signal=obey(101))
        return table, 100, 101

    def test_signals_recorded(self):
        """Signals that reached a group are recorded in order; an unknown signal name is refused."""
        table, leader, _ = self.make()
        table.signal_group(leader, "TERM")
        table.signal_group(999, "KILL")
        self.assertEqual(table.signals, [(leader, "TERM")])
        self.assertRaises(AttributeError, table.signal_group, leader, "NOPE")
