"""
The registry of plugin runtimes: which identifier runs where.

It implements IRuntimeLauncher for install tasks.  Until the local runtime
is plugged in, launching only records the identifier as runnable.
"""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.logger import Logger
from zope.interface import implementer

from difydaemon.interfaces import IRuntimeLauncher

log = Logger()


@implementer(IRuntimeLauncher)
class RuntimeRegistry:
    """
    Holds the runtimes of installed identifiers.

    :param reactor: the reactor.
    """

    runtime_type = "local"

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._runtimes: dict = {}

    def launch(self, plugin_unique_identifier, declaration, package, progress):
        """Record the identifier as runnable."""
        self._runtimes[plugin_unique_identifier] = declaration
        return succeed(None)

    def stop(self, plugin_unique_identifier):
        """Forget the identifier."""
        self._runtimes.pop(plugin_unique_identifier, None)
        return succeed(None)

    def start(self):
        """Nothing to bring back yet."""
        return succeed(None)

    def stop_all(self):
        """Forget every runtime."""
        self._runtimes.clear()
        return succeed(None)

    def pool_status(self) -> dict:
        """The ``pool_status`` of ``/health/check``."""
        return {"free": 0, "busy": 0, "total": len(self._runtimes)}
