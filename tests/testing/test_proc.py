"""Tests of :mod:`difydaemon.testing.proc`, against this machine's real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.proc import children_by_parent, command_line, descendants


class ProcessTreeTests(SynchronousTestCase):
    """Children and grandchildren of a process are found; gone ones are not."""

    def test_child_and_grandchild(self):
        """A child that started a grandchild: both are descendants of this process, with their arguments."""
        script = "import subprocess, sys, time; subprocess.Popen(['sleep', '30']); print('up', flush=True); time.sleep(30)"
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        self.assertEqual(child.stdout.readline(), b"up\n")
        child.stdout.close()
        [grandchild] = children_by_parent()[child.pid]
        self.addCleanup(_kill, grandchild)
        self.assertLessEqual({child.pid, grandchild}, descendants(os.getpid()))
        self.assertEqual(command_line(grandchild), b"sleep\x0030\x00")

    def test_gone_process(self):
        """A process that has exited has no descendants and no command line."""
        child = subprocess.Popen(["true"])
        child.wait()
        self.assertEqual(descendants(child.pid), set())
        self.assertEqual(command_line(child.pid), b"")


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
