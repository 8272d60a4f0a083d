"""
The daemon's top service: start-up order, readiness and shutdown.

Start-up: the database is reached (trying again for a while if it is not
up yet) and migrated, a cloud object store is reached and its bucket
checked, install tasks left unfinished by a previous run are
failed (in a cluster: those whose replica is gone), and only then do the
ports open: no request can meet a database without its tables (installed
plugins come up in the background; a call for one still starting waits for
it); then the replica announces itself to the others.  Shutdown: the replica
leaves the cluster, ports close; install jobs stop while the runtimes drain
for the shutdown grace period, end the sessions still open with an error and
stop their plugins -- bounded whatever the plugins do; the coordination's
connections and the database close last.

Under twistd a failed start must end the process with a non-zero status,
or a supervisor that restarts on failure sees success:
:func:`end_process_on_failed_start`.
"""

from __future__ import annotations

import atexit
import os
import sys

from twisted.application.service import MultiService, Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred
from twisted.logger import ILogObserver, Logger

from difydaemon.errors import ConfigError, CoordinationUnavailableError, DatabaseUnavailableError
from difydaemon.file_limit import raise_open_files_limit
from difydaemon.heap import release_free_heap
from difydaemon.management.installer import SHUTDOWN_MESSAGE

log = Logger()

#: seconds between two tries to reach the database at start-up
DATABASE_RETRY_PAUSE = 1.0


def _sleep(reactor, seconds: float) -> Deferred:
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class DaemonService(MultiService):
    """
    The whole daemon.  Its children are the listening services; they bind
    their ports once the database is ready, not in
    :meth:`privilegedStartService` as a MultiService's children would.

    :param reactor: the reactor.
    :param persistence: the IPersistence to migrate and close.
    :param installer: the Installer (tasks failed at start, stopped at end).
    :param runtimes: an object with ``start()`` and ``stop_all()`` returning
        Deferreds (the runtime registry, whose ``stop_all`` is bounded), or
        None.
    :param runners: what works outside the reactor (the package decoder's
        children, the thread pool), each ``stop()``-ped last, in order.
    :param http_pools: treq/Agent connection pools whose kept-alive
        connections are closed at the end.
    :param database_wait: seconds start-up keeps trying to reach an
        unavailable database (0: one try).
    :param file_limit: called once at start to raise the open-files limit
        (:func:`~difydaemon.file_limit.raise_open_files_limit`).
    :param release_memory: called once the daemon is ready, to return what
        start-up freed (:func:`~difydaemon.heap.release_free_heap`).
    :param replica: the :class:`~difydaemon.coordination.replica.Replica`
        (started once the ports are open, stopped first), or None.
    :param coordination: the :class:`~difydaemon.coordination.Coordination`
        whose connections close at the end, or None.
    :param task_sweep_interval: seconds between two looks for install tasks
        whose replica died (None: no sweeps).
    :param start_checks: callables run first at start, before any child is
        spawned (making the daemon non-dumpable, checking the ``.env``
        file's mode); one that raises is logged and does not stop the start.
    :param ready_checks: callables returning Deferreds, run once the
        database is ready and before the runtimes start (the serverless
        connector's ping); a failure fails the start.
    :param storage: the IObjectStorage; if it has a ``start()`` (a cloud
        store: reach it, check the bucket and the credentials), that runs
        after the database is ready and a failure stops the start with its
        :class:`~difydaemon.errors.ConfigError` naming the setting; its
        ``stop()``, if any, runs before the runners stop.
    The Deferreds of :attr:`ready` fail if start-up fails (with
    CancelledError if the daemon is stopped before it is ready).

    :ivar log_observer_factory: None, or ``() -> ILogObserver``: the
        daemon's log observer (``LOG_OUTPUT_FORMAT``, ``LOG_LEVEL``,
        ``LOG_FILE``), offered to the twistd application it joins.
    """

    log_observer_factory = None

    def __init__(
        self,
        reactor,
        persistence,
        installer,
        runtimes=None,
        runners=(),
        http_pools=(),
        database_wait: float = 0.0,
        start_checks=(),
        ready_checks=(),
        file_limit=raise_open_files_limit,
        release_memory=release_free_heap,
        replica=None,
        coordination=None,
        task_sweep_interval: float | None = None,
        storage=None,
    ) -> None:
        super().__init__()
        self.storage = storage
        self._file_limit = file_limit
        self._release_memory = release_memory
        self._reactor = reactor
        self.persistence = persistence
        self.installer = installer
        self.runtimes = runtimes
        self._runners = tuple(runners)
        self._http_pools = tuple(http_pools)
        self._database_wait = database_wait
        self.replica = replica
        self.coordination = coordination
        self._task_sweep_interval = task_sweep_interval
        self.start_checks = tuple(start_checks)
        self._ready_checks = list(ready_checks)
        self._state = "starting"
        #: None while starting, then True or the Failure of the start
        self._outcome = None
        self._ready_waiters: list = []

    def setServiceParent(self, parent) -> None:
        super().setServiceParent(parent)
        if self.log_observer_factory is not None:
            offer_log_observer(parent, self.log_observer_factory)

    @property
    def ready(self) -> Deferred:
        """A new Deferred that fires when the daemon serves, or fails with why it could not start."""
        d = Deferred()
        if self._outcome is None:
            self._ready_waiters.append(d)
        elif self._outcome is True:
            d.callback(None)
        else:
            d.errback(self._outcome)
        return d

    def _settle(self, outcome) -> None:
        self._outcome = outcome
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            if outcome is True:
                d.callback(None)
            else:
                d.errback(outcome)

    def status(self) -> str:
        """
        ``ok`` while the daemon serves; ``starting`` before, ``failed`` if
        start-up failed, ``stopping`` once shutdown has begun.
        """
        if self._state == "ok" and not self.running:
            return "stopping"
        return self._state

    def privilegedStartService(self) -> None:
        # MultiService would make every listening child bind its port now,
        # before the database is migrated; they bind in _start instead.
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Service.startService(self)
        # after twistd's fork, before any plugin is spawned
        for check in self.start_checks:
            try:
                check()
            except Exception:
                log.failure("start-up check {check!r} failed", check=check)
        # before any port is open: every connection costs a file descriptor
        self._file_limit()
        d = Deferred.fromCoroutine(self._start())
        d.addCallbacks(self._started, self._start_failed)

    async def _prepare_database(self) -> None:
        deadline = self._reactor.seconds() + self._database_wait
        while True:
            try:
                await self.persistence.migrate()
                return
            except DatabaseUnavailableError as exc:
                self._check_running()
                if self._reactor.seconds() + DATABASE_RETRY_PAUSE > deadline:
                    raise
                log.warn(
                    "{reason}; trying again in {pause:g} s", reason=exc.message, pause=DATABASE_RETRY_PAUSE
                )
            await _sleep(self._reactor, DATABASE_RETRY_PAUSE)
            self._check_running()

    def _check_running(self) -> None:
        if not self.running:
            raise CancelledError("the daemon was stopped before it was ready")

    async def _start(self) -> None:
        await self._prepare_database()
        self._check_running()
        start_storage = getattr(self.storage, "start", None)
        if start_storage is not None:
            # installed plugins are read from it as soon as the runtimes start
            await start_storage()
            self._check_running()
        try:
            failed = await self.installer.fail_unfinished_tasks(SHUTDOWN_MESSAGE)
        except CoordinationUnavailableError as exc:
            # which tasks are orphans is known once Redis is back: the sweeps tell
            log.warn("unfinished install tasks left for later: {reason}", reason=exc.message)
            failed = 0
        if failed:
            log.warn("marked {count} unfinished install tasks failed", count=failed)
        self._check_running()
        for check in self._ready_checks:
            await check()
            self._check_running()
        if self.runtimes is not None:
            await self.runtimes.start()
        self._check_running()
        for child in self:
            # A port that cannot be bound must fail the start, not be
            # logged while the daemon runs deaf (Twisted's strports does
            # the same).
            if hasattr(child, "_raiseSynchronously"):
                child._raiseSynchronously = True
            child.privilegedStartService()
            child.startService()
        if self.replica is not None:
            self.replica.start()
        if self._task_sweep_interval is not None:
            self.installer.start_sweeping(self._task_sweep_interval)

    def _started(self, _) -> None:
        self._state = "ok"
        log.info("difydaemon is ready")
        # what start-up allocated and freed is garbage from now on
        self._release_memory()
        self._settle(True)

    def _start_failed(self, failure) -> None:
        if failure.check(CancelledError) and not self.running:
            log.info("difydaemon was stopped before it was ready")
        elif failure.check(ConfigError):
            # the operator's setting, not a bug: no traceback to read past
            self._state = "failed"
            log.error("difydaemon could not start: {reason}", reason=str(failure.value))
        else:
            self._state = "failed"
            log.failure("difydaemon could not start", failure)
        self._settle(failure)

    @staticmethod
    def _step_failed(failure, what: str) -> None:
        log.failure("stopping {what} failed", failure, what=what)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.replica is not None:
            # first: no other replica forwards calls here any more
            await self.replica.stop()
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
        if self.coordination is not None:
            await self.coordination.close()
        await self.persistence.close()
        stop_storage = getattr(self.storage, "stop", None)
        if stop_storage is not None:
            # its retries would hand work to a pool being stopped
            stop_storage()
        for runner in self._runners:
            runner.stop()


def offer_log_observer(parent, factory) -> None:
    """
    Give a twistd application (a ``Componentized``) the observer ``factory``
    makes as its ``ILogObserver``, unless it has one: twistd starts logging
    with it after ``makeService``, and ``--logger`` still overrides it.
    """
    get = getattr(parent, "getComponent", None)
    if get is None or get(ILogObserver, None) is not None:
        return
    parent.setComponent(ILogObserver, factory())


def exit_at_interpreter_exit(status: int) -> None:
    """
    Make the process exit with ``status`` once Python is done: twistd
    returns normally (status 0) after its reactor stops, whatever stopped
    it, and has no way for a plugin to set the status.
    """

    def leave() -> None:
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(status)

    atexit.register(leave)


def end_process_on_failed_start(
    service: DaemonService, reactor, status: int = 1, exit_with=exit_at_interpreter_exit
) -> None:
    """
    The process policy of ``twistd difydaemon``: if start-up fails, stop
    the reactor and exit with ``status`` (a stop before the daemon was
    ready is an ordinary shutdown).

    :param exit_with: ``(status) -> None``, arranges the exit status
        (tests replace it).
    """

    def failed(failure):
        # the start's own log line has said why
        if failure.check(CancelledError):
            return
        exit_with(status)
        # twistd starts the service before the reactor runs
        if reactor.running:
            reactor.stop()
        else:
            reactor.callWhenRunning(reactor.stop)

    service.ready.addErrback(failed)
