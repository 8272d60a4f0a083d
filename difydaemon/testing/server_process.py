"""
:class:`ServerProcess`: one server program a test starts, stops, kills,
freezes and thaws at will (a private Redis, an S3-compatible server), so
that outage tests never touch the machine's shared services.

The program is started through the daemon's parent-death launcher, so it
dies with the test process even when that is killed; :meth:`destroy` runs
at clean-up and, through ``atexit``, after an interrupted run.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess

from twisted.internet.task import deferLater

from difydaemon.runtimes.parent_death import child_argv, parent_death_signal
from difydaemon.testing.postgres import free_port


class ServerProcess:
    """
    A server process on a free port of 127.0.0.1.  Subclasses say how to
    start it (:meth:`_argv`, :meth:`_environment`), how to know it answers
    (:meth:`_answers`) and what to clean up (:meth:`_remove_files`).

    :ivar port: its TCP port.
    :ivar frozen: whether it is stopped by ``SIGSTOP``.
    """

    host = "127.0.0.1"
    #: what the failure message of a start calls the program
    name = "server"

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self.port = free_port()
        self._process: subprocess.Popen | None = None
        self._destroyed = False
        self.frozen = False
        atexit.register(self.destroy)

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _environment(self) -> dict | None:
        """The program's environment; None for the test's."""
        return None

    def _answers(self) -> bool:
        raise NotImplementedError

    def _output(self):
        """Where the program's output goes (a file object), or None to drop it."""
        return None

    def server_log(self) -> str:
        """What the server logged (for failure messages)."""
        return ""

    def _remove_files(self) -> None:
        """Delete what the server wrote (called once, by :meth:`destroy`)."""

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    async def start(self, timeout: float = 10.0) -> None:
        """Start the server (again) and wait until it answers."""
        if self._destroyed:
            raise RuntimeError("this server has been destroyed")
        if self.frozen:
            self.thaw()
        if self.running:
            return
        output = self._output()
        self._process = subprocess.Popen(
            child_argv(parent_death_signal(), self._argv()),
            stdin=subprocess.DEVNULL,
            stdout=output or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if output else subprocess.DEVNULL,
            env=self._environment(),
        )
        waited = 0.0
        while not self._answers():
            if not self.running or waited > timeout:
                raise RuntimeError(f"{self.name} did not start on port {self.port}:\n{self.server_log()}")
            await deferLater(self._reactor, 0.02, lambda: None)
            waited += 0.02

    async def _wait_exit(self) -> None:
        while self.running:
            await deferLater(self._reactor, 0.02, lambda: None)

    async def stop(self) -> None:
        """Stop the server (SIGTERM) and wait until it is gone; the port stays free for a restart."""
        if self.frozen:
            self.thaw()
        if self.running:
            self._process.terminate()
            await self._wait_exit()

    async def kill(self) -> None:
        """Kill the server (SIGKILL), as a crash would."""
        if self.frozen:
            self.thaw()
        if self.running:
            self._process.kill()
            await self._wait_exit()

    def freeze(self) -> None:
        """``SIGSTOP`` the server: it accepts TCP connections but never answers."""
        if self.running:
            os.kill(self._process.pid, signal.SIGSTOP)
            self.frozen = True

    def thaw(self) -> None:
        """``SIGCONT`` what :meth:`freeze` stopped."""
        if self._process is not None and self.frozen:
            os.kill(self._process.pid, signal.SIGCONT)
        self.frozen = False

    def destroy(self) -> None:
        """Kill the server at once and delete its files (blocking; safe to call twice)."""
        if self._destroyed:
            return
        self._destroyed = True
        try:
            if self._process is not None and self._process.poll() is None:
                self.thaw()
                self._process.kill()
                self._process.wait(timeout=30)
        finally:
            self._remove_files()
            atexit.unregister(self.destroy)
