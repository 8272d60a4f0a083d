"""
The local runtime: plugin instances as supervised subprocesses
(``runtimes.md`` §1.4 - §1.8).

A :class:`LocalRuntime` serves one plugin unique identifier with N
:class:`LocalInstance` processes, started from a working directory whose
Python environment is already built.  It routes new sessions round-robin
over the ready instances and keeps each session on the instance that
received it; it restarts crashed instances with exponential backoff and
gives up after repeated crashes before readiness; it stops by draining
sessions, then TERM, then KILL -- the SDK does not exit when its stdin
closes, so a signal is the only way to stop it.

Deliberate differences from the Go daemon: in-flight sessions of a dead
instance get ``ConnectionClosedError`` at once instead of waiting for their
timeout; restarts back off instead of retrying every 5 s forever; stopping
sends TERM before KILL.
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from difydaemon import errors
from difydaemon.interfaces import IPluginRuntime
from difydaemon.runtimes.codec import encode_request
from difydaemon.runtimes.parent_death import ParentDeathSignal, child_argv
from difydaemon.runtimes.process import DEFAULT_TAIL_SIZE, PluginProcessProtocol
from difydaemon.runtimes.sessions import SessionTable

DEFAULT_MAX_LINE_SIZE = 5242880
INSTANCE_EXITED_ERROR_TYPE = errors.ConnectionClosedError.error_type
INSTANCE_EXITED_MESSAGE = "plugin instance exited"
NO_INSTANCE_MESSAGE = "failed to get plugin runtime"


@frozen
class RestartPolicy:
    """
    How crashed instances are restarted (after Twisted's ``procmon``).

    :ivar min_delay: seconds before the first restart.
    :ivar max_delay: the cap of the doubling delay.
    :ivar factor: what the delay is multiplied by after each restart.
    :ivar stable_after: an instance that ran this many seconds before it
        exited resets the delay to ``min_delay``.
    :ivar max_failed_starts: consecutive exits before readiness after which
        the runtime is marked failed and nothing is restarted.
    """

    min_delay: float = 1.0
    max_delay: float = 60.0
    factor: float = 2.0
    stable_after: float = 60.0
    max_failed_starts: int = 5


@frozen
class LivenessPolicy:
    """
    The monitor of ready instances (``runtimes.md`` §1.6): every
    ``interval`` seconds, warn after ``warn_after`` seconds without any
    stdout or stderr bytes, kill after ``kill_after``.
    """

    interval: float = 30.0
    warn_after: float = 60.0
    kill_after: float = 120.0


class LocalInstance:
    """
    One plugin subprocess and its open sessions.

    Created and driven by its supervisor (a :class:`LocalRuntime`), which it
    tells, by plain method calls: ``instance_ready(instance)`` on the first
    heartbeat; ``instance_not_ready(instance, failure)`` if it failed to
    become ready; and when the process has ended, ``instance_gone(instance)``
    (take it out of rotation), then -- after every open session got
    ``ConnectionClosedError``, so a listener retrying at once lands on
    another instance -- ``instance_exited(instance)``.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        slot: int,
        plugin_id: str,
        executable: str,
        args: list,
        env: dict,
        path: str,
        max_line_size: int,
        readiness_timeout: float,
        session_timeout: float | None,
        liveness: LivenessPolicy,
        supervisor,
        tail_size: int = DEFAULT_TAIL_SIZE,
    ) -> None:
        self._reactor = reactor
        self.slot = slot
        self.plugin_id = plugin_id
        self._executable = executable
        self._args = args
        self._env = env
        self._path = path
        self._liveness = liveness
        self._supervisor = supervisor
        self.sessions = SessionTable(reactor, session_timeout)
        self.protocol = PluginProcessProtocol(
            self, reactor, plugin_id, max_line_size, readiness_timeout, tail_size
        )
        self._transport = None
        self.started_at: float | None = None
        self.pid: int | None = None
        self.is_ready = False
        self.exited = False
        self._monitor: LoopingCall | None = None
        self._kill_timer = None
        self._exit_waiters: list[Deferred] = []

    def spawn(self) -> None:
        """Start the process; ``OSError`` if it cannot be started."""
        self.started_at = self._reactor.seconds()
        self.protocol.ready.addCallbacks(self._ready, self._not_ready)
        self._transport = self._reactor.spawnProcess(
            self.protocol, self._executable, self._args, env=self._env, path=self._path
        )
        self.pid = self._transport.pid

    def open_session(self, session_id: str, request: dict, listener):
        """Register ``listener`` for ``session_id``, then write the request."""
        handle = self.sessions.open(session_id, listener)
        self._transport.write(encode_request(request))
        return handle

    def write(self, message: dict) -> None:
        """Write one more daemon -> plugin message on stdin."""
        self._transport.write(encode_request(message))

    def session_message(self, item) -> None:
        """Called by the protocol for each session message."""
        self.sessions.deliver(item)

    def terminate(self, grace_period: float) -> Deferred:
        """
        Send TERM now and KILL after ``grace_period`` seconds unless the
        process has ended; the Deferred fires when it has.
        """
        waiter = self.when_exited()
        if not self.exited and self._kill_timer is None and not self.protocol.killed:
            if self.protocol.signal("TERM"):
                self._kill_timer = self._reactor.callLater(grace_period, self._kill_after_grace)
        return waiter

    def kill(self) -> None:
        """Send KILL now."""
        self.protocol.signal("KILL")

    def when_exited(self) -> Deferred:
        """A Deferred that fires (with None) when the process has ended."""
        waiter: Deferred = Deferred()
        if self.exited:
            waiter.callback(None)
        else:
            self._exit_waiters.append(waiter)
        return waiter

    def describe_exit(self) -> str:
        """How the process ended."""
        return self.protocol.describe_exit()

    def process_ended(self, protocol) -> None:
        """Called by the protocol once, when the process has ended."""
        self.exited = True
        self.is_ready = False
        if self._monitor is not None and self._monitor.running:
            self._monitor.stop()
        if self._kill_timer is not None:
            if self._kill_timer.active():
                self._kill_timer.cancel()
            self._kill_timer = None
        self._supervisor.instance_gone(self)
        self.sessions.fail_all(INSTANCE_EXITED_ERROR_TYPE, INSTANCE_EXITED_MESSAGE)
        self._supervisor.instance_exited(self)
        waiters, self._exit_waiters = self._exit_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _ready(self, _) -> None:
        self.is_ready = True
        monitor = LoopingCall(self._check_liveness)
        monitor.clock = self._reactor
        self._monitor = monitor
        monitor.start(self._liveness.interval, now=False).addErrback(
            lambda failure: self.log.failure(
                "liveness monitor of plugin {plugin_id} failed",
                failure,
                plugin_id=self.plugin_id,
            )
        )
        self._supervisor.instance_ready(self)

    def _not_ready(self, failure) -> None:
        self._supervisor.instance_not_ready(self, failure)

    def _check_liveness(self) -> None:
        idle = self._reactor.seconds() - self.protocol.last_active
        if idle > self._liveness.kill_after:
            self.log.warn(
                "plugin {plugin_id} instance {pid} not active for {idle:.0f} s, may be dead;"
                " killing it",
                plugin_id=self.plugin_id,
                pid=self.pid,
                idle=idle,
            )
            self.kill()
        elif idle > self._liveness.warn_after:
            self.log.warn(
                "plugin {plugin_id} instance {pid} not active for {idle:.0f} s",
                plugin_id=self.plugin_id,
                pid=self.pid,
                idle=idle,
            )

    def _kill_after_grace(self) -> None:
        self._kill_timer = None
        if not self.exited:
            self.log.warn(
                "plugin {plugin_id} instance {pid} ignored TERM; killing it",
                plugin_id=self.plugin_id,
                pid=self.pid,
            )
            self.kill()


@implementer(IPluginRuntime)
class LocalRuntime:
    """
    One plugin unique identifier run as ``instance_count`` subprocesses.

    :param reactor: provides ``IReactorProcess`` and ``IReactorTime``.
    :param working_dir: the extracted package, its venv already built.
    :param python: the absolute path of the venv's ``python``.
    :param entrypoint: the module run with ``python -m`` (the manifest's
        ``meta.runner.entrypoint``, normally ``main``).
    :param env: the child's whole environment, already reduced to what a
        plugin may see (:mod:`difydaemon.runtimes.child_environment`);
        ``INSTALL_METHOD=local`` is set on top.
    :param readiness_timeout: seconds from spawn to the first heartbeat.
    :param session_timeout: seconds before a session is "killed by
        timeout" (``PLUGIN_MAX_EXECUTION_TIMEOUT``).
    :param stop_grace_period: seconds between TERM and KILL.
    :param drain_timeout: seconds :meth:`stop` waits for open sessions
        (default: ``session_timeout``; None with it: no limit).
    :param on_failed: called with ``(runtime, message)`` when the runtime
        gives up restarting after a successful :meth:`start`.
    :param declaration: the plugin's declaration (its permissions decide
        which backwards invocations it may make).
    :param parent_death: the launcher that makes each process die with the
        daemon (:mod:`difydaemon.runtimes.parent_death`); None starts
        ``python -m <entrypoint>`` directly.

    :ivar state: ``created``, ``starting``, ``running``, ``failed``,
        ``stopping`` or ``stopped``.
    """

    runtime_type = "local"
    log = Logger()

    def __init__(
        self,
        reactor,
        plugin_unique_identifier: str,
        plugin_id: str,
        working_dir: str,
        python: str,
        entrypoint: str = "main",
        env: dict | None = None,
        instance_count: int = 1,
        max_line_size: int = DEFAULT_MAX_LINE_SIZE,
        readiness_timeout: float = 120.0,
        session_timeout: float | None = 600.0,
        stop_grace_period: float = 5.0,
        drain_timeout: float | None = None,
        restart_policy: RestartPolicy = RestartPolicy(),
        liveness: LivenessPolicy = LivenessPolicy(),
        on_failed=None,
        declaration: dict | None = None,
        parent_death: ParentDeathSignal | None = None,
    ) -> None:
        if instance_count < 1:
            raise ValueError("instance_count must be at least 1")
        self._reactor = reactor
        self.plugin_unique_identifier = plugin_unique_identifier
        self.plugin_id = plugin_id
        self.declaration = declaration if declaration is not None else {}
        self.working_dir = working_dir
        self.python = python
        self.entrypoint = entrypoint
        child_env = dict(env or {})
        child_env["INSTALL_METHOD"] = "local"
        self.env = child_env
        self.parent_death = parent_death
        self.instance_count = instance_count
        self.max_line_size = max_line_size
        self.readiness_timeout = readiness_timeout
        self.session_timeout = session_timeout
        self.stop_grace_period = stop_grace_period
        self.drain_timeout = session_timeout if drain_timeout is None else drain_timeout
        self.restart_policy = restart_policy
        self.liveness = liveness
        self._on_failed = on_failed
        self.state = "created"
        self.failure_message: str | None = None
        self._instances: list[LocalInstance] = []
        self._ready: list[LocalInstance] = []
        self._next = 0
        self._restarts: dict[int, object] = {}
        self._restart_delay = restart_policy.min_delay
        self._failed_starts = 0
        self._started: Deferred | None = None
        self._stopped_waiters: list[Deferred] = []

    # -- IPluginRuntime ---------------------------------------------------

    @property
    def instances(self) -> list[LocalInstance]:
        """The instances whose processes have not ended."""
        return list(self._instances)

    @property
    def ready_instances(self) -> list[LocalInstance]:
        """The instances that take new sessions."""
        return list(self._ready)

    def start(self) -> Deferred:
        """
        Spawn every instance.  Fires (with None) when the first one is
        ready; fails with an :class:`~difydaemon.errors.InternalServerError`
        naming the failed step, with the output tails, when an instance
        exits, cannot be spawned or sends no heartbeat in time before any
        is ready.  The runtime is then ``failed`` and restarts nothing.
        """
        if self.state != "created":
            raise ValueError(f"runtime of {self.plugin_unique_identifier} is {self.state}")
        self.state = "starting"
        self._started = Deferred()
        started = self._started
        self.log.info(
            "starting plugin {plugin_id} ({identifier}), {count} instance(s)",
            plugin_id=self.plugin_id,
            identifier=self.plugin_unique_identifier,
            count=self.instance_count,
        )
        for slot in range(self.instance_count):
            if self.state != "starting":
                break
            self._launch(slot)
        return started

    def is_ready(self) -> bool:
        """True when a session can be opened now."""
        return self.state == "running" and bool(self._ready)

    def open_session(self, session_id: str, request: dict, listener):
        """
        Write ``request`` to the next ready instance (round-robin) and route
        the session's messages to ``listener``.

        :raises difydaemon.errors.InternalServerError: if no instance is
            ready or the runtime is stopping.
        """
        ready = self._ready
        if not ready or self.state != "running":
            raise errors.InternalServerError(NO_INSTANCE_MESSAGE)
        instance = ready[self._next % len(ready)]
        self._next += 1
        return instance.open_session(session_id, request, listener)

    def send(self, session_id: str, message: dict) -> None:
        """
        Write ``message`` to the instance that serves ``session_id``.

        :raises difydaemon.errors.ConnectionClosedError: if no instance has
            that session open.
        """
        for instance in self._instances:
            if session_id in instance.sessions:
                instance.write(message)
                return
        raise errors.ConnectionClosedError(f"plugin session {session_id} is not open")

    def stop(self) -> Deferred:
        """
        Refuse new sessions, wait up to ``drain_timeout`` for open ones,
        then TERM every process and KILL it after ``stop_grace_period``.
        Fires (with None) when every process has ended.
        """
        waiter: Deferred = Deferred()
        if self.state == "stopped":
            waiter.callback(None)
            return waiter
        self._stopped_waiters.append(waiter)
        if self.state == "stopping":
            return waiter
        self.state = "stopping"
        self._cancel_restarts()
        self._fail_start(
            errors.InternalServerError("plugin did not become ready: the runtime was stopped")
        )
        self.log.info("stopping plugin {plugin_id}", plugin_id=self.plugin_id)
        self._drain().addCallback(lambda _: self._terminate_all()).addErrback(
            lambda failure: self.log.failure(
                "stopping plugin {plugin_id} failed", failure, plugin_id=self.plugin_id
            )
        )
        return waiter

    # -- supervision ----------------------------------------------------------

    def _launch(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        argv = child_argv(self.parent_death, [self.python, "-m", self.entrypoint])
        instance = LocalInstance(
            self._reactor,
            slot,
            self.plugin_id,
            argv[0],
            argv,
            self.env,
            self.working_dir,
            self.max_line_size,
            self.readiness_timeout,
            self.session_timeout,
            self.liveness,
            self,
        )
        try:
            instance.spawn()
        except OSError as exception:
            message = f"plugin did not become ready: cannot start {self.python}: {exception}"
            self.log.error(
                "plugin {plugin_id}: {reason}", plugin_id=self.plugin_id, reason=message
            )
            self._crashed_before_ready(slot, message, instance.started_at)
            return
        self._instances.append(instance)
        self.log.info(
            "plugin {plugin_id} instance {pid} spawned", plugin_id=self.plugin_id, pid=instance.pid
        )

    # Called by the instances (see LocalInstance).

    def instance_ready(self, instance: LocalInstance) -> None:
        """An instance sent its first heartbeat."""
        self.log.info(
            "plugin {plugin_id} instance {pid} ready after {seconds:.2f} s",
            plugin_id=self.plugin_id,
            pid=instance.pid,
            seconds=self._reactor.seconds() - instance.started_at,
        )
        self._failed_starts = 0
        if self.state == "starting":
            self.state = "running"
            started, self._started = self._started, None
            self._ready.append(instance)
            started.callback(None)
        elif self.state == "running":
            self._ready.append(instance)
        else:
            # Stopping or failed: it came up too late to serve anything.
            instance.terminate(self.stop_grace_period)

    def instance_not_ready(self, instance: LocalInstance, failure) -> None:
        """An instance exited or timed out before its first heartbeat."""
        message = failure.getErrorMessage()
        self.log.warn(
            "plugin {plugin_id} instance {pid}: {reason}",
            plugin_id=self.plugin_id,
            pid=instance.pid,
            reason=message,
        )
        if self.state == "starting":
            self._fail(message, failure.value)

    def instance_gone(self, instance: LocalInstance) -> None:
        """An instance's process ended: no more sessions for it."""
        if instance in self._ready:
            self._ready.remove(instance)
        self._instances.remove(instance)

    def instance_exited(self, instance: LocalInstance) -> None:
        """An instance's process ended and its sessions have been failed."""
        self.log.info(
            "plugin {plugin_id} instance {pid} {how}",
            plugin_id=self.plugin_id,
            pid=instance.pid,
            how=instance.describe_exit(),
        )
        if self.state in ("running", "starting"):
            if instance.protocol.is_ready:
                self._schedule_restart(instance.slot, instance.started_at)
            else:
                message = f"plugin did not become ready: {instance.describe_exit()}"
                tails = instance.protocol.output_tails()
                if tails:
                    message = f"{message}\n{tails}"
                self._crashed_before_ready(instance.slot, message, instance.started_at)
        self._check_stopped()

    def _crashed_before_ready(self, slot: int, message: str, started_at) -> None:
        if self.state == "starting":
            self._fail(message, errors.InternalServerError(message))
            return
        if self.state != "running":
            return
        self._failed_starts += 1
        limit = self.restart_policy.max_failed_starts
        if self._failed_starts >= limit:
            self._fail(
                f"plugin {self.plugin_id} failed to start {self._failed_starts} times"
                f" in a row; giving up. Last failure: {message}",
                None,
            )
            return
        self._schedule_restart(slot, started_at)

    def _schedule_restart(self, slot: int, started_at) -> None:
        policy = self.restart_policy
        now = self._reactor.seconds()
        if started_at is not None and now - started_at >= policy.stable_after:
            self._restart_delay = policy.min_delay
        delay = self._restart_delay
        self._restart_delay = min(delay * policy.factor, policy.max_delay)
        self.log.info(
            "restarting plugin {plugin_id} instance in {delay:g} s",
            plugin_id=self.plugin_id,
            delay=delay,
        )
        self._restarts[slot] = self._reactor.callLater(delay, self._launch, slot)

    def _fail(self, message: str, start_error) -> None:
        """Mark the runtime failed: no restarts, every process stopped."""
        was_starting = self.state == "starting"
        self.state = "failed"
        self.failure_message = message
        self._cancel_restarts()
        self.log.error(
            "plugin {plugin_id} runtime failed: {reason}",
            plugin_id=self.plugin_id,
            reason=message,
        )
        for instance in list(self._instances):
            instance.terminate(self.stop_grace_period)
        if was_starting:
            self._fail_start(start_error)
        elif self._on_failed is not None:
            try:
                self._on_failed(self, message)
            except Exception:
                self.log.failure("on_failed callback of plugin {plugin_id} failed",
                                 plugin_id=self.plugin_id)

    def _fail_start(self, exception) -> None:
        started, self._started = self._started, None
        if started is not None:
            started.errback(exception)

    def _cancel_restarts(self) -> None:
        restarts, self._restarts = self._restarts, {}
        for call in restarts.values():
            if call.active():
                call.cancel()

    # -- stopping ---------------------------------------------------------

    def _drain(self) -> Deferred:
        """Fires when no instance has an open session, or at the drain timeout."""
        open_sessions = [i.sessions.drained() for i in self._instances if len(i.sessions)]
        if not open_sessions:
            done: Deferred = Deferred()
            done.callback(None)
            return done
        self.log.info(
            "plugin {plugin_id}: waiting up to {timeout} s for open sessions",
            plugin_id=self.plugin_id,
            timeout=self.drain_timeout,
        )
        drained = DeferredList(open_sessions, consumeErrors=True)
        if self.drain_timeout is not None:
            # At the timeout the drain counts as done: the sessions still
            # open get ConnectionClosedError when their process ends.
            drained.addTimeout(
                self.drain_timeout, self._reactor, onTimeoutCancel=lambda result, timeout: None
            )
        return drained

    def _terminate_all(self) -> None:
        for instance in list(self._instances):
            instance.terminate(self.stop_grace_period)
        self._check_stopped()

    def _check_stopped(self) -> None:
        if self.state != "stopping" or self._instances:
            return
        if self._restarts:
            return
        self.state = "stopped"
        self.log.info("plugin {plugin_id} stopped", plugin_id=self.plugin_id)
        waiters, self._stopped_waiters = self._stopped_waiters, []
        for waiter in waiters:
            waiter.callback(None)
