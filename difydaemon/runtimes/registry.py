"""
The registry of plugin runtimes: which identifier runs where.

Dispatch asks it for the IPluginRuntime of an identifier; install tasks ask
it (as an IRuntimeLauncher) to bring an identifier up or down; debug
connections register and unregister themselves.  How a local identifier is
brought up is delegated to a *factory* (see :mod:`difydaemon.runtimes.launch`).
"""

from __future__ import annotations

from twisted.internet.defer import DeferredList, succeed
from twisted.logger import Logger
from zope.interface import implementer

from difydaemon.interfaces import IRuntimeLauncher
from difydaemon.runtimes.launch import SharedResult

log = Logger()


@implementer(IRuntimeLauncher)
class RuntimeRegistry:
    """
    Holds the runtimes of identifiers.

    :param reactor: the reactor.
    :param factory: brings local identifiers up: an object with
        ``launch(identifier, declaration, package, progress) ->
        Deferred[IPluginRuntime]``, ``restore() -> Deferred[list]`` (the
        runtimes of everything installed, started at daemon start) and
        ``discard(identifier) -> Deferred`` (delete its files).  None keeps
        identifiers runnable without any process (no runtime at all).
    :param runtime_type: what installations launched here record.
    """

    def __init__(self, reactor, factory=None, runtime_type: str = "local") -> None:
        self._reactor = reactor
        self._factory = factory
        self.runtime_type = runtime_type
        self._runtimes: dict = {}
        self._launching: dict = {}

    # -- lookups ----------------------------------------------------------

    def get(self, plugin_unique_identifier: str):
        """The IPluginRuntime of an identifier, or None."""
        return self._runtimes.get(plugin_unique_identifier)

    def register(self, runtime) -> None:
        """Make ``runtime`` the one of its identifier (debug connections)."""
        self._runtimes[runtime.plugin_unique_identifier] = runtime

    def unregister(self, runtime) -> None:
        """Forget ``runtime`` if it is still the registered one."""
        if self._runtimes.get(runtime.plugin_unique_identifier) is runtime:
            del self._runtimes[runtime.plugin_unique_identifier]

    def pool_status(self) -> dict:
        """The ``pool_status`` of ``/health/check``: runtimes ready or not."""
        total = len(self._runtimes)
        ready = sum(1 for runtime in self._runtimes.values() if runtime.is_ready())
        return {"free": ready, "busy": total - ready, "total": total}

    # -- IRuntimeLauncher ---------------------------------------------------

    def launch(self, plugin_unique_identifier, declaration, package, progress):
        """
        Bring an identifier up (once: concurrent launches share the work).
        Deferred[None].
        """
        if plugin_unique_identifier in self._runtimes or self._factory is None:
            return succeed(None)
        pending = self._launching.get(plugin_unique_identifier)
        if pending is not None:
            return pending.addWaiter()
        d = self._factory.launch(plugin_unique_identifier, declaration, package, progress)

        def launched(runtime):
            self._runtimes[plugin_unique_identifier] = runtime
            return None

        def settled(outcome):
            self._launching.pop(plugin_unique_identifier, None)
            return outcome

        d.addCallback(launched)
        d.addBoth(settled)
        shared = SharedResult(d)
        if not shared.done:
            self._launching[plugin_unique_identifier] = shared
        return shared.addWaiter()

    def stop(self, plugin_unique_identifier):
        """Stop an identifier's runtime and discard its files. Deferred[None]."""
        runtime = self._runtimes.pop(plugin_unique_identifier, None)
        d = runtime.stop() if runtime is not None else succeed(None)
        if self._factory is not None:
            d.addCallback(lambda _: self._factory.discard(plugin_unique_identifier))
        return d

    # -- daemon life ---------------------------------------------------------

    def start(self):
        """
        Bring back what was installed before the daemon (re)started, in the
        background: the daemon does not wait for plugins to answer.
        """
        if self._factory is not None:
            d = self._factory.restore()

            def restored(runtimes):
                for runtime in runtimes:
                    self._runtimes.setdefault(runtime.plugin_unique_identifier, runtime)

            d.addCallback(restored)
            d.addErrback(lambda f: log.failure("restoring installed plugins failed", f))
        return succeed(None)

    def stop_all(self):
        """Drain and stop every runtime. Deferred[None]."""
        runtimes = list(self._runtimes.values())
        self._runtimes.clear()
        return DeferredList([r.stop() for r in runtimes], consumeErrors=True).addCallback(lambda _: None)
