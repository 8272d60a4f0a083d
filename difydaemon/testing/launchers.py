"""
Fake runtime launchers for tests of install tasks and of the registry.

:class:`RecordingLauncher` implements IRuntimeLauncher without running
anything: it records launches and stops, and can be told to fail or to wait.

:class:`FakeRuntimeFactory` stands where the registry's
:class:`~difydaemon.runtimes.launch.LocalRuntimeFactory` does: every
attempt waits until the test settles it with a runtime or a failure.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from difydaemon.errors import InternalServerError
from difydaemon.interfaces import IRuntimeLauncher


@implementer(IRuntimeLauncher)
class RecordingLauncher:
    """
    Records what it is asked; succeeds at once unless told otherwise.

    :ivar launched: identifiers launched, in order.
    :ivar stopped: identifiers stopped, in order.
    :ivar running: identifiers currently "running".
    """

    runtime_type = "local"

    def __init__(self) -> None:
        self.launched: list[str] = []
        self.stopped: list[str] = []
        self.running: set[str] = set()
        self.failures: dict[str, str] = {}
        self.held: dict[str, Deferred] = {}
        self.hold_all = False
        #: when true, stops stay pending until the test fires them (a runtime draining its sessions)
        self.hold_stops = False
        self.held_stops: dict[str, Deferred] = {}
        self.progress_lines: list[str] = []

    def fail(self, identifier: str, message: str) -> None:
        """Make the next launches of ``identifier`` fail with ``message``."""
        self.failures[identifier] = message

    def launch(self, plugin_unique_identifier, declaration, package, progress):
        """Record the launch; fail, hold or succeed."""
        self.launched.append(plugin_unique_identifier)
        progress("launching")
        self.progress_lines.append("launching")
        if plugin_unique_identifier in self.failures:
            return Deferred.fromCoroutine(self._raise(self.failures[plugin_unique_identifier]))
        if self.hold_all:
            d = Deferred()
            self.held[plugin_unique_identifier] = d
            d.addCallback(lambda _: self.running.add(plugin_unique_identifier))
            return d
        self.running.add(plugin_unique_identifier)
        return succeed(None)

    async def _raise(self, message):
        raise InternalServerError(message)

    def release(self, identifier: str) -> None:
        """Let a held launch succeed."""
        self.held.pop(identifier).callback(None)

    def stop(self, plugin_unique_identifier):
        """Record the stop; held (see ``hold_stops``) or done at once."""
        self.stopped.append(plugin_unique_identifier)
        self.running.discard(plugin_unique_identifier)
        if self.hold_stops:
            d = self.held_stops[plugin_unique_identifier] = Deferred()
            return d
        return succeed(None)


class FakeRuntimeFactory:
    """
    A runtime factory for a :class:`~difydaemon.runtimes.registry.RuntimeRegistry`
    whose attempts the test settles.

    :param installed: what ``installed()`` reports (restored at start).

    :ivar attempts: ``(identifier, how)`` of every attempt, in order; ``how``
        is ``"install"`` (``launch``), ``"installed"``
        (``launch_installed``) or ``"build"`` (``build_installed``).
    :ivar pending: the unsettled attempt of each identifier.
    :ivar cancelled: identifiers whose attempt was cancelled.
    :ivar discarded: identifiers whose files were discarded.
    :ivar not_local: identifiers ``launch_installed`` answers None for (not
        a local plugin).
    """

    def __init__(self, installed=()) -> None:
        self.attempts: list[tuple[str, str]] = []
        self.pending: dict[str, Deferred] = {}
        self.cancelled: list[str] = []
        self.discarded: list[str] = []
        self.not_local: set[str] = set()
        self._installed = list(installed)

    def _attempt(self, identifier: str, how: str) -> Deferred:
        self.attempts.append((identifier, how))
        d = Deferred(lambda _: self.cancelled.append(identifier))
        self.pending[identifier] = d
        return d

    def launch(self, plugin_unique_identifier, declaration, package, progress):
        """An install's attempt: Deferred[runtime], settled by the test."""
        return self._attempt(plugin_unique_identifier, "install")

    def launch_installed(self, plugin_unique_identifier, progress):
        """A restore's or retry's attempt; None at once for ``not_local`` ones."""
        if plugin_unique_identifier in self.not_local:
            return succeed(None)
        return self._attempt(plugin_unique_identifier, "installed")

    def build_installed(self, plugin_unique_identifier, progress):
        """A build without a launch (an idle plugin made ready ahead): Deferred[None], settled by the test."""
        return self._attempt(plugin_unique_identifier, "build")

    def installed(self):
        """Deferred[the identifiers given at construction]."""
        return succeed(list(self._installed))

    def discard(self, plugin_unique_identifier):
        """Record the discard."""
        self.discarded.append(plugin_unique_identifier)
        return succeed(None)

    def succeed(self, identifier: str, runtime):
        """The pending attempt of ``identifier`` brings ``runtime`` up; returns it."""
        self.pending.pop(identifier).callback(runtime)
        return runtime

    def fail(self, identifier: str, message: str) -> None:
        """The pending attempt of ``identifier`` fails with ``message``."""
        self.pending.pop(identifier).errback(InternalServerError(message))

    def count(self, identifier: str) -> int:
        """How many attempts ``identifier`` had."""
        return sum(1 for attempted, _ in self.attempts if attempted == identifier)
