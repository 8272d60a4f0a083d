"""
The registry of plugin runtimes: which identifier runs where, and the
supervision of local identifiers from one launch to the next.

Dispatch asks it for the IPluginRuntime of an identifier, or to wait
(bounded) until one is ready; install tasks ask it (as an IRuntimeLauncher)
to bring an identifier up or down; debug connections register and
unregister themselves.  How a local identifier is brought up is delegated
to a *factory* (see :mod:`difydaemon.runtimes.launch`).

Every installed local identifier has a supervision record in one state:

- ``launching``: an attempt is under way (unpack, venv, first heartbeat);
- ``running``: its runtime is registered (its instances may be restarting:
  a runtime restarts its crashed or hung instances itself);
- ``backing_off``: the last attempt failed, or the runtime gave up after
  repeated crashes; the record keeps why, and the next attempt comes after
  a capped exponential delay (1 s doubling to 5 min), forever -- fixing the
  cause (a dependency, the network) brings the plugin back without an
  uninstall or a restart;
- ``idle``: its runtime had no session for ``PLUGIN_IDLE_TIMEOUT`` and was
  stopped; the next request launches it again and waits for it.  The
  runtime leaves the table the moment it goes idle, before its processes
  end, so a request arriving during the stop starts a new runtime instead
  of finding one that refuses sessions.

A request for an identifier that is backing off pulls its next attempt
forward; an identifier installed but unknown here (its restore failed to
list it) is launched on demand.  One attempt at a time per identifier, and
on-demand attempts at least ``on_demand_interval`` apart, so that a flood
of requests cannot make a broken plugin spin.  An install of an identifier
that is backing off tries at once and reports the real outcome.  An
identifier whose first install fails gets no record: nothing was installed.

At daemon start every installed plugin is restored in the background, each
registered as soon as it is up; a request for one still starting waits for
it.  With idle stop on (``restore_idle``), restored plugins start ``idle``
instead: launching them all only to stop them an idle timeout later would
hold every plugin in memory at once, the very thing idle stop is for, and a
request would wait behind the launches of plugins nobody asked for.  The
same holds for a plugin another replica installed or upgraded
(:meth:`RuntimeRegistry.prepare`) and for one a reconciliation finds
missing: it is left idle too, but built in the background first (unpacked,
its venv made, no process) when the factory can build without launching,
so that its first call here does not pay for the venv.  At daemon stop
every runtime drains for the shutdown grace period, all in parallel, then
the sessions still open fail with "the plugin daemon is shutting down" and
the plugins are stopped; :meth:`RuntimeRegistry.stop_all` fires within a
bound whatever the plugins do.
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from difydaemon.errors import DaemonError, InternalServerError
from difydaemon.interfaces import IRuntimeLauncher
from difydaemon.runtimes.launch import SharedResult

log = Logger()

LAUNCHING = "launching"
RUNNING = "running"
BACKING_OFF = "backing_off"
IDLE = "idle"

NO_RUNTIME_MESSAGE = "failed to get plugin runtime"
SHUTDOWN_MESSAGE = "the plugin daemon is shutting down"
UNINSTALLED_MESSAGE = "the plugin was uninstalled"


@frozen
class RetryPolicy:
    """
    When a local identifier that failed is tried again.

    :ivar min_delay: seconds after the first failure.
    :ivar max_delay: the cap of the doubling delay.
    :ivar factor: what the delay is multiplied by after each failure.
    :ivar on_demand_interval: the shortest time between the end of one
        attempt and an attempt a request asks for.
    """

    min_delay: float = 1.0
    max_delay: float = 300.0
    factor: float = 2.0
    on_demand_interval: float = 5.0

    def delay(self, failures: int) -> float:
        """Seconds before the next attempt after ``failures`` failures in a row."""
        # the exponent is bounded: retries go on forever
        return min(self.min_delay * self.factor ** min(max(failures - 1, 0), 64), self.max_delay)


@frozen
class RuntimeStatus:
    """
    What the registry knows of one supervised identifier.

    :ivar state: ``launching``, ``running``, ``backing_off`` or ``idle``.
    :ivar failures: failed attempts (or runtimes given up) in a row.
    :ivar last_error: why the last one failed, or None.
    :ivar next_attempt_at: ``reactor.seconds()`` of the next scheduled
        attempt while backing off, else None.
    """

    plugin_unique_identifier: str
    state: str
    failures: int
    last_error: str | None
    next_attempt_at: float | None


class _Record:
    """The supervision of one local identifier."""

    __slots__ = (
        "identifier",
        "supervised",
        "state",
        "runtime",
        "attempt",
        "failures",
        "last_error",
        "timer",
        "last_attempt_end",
        "build",
    )

    def __init__(self, identifier: str, supervised: bool) -> None:
        self.identifier = identifier
        #: False while the first install of the identifier is under way:
        #: its failure leaves nothing to supervise
        self.supervised = supervised
        self.state = LAUNCHING
        self.runtime = None
        self.attempt: SharedResult | None = None
        self.failures = 0
        self.last_error: str | None = None
        self.timer = None
        self.last_attempt_end: float | None = None
        #: the background build of an idle identifier (no process), if under way
        self.build: SharedResult | None = None


class _Waiter:
    __slots__ = ("deferred", "timer")

    def __init__(self) -> None:
        self.deferred: Deferred | None = None
        self.timer = None


@implementer(IRuntimeLauncher)
class RuntimeRegistry:
    """
    Holds the runtimes of identifiers and supervises the local ones.

    :param reactor: the reactor.
    :param factory: brings local identifiers up: an object with
        ``launch(identifier, declaration, package, progress) ->
        Deferred[IPluginRuntime]``, ``launch_installed(identifier,
        progress) -> Deferred[IPluginRuntime | None]`` (None: not a local
        plugin), ``installed() -> Deferred[list of identifiers]`` (what to
        restore at daemon start) and ``discard(identifier) -> Deferred``
        (delete its files); optionally ``build_installed(identifier,
        progress) -> Deferred[None]`` (its files and venv, no process: an
        idle plugin made ready ahead of its first request).  None keeps
        identifiers runnable without any process (no runtime at all).
    :param runtime_type: what installations launched here record.
    :param retry_policy: when failed identifiers are tried again.
    :param shutdown_grace_period: seconds :meth:`stop_all` lets open
        sessions finish (``SHUTDOWN_GRACE_PERIOD``).
    :param stop_timeout: seconds after the grace period that
        :meth:`stop_all` waits for plugins to end (TERM, KILL) before it
        gives up on them and fires anyway.
    :param restore_idle: whether the plugins restored at daemon start,
        installed by another replica or found missing by a reconciliation
        are left ``idle``, to be launched by their first request
        (``PLUGIN_IDLE_TIMEOUT`` is set), instead of launched at once.
    """

    def __init__(
        self,
        reactor,
        factory=None,
        runtime_type: str = "local",
        retry_policy: RetryPolicy = RetryPolicy(),
        shutdown_grace_period: float = 6.0,
        stop_timeout: float = 5.0,
        restore_idle: bool = False,
    ) -> None:
        self._reactor = reactor
        self.restore_idle = restore_idle
        self._factory = factory
        self.runtime_type = runtime_type
        self.retry_policy = retry_policy
        self.shutdown_grace_period = shutdown_grace_period
        self.stop_timeout = stop_timeout
        self._runtimes: dict = {}
        self._records: dict[str, _Record] = {}
        self._waiters: dict[str, list[_Waiter]] = {}
        self._stopping = False
        #: told ``registered(runtime)`` / ``unregistered(runtime)`` when a
        #: debug connection's runtime comes or goes (the cluster's plugin claims)
        self.listeners: list = []
        # local identifiers a reconciliation found uninstalled once: stopped
        # when the next one finds them so again
        self._absent: set[str] = set()
        # runtimes stopped for idleness whose processes have not ended yet
        self._idle_stops: set = set()

    @property
    def factory(self):
        """What brings local identifiers up, or None."""
        return self._factory

    # -- lookups ----------------------------------------------------------

    def get(self, plugin_unique_identifier: str):
        """The IPluginRuntime of an identifier, or None."""
        return self._runtimes.get(plugin_unique_identifier)

    def register(self, runtime) -> None:
        """Make ``runtime`` the one of its identifier (debug connections)."""
        identifier = runtime.plugin_unique_identifier
        self._runtimes[identifier] = runtime
        if hasattr(runtime, "on_ready"):
            runtime.on_ready = self._registered_ready
        self._tell("registered", runtime)
        self._notify(identifier)

    def unregister(self, runtime) -> None:
        """Forget ``runtime`` if it is still the registered one."""
        identifier = runtime.plugin_unique_identifier
        if self._runtimes.get(identifier) is runtime:
            del self._runtimes[identifier]
            self._tell("unregistered", runtime)
            if self._waiters.get(identifier):
                self._demand(identifier)

    def _tell(self, event: str, runtime) -> None:
        for listener in self.listeners:
            try:
                getattr(listener, event)(runtime)
            except Exception:
                log.failure("a runtime listener failed on {event}", event=event)

    def runtimes(self) -> list:
        """The registered runtimes (a copy: for reading, e.g. by metrics)."""
        return list(self._runtimes.values())

    def launching(self) -> list[str]:
        """The supervised identifiers with no runtime yet (launching or backing off), idle ones aside."""
        return [record.identifier for record in self._records.values() if record.runtime is None and record.state != IDLE]

    def idle(self) -> list[str]:
        """The supervised identifiers stopped (or restored) idle, to be launched by their next request."""
        return [record.identifier for record in self._records.values() if record.state == IDLE]

    def status(self, plugin_unique_identifier: str) -> RuntimeStatus | None:
        """The supervision state of a local identifier, or None if it has none."""
        record = self._records.get(plugin_unique_identifier)
        if record is None:
            return None
        timer = record.timer
        return RuntimeStatus(
            plugin_unique_identifier=record.identifier,
            state=record.state,
            failures=record.failures,
            last_error=record.last_error,
            next_attempt_at=timer.getTime() if timer is not None and timer.active() else None,
        )

    def pool_status(self) -> dict:
        """
        The ``pool_status`` of ``/health/check``: ``free`` counts plugin
        instances that take new sessions; ``busy`` the others -- instances
        starting, restarting, hung or draining, and identifiers launching
        or backing off (one each).  A runtime without instances (a debug
        connection) counts as one.
        """
        free = busy = 0
        for runtime in self._runtimes.values():
            ready = runtime.is_ready()
            instances = getattr(runtime, "instances", None)
            if instances is None:
                free, busy = (free + 1, busy) if ready else (free, busy + 1)
                continue
            serving = len(runtime.ready_instances) if ready else 0
            free += serving
            busy += max(len(instances), serving, 1) - serving
        busy += sum(1 for record in self._records.values() if record.runtime is None and record.state != IDLE)
        return {"free": free, "busy": busy, "total": free + busy}

    # -- waiting ------------------------------------------------------------

    def when_ready(self, plugin_unique_identifier: str, timeout: float) -> Deferred:
        """
        The runtime of an identifier once it can take a session.

        An identifier that is backing off is tried again (no sooner than
        the policy allows); a local identifier unknown here is launched.
        Fails with an :class:`~difydaemon.errors.InternalServerError` saying
        why -- the failure of the attempt it waited for, the state it is
        still in after ``timeout`` seconds, the daemon shutting down --
        prefixed with "failed to get plugin runtime".  Cancelling the
        Deferred stops the wait.
        """
        identifier = plugin_unique_identifier
        runtime = self._runtimes.get(identifier)
        if runtime is not None and runtime.is_ready():
            return succeed(runtime)
        if self._stopping:
            return fail(InternalServerError(f"{NO_RUNTIME_MESSAGE}: {SHUTDOWN_MESSAGE}"))
        waiter = _Waiter()
        waiter.deferred = Deferred(lambda _: self._forget_waiter(identifier, waiter))
        waiter.timer = self._reactor.callLater(timeout, self._waiter_expired, identifier, waiter)
        self._waiters.setdefault(identifier, []).append(waiter)
        self._demand(identifier)
        return waiter.deferred

    def _forget_waiter(self, identifier: str, waiter: _Waiter) -> bool:
        waiters = self._waiters.get(identifier, [])
        if waiter not in waiters:
            return False
        waiters.remove(waiter)
        if not waiters:
            del self._waiters[identifier]
        if waiter.timer.active():
            waiter.timer.cancel()
        return True

    def _waiter_expired(self, identifier: str, waiter: _Waiter) -> None:
        if self._forget_waiter(identifier, waiter):
            waiter.deferred.errback(InternalServerError(self._unavailable(identifier)))

    def _notify(self, identifier: str) -> None:
        """Hand a ready runtime to everyone waiting for it."""
        runtime = self._runtimes.get(identifier)
        if runtime is None or not runtime.is_ready():
            return
        for waiter in self._waiters.pop(identifier, []):
            if waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.callback(runtime)

    def _fail_waiters(self, identifier: str, message: str) -> None:
        for waiter in self._waiters.pop(identifier, []):
            if waiter.timer.active():
                waiter.timer.cancel()
            waiter.deferred.errback(InternalServerError(message))

    def _registered_ready(self, runtime) -> None:
        if self._runtimes.get(runtime.plugin_unique_identifier) is runtime:
            self._notify(runtime.plugin_unique_identifier)

    def _unavailable(self, identifier: str) -> str:
        """Why an identifier cannot take a session now."""
        record = self._records.get(identifier)
        if record is None:
            return NO_RUNTIME_MESSAGE
        if record.state == LAUNCHING:
            detail = f"plugin {identifier} is still starting"
            if record.last_error is not None:
                detail += f" (after {record.failures} failed attempt(s); last failure: {record.last_error})"
        elif record.state == RUNNING:
            detail = f"plugin {identifier} is restarting"
        elif record.state == IDLE:
            detail = f"plugin {identifier} is stopped while idle"
        else:
            detail = f"plugin {identifier} failed to start {record.failures} time(s) in a row"
            if record.timer is not None and record.timer.active():
                detail += f"; next attempt in {record.timer.getTime() - self._reactor.seconds():.0f} s"
            detail += f"; last failure: {record.last_error}"
        return f"{NO_RUNTIME_MESSAGE}: {detail}"

    # -- attempts -----------------------------------------------------------

    def _demand(self, identifier: str) -> None:
        """Someone waits for the identifier: make sure an attempt comes soon."""
        if self._stopping:
            return
        record = self._records.get(identifier)
        if record is None:
            if self._factory is None or identifier in self._runtimes:
                return
            self._try_installed(self._new_record(identifier, supervised=True))
            return
        if record.state == IDLE:
            # not a failure: no pacing
            self._try_installed(record)
            return
        if record.state != BACKING_OFF:
            return
        now = self._reactor.seconds()
        earliest = (record.last_attempt_end or 0.0) + self.retry_policy.on_demand_interval
        if now >= earliest:
            self._try_installed(record)
        elif record.timer is None or record.timer.getTime() > earliest:
            self._cancel_timer(record)
            record.timer = self._reactor.callLater(earliest - now, self._retry, record)

    def _new_record(self, identifier: str, supervised: bool) -> _Record:
        record = self._records[identifier] = _Record(identifier, supervised)
        return record

    def _try_installed(self, record: _Record) -> SharedResult:
        identifier = record.identifier
        return self._attempt(record, lambda: self._factory.launch_installed(identifier, self._progress(identifier)))

    def _retry(self, record: _Record) -> None:
        record.timer = None
        if self._records.get(record.identifier) is record and record.state == BACKING_OFF and not self._stopping:
            self._try_installed(record)

    def _progress(self, identifier: str):
        def progress(line: str) -> None:
            log.info("plugin {identifier}: {line}", identifier=identifier, line=line)

        return progress

    def _attempt(self, record: _Record, make, cancel_when_abandoned: bool = False) -> SharedResult:
        """Start one attempt (``make() -> Deferred[runtime | None]``) for ``record``."""
        self._cancel_timer(record)
        record.state = LAUNCHING
        build = record.build
        if build is not None and not build.done:
            # two builds in one working directory would undo each other: the
            # launch waits for the background build (whatever its outcome:
            # the launch builds again what failed) and then finds it done
            d = build.addWaiter()
            d.addBoth(_unless_cancelled, make)
        else:
            try:
                d = make()
            except Exception:
                d = fail()
        d.addCallbacks(
            self._attempt_succeeded, self._attempt_failed, callbackArgs=(record,), errbackArgs=(record,)
        )
        shared = SharedResult(d, cancel_when_abandoned)
        # a factory that answers at once has already settled the record
        if not shared.done:
            record.attempt = shared
        return shared

    def _attempt_succeeded(self, runtime, record: _Record):
        record.attempt = None
        record.last_attempt_end = self._reactor.seconds()
        identifier = record.identifier
        current = self._records.get(identifier) is record
        if runtime is None:
            # not a local plugin (a debugging plugin that is not connected)
            if current:
                del self._records[identifier]
            self._fail_waiters(identifier, f"{NO_RUNTIME_MESSAGE}: plugin {identifier} is not running")
            return None
        if not current or self._stopping:
            why = SHUTDOWN_MESSAGE if self._stopping else UNINSTALLED_MESSAGE
            self._stop_quietly(runtime)
            raise InternalServerError(f"plugin {identifier} was stopped as it came up: {why}")
        record.state = RUNNING
        record.supervised = True
        record.runtime = runtime
        record.failures = 0
        record.last_error = None
        if hasattr(runtime, "on_failed"):
            runtime.on_failed = lambda failed, message: self._runtime_failed(record, failed, message)
        if hasattr(runtime, "on_ready"):
            runtime.on_ready = lambda ready: self._runtime_ready(record, ready)
        if hasattr(runtime, "on_idle"):
            runtime.on_idle = lambda idle: self._runtime_idle(record, idle)
        self._runtimes[identifier] = runtime
        log.info("plugin {identifier} is running", identifier=identifier)
        self._notify(identifier)
        return None

    def _attempt_failed(self, failure, record: _Record):
        record.attempt = None
        record.last_attempt_end = self._reactor.seconds()
        identifier = record.identifier
        if self._stopping or self._records.get(identifier) is not record:
            return failure
        if failure.check(CancelledError):
            # an install that timed out or was abandoned
            message = "the launch was cancelled"
        else:
            if not isinstance(failure.value, DaemonError):
                log.failure("launching plugin {identifier} failed", failure, identifier=identifier)
            message = _failure_message(failure)
        if not record.supervised:
            del self._records[identifier]
        else:
            self._back_off(record, message)
        self._fail_waiters(identifier, f"{NO_RUNTIME_MESSAGE}: {message}")
        return failure

    def _back_off(self, record: _Record, message: str) -> None:
        record.failures += 1
        record.last_error = message
        record.state = BACKING_OFF
        delay = self.retry_policy.delay(record.failures)
        self._cancel_timer(record)
        record.timer = self._reactor.callLater(delay, self._retry, record)
        log.error(
            "plugin {identifier} failed to start ({failures} time(s) in a row);"
            " next attempt in {delay:g} s: {reason}",
            identifier=record.identifier,
            failures=record.failures,
            delay=delay,
            reason=message,
        )

    def _runtime_failed(self, record: _Record, runtime, message: str) -> None:
        """A running runtime gave up restarting its instances: back off, then launch again."""
        identifier = record.identifier
        if record.runtime is not runtime or self._records.get(identifier) is not record:
            return
        record.runtime = None
        if self._runtimes.get(identifier) is runtime:
            del self._runtimes[identifier]
        self._stop_quietly(runtime)
        self._back_off(record, message)
        if self._waiters.get(identifier):
            self._demand(identifier)

    def _runtime_idle(self, record: _Record, runtime) -> None:
        """
        A runtime had no session for its idle timeout: out of the table at
        once, stopped in the background; the next request launches it again.
        """
        identifier = record.identifier
        if record.runtime is not runtime or self._records.get(identifier) is not record or self._stopping:
            return
        record.runtime = None
        record.state = IDLE
        if self._runtimes.get(identifier) is runtime:
            del self._runtimes[identifier]
        stopping = self._stop_quietly(runtime)
        if not stopping.called:
            self._idle_stops.add(stopping)
            stopping.addBoth(lambda _: self._idle_stops.discard(stopping))
        if self._waiters.get(identifier):
            self._demand(identifier)

    def _runtime_ready(self, record: _Record, runtime) -> None:
        if record.runtime is runtime and self._runtimes.get(record.identifier) is runtime:
            self._notify(record.identifier)

    def _cancel_timer(self, record: _Record) -> None:
        timer, record.timer = record.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _stop_quietly(self, runtime, **options) -> Deferred:
        d = maybeDeferred(runtime.stop, **options)
        d.addErrback(
            lambda failure: log.failure(
                "stopping plugin {identifier} failed", failure, identifier=runtime.plugin_unique_identifier
            )
        )
        return d

    # -- IRuntimeLauncher ---------------------------------------------------

    def launch(self, plugin_unique_identifier, declaration, package, progress):
        """
        Bring an identifier up for an install.  Deferred[None]; a failure
        says why.  Concurrent launches share one attempt; an identifier
        already running succeeds at once; one that is backing off is tried
        again now.
        """
        identifier = plugin_unique_identifier
        if self._factory is None:
            return succeed(None)
        if self._stopping:
            return fail(InternalServerError(SHUTDOWN_MESSAGE))

        def make():
            return self._factory.launch(identifier, declaration, package, progress)

        record = self._records.get(identifier)
        if record is None:
            if identifier in self._runtimes:
                return succeed(None)
            record = self._new_record(identifier, supervised=False)
            return self._attempt(record, make, cancel_when_abandoned=True).addWaiter()
        if record.state == RUNNING:
            return succeed(None)
        if record.attempt is not None:
            return record.attempt.addWaiter()
        return self._attempt(record, make).addWaiter()

    def stop(self, plugin_unique_identifier):
        """Stop an identifier's runtime and discard its files. Deferred[None]."""
        identifier = plugin_unique_identifier
        record = self._records.pop(identifier, None)
        if record is not None:
            # an attempt under way finds its record gone and stops what it started
            self._cancel_timer(record)
            self._cancel_build(record)
        self._fail_waiters(identifier, f"{NO_RUNTIME_MESSAGE}: {UNINSTALLED_MESSAGE}")
        runtime = self._runtimes.pop(identifier, None)
        d = runtime.stop() if runtime is not None else succeed(None)
        if self._factory is not None:
            d.addCallback(lambda _: self._factory.discard(identifier))
        return d

    # -- daemon life ---------------------------------------------------------

    def start(self):
        """
        Bring back what was installed before the daemon (re)started, in the
        background: the daemon does not wait for plugins, and each is
        registered as soon as it is up (or, with ``restore_idle``, left
        idle until its first request).
        """
        if self._factory is not None:
            d = self._factory.installed()
            d.addCallback(self._restore)
            d.addErrback(lambda f: log.failure("restoring installed plugins failed", f))
        return succeed(None)

    def _restore(self, identifiers) -> None:
        for identifier in identifiers:
            if self._stopping:
                return
            if self.restore_idle:
                self._register_idle(identifier)
            else:
                self.prepare(identifier)

    def _register_idle(self, identifier: str, build: bool = False) -> None:
        """
        Supervise an installed identifier without launching it: its first
        request will.  With ``build``, its files and venv are made now, in
        the background, if the factory can (``build_installed``).
        """
        if identifier in self._records or identifier in self._runtimes:
            # a request that came before the restore listed it launched it already
            return
        record = self._new_record(identifier, supervised=True)
        record.state = IDLE
        build_installed = getattr(self._factory, "build_installed", None)
        if not build or build_installed is None:
            return
        try:
            d = build_installed(identifier, self._progress(identifier))
        except Exception:
            d = fail()
        d.addErrback(self._build_failed, identifier)
        shared = SharedResult(d)
        if not shared.done:
            record.build = shared
            d.addBoth(self._build_done, record, shared)

    def _build_failed(self, failure, identifier: str):
        if failure.check(CancelledError):
            # an uninstall or the daemon's stop: a launch waiting for it must not follow
            return failure
        # not a launch failure: nobody waits, and the first request builds
        # again (and reports why, if it fails again)
        log.warn(
            "building idle plugin {identifier} ahead of its first call failed: {reason}",
            identifier=identifier,
            reason=_failure_message(failure),
        )
        return None

    def _build_done(self, result, record: _Record, shared: SharedResult):
        if record.build is shared:
            record.build = None
        return result

    def _cancel_build(self, record: _Record) -> None:
        build, record.build = record.build, None
        if build is not None and not build.done:
            build.result.cancel()

    def prepare(self, plugin_unique_identifier: str) -> None:
        """
        Bring up, in the background, an identifier installed elsewhere (by
        another replica): nothing happens if it is known here already, or
        without a factory.  With ``restore_idle`` it is left idle instead,
        built ahead of its first request but with no process.
        """
        identifier = plugin_unique_identifier
        if self._stopping or self._factory is None:
            return
        if identifier in self._records or identifier in self._runtimes:
            return
        if self.restore_idle:
            self._register_idle(identifier, build=True)
            return
        self._try_installed(self._new_record(identifier, supervised=True))

    def reconcile(self, installed) -> Deferred:
        """
        Match the local identifiers supervised here with ``installed`` (the
        database's list): bring up those missing, and stop those found
        uninstalled by two reconciliations in a row (one alone could have
        read the list just before an install here wrote its rows).  For a
        replica that may have missed the news of installs and uninstalls.
        Deferred[None] once the stops are done.
        """
        installed = set(installed)
        for identifier in sorted(installed):
            self.prepare(identifier)
        absent = {
            identifier for identifier, record in self._records.items()
            if record.supervised and identifier not in installed
        }
        gone, self._absent = absent & self._absent, absent - self._absent
        stops = [self.stop(identifier) for identifier in sorted(gone)]
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)

    def stop_all(self):
        """
        Daemon shutdown: let open sessions finish for the grace period (all
        runtimes in parallel), then fail the ones still open with "the
        plugin daemon is shutting down" and stop every plugin; attempts
        under way are cancelled.  Deferred[None], fired at the latest
        ``stop_timeout`` seconds after the grace period, whatever the
        plugins do.
        """
        self._stopping = True
        grace = self.shutdown_grace_period
        pending = []
        for record in self._records.values():
            self._cancel_timer(record)
            self._cancel_build(record)
            if record.attempt is not None:
                pending.append(record.attempt.addWaiter())
                record.attempt.result.cancel()
        for identifier in list(self._waiters):
            self._fail_waiters(identifier, f"{NO_RUNTIME_MESSAGE}: {SHUTDOWN_MESSAGE}")
        runtimes = list(self._runtimes.values())
        self._runtimes.clear()
        running = set(runtimes)
        for runtime in runtimes:
            stopped = self._stop_quietly(runtime, drain_timeout=grace, reason=SHUTDOWN_MESSAGE)
            stopped.addCallback(lambda _, runtime=runtime: running.discard(runtime))
            pending.append(stopped)
        # the idle plugins' processes end within the stop budget too
        pending.extend(stop.addErrback(lambda _: None) for stop in list(self._idle_stops))
        finished: Deferred = Deferred()
        all_done = DeferredList(pending, consumeErrors=True)

        def give_up() -> None:
            left = [
                f"{runtime.plugin_unique_identifier} (pids {[i.pid for i in getattr(runtime, 'instances', [])]})"
                for runtime in running
            ]
            log.error(
                "plugins still running {seconds:g} s after the shutdown began; not waiting for: {left}",
                seconds=grace + self.stop_timeout,
                left=", ".join(left) or "plugins still starting",
            )
            finished.callback(None)

        timer = self._reactor.callLater(grace + self.stop_timeout, give_up)

        def done(_) -> None:
            if timer.active():
                timer.cancel()
                finished.callback(None)

        all_done.addCallback(done)
        return finished


def _unless_cancelled(result, make):
    """Call ``make()`` after a background build, unless the wait was cancelled."""
    if isinstance(result, Failure) and result.check(CancelledError):
        return result
    return make()


def _failure_message(failure) -> str:
    """What a failure says: a daemon error's message, else its type and text."""
    if isinstance(failure.value, DaemonError):
        return failure.value.message
    return f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
