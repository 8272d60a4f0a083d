"""
Fake runtime launchers for tests of install tasks.

:class:`RecordingLauncher` implements IRuntimeLauncher without running
anything: it records launches and stops, and can be told to fail or to wait.
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
        """Record the stop."""
        self.stopped.append(plugin_unique_identifier)
        self.running.discard(plugin_unique_identifier)
        return succeed(None)
