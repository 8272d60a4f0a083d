"""
The daemon's top service: start-up order, readiness and shutdown.

Start-up: the database is migrated and ready, install tasks left unfinished
by a previous run are failed, and only then do the ports open (installed
plugins come up in the background; a call for one still starting waits for
it).  Shutdown: ports close first; install jobs stop while the runtimes
drain for the shutdown grace period, end the sessions still open with an
error and stop their plugins -- bounded whatever the plugins do; the
database closes last.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import Logger

from difydaemon.management.installer import SHUTDOWN_MESSAGE

log = Logger()


class DaemonService(MultiService):
    """
    The whole daemon.  Its children are the listening services; they start
    only after :meth:`prepare` has finished.

    :param reactor: the reactor (stopped if start-up fails).
    :param persistence: the IPersistence to migrate and close.
    :param installer: the Installer (tasks failed at start, stopped at end).
    :param runtimes: an object with ``start()`` and ``stop_all()`` returning
        Deferreds (the runtime registry, whose ``stop_all`` is bounded), or
        None.
    :param runners: blocking-work runners to stop last.
    :param http_pools: treq/Agent connection pools whose kept-alive
        connections are closed at the end.
    """

    def __init__(self, reactor, persistence, installer, runtimes=None, runners=(), http_pools=()) -> None:
        super().__init__()
        self._reactor = reactor
        self.persistence = persistence
        self.installer = installer
        self.runtimes = runtimes
        self._runners = tuple(runners)
        self._http_pools = tuple(http_pools)
        self.ready: Deferred = Deferred()

    def startService(self) -> None:
        Service.startService(self)
        d = Deferred.fromCoroutine(self._start())
        d.addCallbacks(self.ready.callback, self._start_failed)

    async def _start(self) -> None:
        await self.persistence.migrate()
        failed = await self.installer.fail_unfinished_tasks(SHUTDOWN_MESSAGE)
        if failed:
            log.warn("marked {count} unfinished install tasks failed", count=failed)
        if self.runtimes is not None:
            await self.runtimes.start()
        for child in self:
            child.startService()
        log.info("difydaemon is ready")

    def _start_failed(self, failure) -> None:
        log.failure("difydaemon could not start", failure)
        self.ready.errback(failure)
        self.ready.addErrback(lambda _: None)
        if self._reactor.running:
            self._reactor.stop()

    @staticmethod
    def _step_failed(failure, what: str) -> None:
        log.failure("stopping {what} failed", failure, what=what)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await DeferredList(
            [maybeDeferred(child.stopService) for child in reversed(list(self)) if child.running],
            consumeErrors=True,
        )
        # in parallel: the runtimes' drain is the part a stop timeout is
        # counted against, and it must not wait behind the task updates
        steps = [maybeDeferred(self.installer.stop).addErrback(self._step_failed, "install jobs")]
        if self.runtimes is not None:
            steps.append(maybeDeferred(self.runtimes.stop_all).addErrback(self._step_failed, "plugin runtimes"))
        await DeferredList(steps)
        for pool in self._http_pools:
            # kept-alive connections to Dify would outlive the daemon otherwise
            await pool.closeCachedConnections()
        await self.persistence.close()
        for runner in self._runners:
            runner.stop()
