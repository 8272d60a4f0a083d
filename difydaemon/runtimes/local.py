"""
The local runtime: plugin instances as supervised subprocesses
(``runtimes.md`` §1.4 - §1.8).

A :class:`LocalRuntime` serves one plugin unique identifier with N
:class:`LocalInstance` processes, started from a working directory whose
Python environment is already built.  It routes new sessions round-robin
over the ready instances and keeps each session on the instance that
received it; it restarts crashed instances with exponential backoff and
gives up after repeated crashes before readiness (its owner, the
:class:`~difydaemon.runtimes.registry.RuntimeRegistry`, then retries the
whole launch later); it stops by draining sessions for a bounded time,
then TERM, then KILL -- the SDK does not exit when its stdin closes, so a
signal is the only way to stop it.

A ready instance that writes nothing for the heartbeat timeout (the SDK
heartbeats every 10 s, from its own greenlet, during long calls too) is
hung -- stopped by a debugger or SIGSTOP, deadlocked, swapped out: it
leaves the rotation at once, its sessions fail at once, it is KILLed and a
replacement is started.

Deliberate differences from the Go daemon: in-flight sessions of a dead or
hung instance get ``ConnectionClosedError`` at once instead of waiting for
their timeout; a hung instance is found after 30 s of silence instead of
120 s; restarts back off instead of retrying every 5 s forever; stopping
sends TERM before KILL.
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from difydaemon import errors
from difydaemon.interfaces import IPluginRuntime
from difydaemon.runtimes.codec import encode_request
from difydaemon.runtimes.memory import MEMORY_ERROR_TYPE, memory_message, ran_out_of_memory
from difydaemon.runtimes.parent_death import ParentDeathSignal, child_argv
from difydaemon.runtimes.process import DEFAULT_TAIL_SIZE, PluginProcessProtocol
from difydaemon.runtimes.process_table import is_stopped
from difydaemon.runtimes.scaling import ScalingPolicy
from difydaemon.runtimes.sessions import SessionDrain, SessionTable, plugin_error_fields

DEFAULT_MAX_LINE_SIZE = 5242880
INSTANCE_EXITED_ERROR_TYPE = errors.ConnectionClosedError.error_type
INSTANCE_EXITED_MESSAGE = "plugin instance exited"
INSTANCE_HUNG_ERROR_TYPE = errors.ConnectionClosedError.error_type
NO_INSTANCE_MESSAGE = "failed to get plugin runtime"

#: Seconds the pipes of an exited plugin stay open for its last output;
#: then they are closed even if something it spawned still holds them (a
#: session must not stay open on a plugin that is gone).
PIPE_CLOSE_DELAY = 1.0
#: Seconds between killing what a plugin left in its cgroup (``cgroup.kill``)
#: and removing the cgroup again: the kernel ends them asynchronously.
CGROUP_REMOVE_DELAY = 1.0

# Liveness deadlines are recomputed from float sums; a look this close to
# its deadline counts as on time, so that no look is rescheduled at "now".
_DEADLINE_SLACK = 0.001


def hung_message(timeout: float, state: str | None = None) -> str:
    """
    What the sessions of a hung instance are failed with: silent for
    ``timeout`` seconds, or stopped (``state`` ``T``: SIGSTOP, a debugger).
    """
    if is_stopped(state):
        why = f"its process is stopped (state {state})"
    else:
        why = f"no heartbeat for {timeout:g} s"
    return f"plugin instance stopped responding: {why}; it was killed and is being restarted"


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
        the runtime is marked failed and restarts nothing more (its owner
        may launch it again from scratch).
    """

    min_delay: float = 1.0
    max_delay: float = 60.0
    factor: float = 2.0
    stable_after: float = 60.0
    max_failed_starts: int = 5


@frozen
class LivenessPolicy:
    """
    How ready instances are watched (``runtimes.md`` §1.6, tightened).

    An instance that writes nothing at all -- no heartbeat, no other stdout
    or stderr bytes -- for ``timeout`` seconds is hung; a warning is logged
    after ``warn_after`` seconds of silence (None: half the timeout).  An
    instance found stopped (SIGSTOP, a debugger: state ``T``) when its
    silence is looked at is hung at once; one busy on the CPU but still
    heartbeating is not hung, however long its call.  The
    SDK heartbeats every 10 s (``HEARTBEAT_INTERVAL``), so the default
    tolerates two missed heartbeats.  Nothing polls: one timer per instance
    is set for the next deadline.
    """

    timeout: float = 30.0
    warn_after: float | None = None

    @property
    def warn_threshold(self) -> float:
        """Seconds of silence before the warning."""
        if self.warn_after is None:
            return self.timeout / 2
        return min(self.warn_after, self.timeout)


class LocalInstance:
    """
    One plugin subprocess and its open sessions.

    Created and driven by its supervisor (a :class:`LocalRuntime`), which it
    tells, by plain method calls: ``instance_ready(instance)`` on the first
    heartbeat; ``instance_not_ready(instance, failure)`` if it failed to
    become ready; ``instance_hung(instance)`` when a ready instance stopped
    writing anything (before its sessions fail and it is KILLed); and when
    the process has ended, ``instance_gone(instance)`` (take it out of
    rotation), then -- after every open session got
    ``ConnectionClosedError``, so a listener retrying at once lands on
    another instance -- ``instance_exited(instance)``.

    :ivar hung: whether it was found hung (it is being KILLed).
    :ivar replaced: whether its supervisor has already scheduled its
        replacement (a hung instance is replaced without waiting for its
        exit: a process in uninterruptible sleep may take long to die).

    With a ``process_table`` (an :class:`~difydaemon.interfaces.IProcessTable`),
    the process is one started through the launcher, leading a process
    group of its own: signals go to the whole group (what the plugin
    spawned ends with it), what is left of the group is KILLed when the
    plugin exits, and a stopped process counts as hung.  Without one, only
    the process itself is signalled.
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
        process_table=None,
        memory_limit: int | None = None,
        cgroup=None,
    ) -> None:
        self._reactor = reactor
        self.slot = slot
        self.memory_limit = memory_limit
        #: the :class:`~difydaemon.runtimes.cgroups.PluginCgroup` enforcing
        #: ``memory_limit``, or None (the launcher's rlimit does)
        self.cgroup = cgroup
        self.plugin_id = plugin_id
        self._executable = executable
        self._args = args
        self._env = env
        self._path = path
        self._liveness = liveness
        self._supervisor = supervisor
        self._process_table = process_table
        self.sessions = SessionTable(reactor, session_timeout, on_empty=self._sessions_ended)
        self.protocol = PluginProcessProtocol(
            self, reactor, plugin_id, max_line_size, readiness_timeout, tail_size, instance=slot
        )
        self._transport = None
        self.started_at: float | None = None
        self.pid: int | None = None
        self.is_ready = False
        self.exited = False
        self.hung = False
        self.replaced = False
        #: stopped because load no longer needs it: not restarted
        self.retired = False
        #: killed for going over ``memory_limit``
        self.out_of_memory = False
        self._liveness_call = None
        self._warned = False
        self._kill_timer = None
        self._pipe_timer = None
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
        """
        Called by the protocol for each session message.  A MemoryError
        reported by a plugin that has a memory limit is the limit at work:
        the instance is killed instead of the error being passed on.
        """
        if (
            item.kind == "error"
            and self.memory_limit is not None
            and plugin_error_fields(item.data)[0] == MEMORY_ERROR_TYPE
        ):
            self._kill_out_of_memory()
            return
        self.sessions.deliver(item)

    def _sessions_ended(self) -> None:
        self._supervisor.instance_unused(self)

    def memory_message(self) -> str:
        """What callers are told when this instance went over its memory limit."""
        return memory_message(self.plugin_id, self.memory_limit or 0)

    def _kill_out_of_memory(self) -> None:
        """Out of rotation, sessions failed with the memory error, KILL: at once."""
        if self.out_of_memory or self.exited:
            return
        self.out_of_memory = True
        self.is_ready = False
        self._stop_watching()
        self.log.error(
            "plugin {plugin_id} instance {pid} went over its memory limit of {limit} bytes;"
            " failing its {count} session(s), killing and replacing it",
            plugin_id=self.plugin_id,
            pid=self.pid,
            limit=self.memory_limit,
            count=len(self.sessions),
        )
        self._supervisor.instance_hung(self)
        self.sessions.fail_all(INSTANCE_EXITED_ERROR_TYPE, self.memory_message())
        self.kill()

    def terminate(self, grace_period: float) -> Deferred:
        """
        Send TERM now and KILL after ``grace_period`` seconds unless the
        process has ended; the Deferred fires when it has.
        """
        waiter = self.when_exited()
        if not self.exited and self._kill_timer is None and not self.protocol.killed:
            if self._signal("TERM"):
                self._kill_timer = self._reactor.callLater(grace_period, self._kill_after_grace)
        return waiter

    def kill(self) -> None:
        """Send KILL now."""
        self._signal("KILL")

    def _signal(self, name: str) -> bool:
        """
        Signal the process, or its whole group when it leads one; False
        when nothing was left to signal.  A group's stopped members get
        CONT after TERM, or the TERM would wait for them to be continued.
        """
        table = self._process_table
        if table is None or self.pid is None or self.protocol.reaped:
            # once reaped, the pid may be another process's: nothing is
            # signalled by number any more
            return self.protocol.signal(name)
        sent = table.signal_group(self.pid, name)
        if sent:
            if name == "KILL":
                self.protocol.killed = True
            elif name == "TERM":
                table.signal_group(self.pid, "CONT")
        return sent

    def when_exited(self) -> Deferred:
        """A Deferred that fires (with None) when the process has ended."""
        waiter: Deferred = Deferred()
        if self.exited:
            waiter.callback(None)
        else:
            self._exit_waiters.append(waiter)
        return waiter

    def describe_exit(self) -> str:
        """How the process ended (and why, when it was over its memory limit)."""
        how = self.protocol.describe_exit()
        if self.out_of_memory:
            how = f"{how}: {self.memory_message()}"
        return how

    def process_reaped(self, protocol) -> None:
        """
        Called by the protocol once, when the process itself has exited:
        KILL what is left of its group (the pid is still not reusable while
        the group has members), and close its pipes soon even if one of
        them holds them open.
        """
        table = self._process_table
        if table is not None and self.pid is not None and table.signal_group(self.pid, "KILL"):
            self.log.info(
                "plugin {plugin_id} instance {pid} exited; killed the processes it left behind",
                plugin_id=self.plugin_id,
                pid=self.pid,
            )
        if not self.exited:
            self._pipe_timer = self._reactor.callLater(PIPE_CLOSE_DELAY, self._close_pipes)

    def _close_pipes(self) -> None:
        self._pipe_timer = None
        if not self.exited:
            self.log.warn(
                "plugin {plugin_id} instance {pid} exited but its pipes are held open"
                " (by a process it started in a session of its own); closing them",
                plugin_id=self.plugin_id,
                pid=self.pid,
            )
            self._transport.loseConnection()

    def process_ended(self, protocol) -> None:
        """Called by the protocol once, when the process has ended."""
        if self.cgroup is not None:
            if not self.out_of_memory and self.cgroup.oom_killed():
                self.out_of_memory = True
                self.log.error(
                    "plugin {plugin_id} instance {pid} was killed by the kernel: over its memory limit of"
                    " {limit} bytes (cgroup {cgroup})",
                    plugin_id=self.plugin_id,
                    pid=self.pid,
                    limit=self.memory_limit,
                    cgroup=self.cgroup.path,
                )
            self.remove_cgroup()
        if (
            self.memory_limit is not None
            and not self.out_of_memory
            and ran_out_of_memory(self.protocol.stderr_tail.text())
        ):
            self.out_of_memory = True
            self.log.error(
                "plugin {plugin_id} instance {pid} died of MemoryError: over its memory limit of {limit} bytes",
                plugin_id=self.plugin_id,
                pid=self.pid,
                limit=self.memory_limit,
            )
        self.exited = True
        self.is_ready = False
        self._stop_watching()
        if self._pipe_timer is not None:
            if self._pipe_timer.active():
                self._pipe_timer.cancel()
            self._pipe_timer = None
        if self._kill_timer is not None:
            if self._kill_timer.active():
                self._kill_timer.cancel()
            self._kill_timer = None
        self._supervisor.instance_gone(self)
        message = self.memory_message() if self.out_of_memory else INSTANCE_EXITED_MESSAGE
        self.sessions.fail_all(INSTANCE_EXITED_ERROR_TYPE, message)
        self._supervisor.instance_exited(self)
        waiters, self._exit_waiters = self._exit_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def remove_cgroup(self, again: bool = True) -> None:
        """
        Remove the instance's cgroup; one still holding processes has them
        killed and is tried again a second later, once.
        """
        cgroup = self.cgroup
        try:
            if cgroup.remove():
                return
            reason = "it still holds processes"
        except OSError as exc:
            reason, again = exc.strerror or str(exc), False
        if again:
            self._reactor.callLater(CGROUP_REMOVE_DELAY, self.remove_cgroup, False)
            return
        self.log.warn(
            "plugin {plugin_id} instance {pid}: cannot remove its cgroup {cgroup}: {reason}; left in place",
            plugin_id=self.plugin_id, pid=self.pid, cgroup=cgroup.path, reason=reason,
        )

    def _ready(self, _) -> None:
        self.is_ready = True
        self._watch()
        self._supervisor.instance_ready(self)

    def _not_ready(self, failure) -> None:
        self._supervisor.instance_not_ready(self, failure)

    # -- liveness ---------------------------------------------------------

    def _watch(self) -> None:
        """Look again at the next deadline: the warning's, then the timeout's."""
        policy = self._liveness
        silence = policy.timeout if self._warned else policy.warn_threshold
        deadline = self.protocol.last_active + silence
        delay = max(0.0, deadline - self._reactor.seconds())
        self._liveness_call = self._reactor.callLater(delay, self._check_liveness)

    def _stop_watching(self) -> None:
        call, self._liveness_call = self._liveness_call, None
        if call is not None and call.active():
            call.cancel()

    def _check_liveness(self) -> None:
        self._liveness_call = None
        if self.exited or self.hung:
            return
        policy = self._liveness
        idle = self._reactor.seconds() - self.protocol.last_active
        state = None if self._process_table is None else self._process_table.state(self.pid)
        if idle >= policy.timeout - _DEADLINE_SLACK or is_stopped(state):
            self._declare_hung(idle, state)
            return
        if idle >= policy.warn_threshold - _DEADLINE_SLACK:
            if not self._warned:
                self._warned = True
                self.log.warn(
                    "plugin {plugin_id} instance {pid} silent for {idle:.1f} s"
                    " (hung after {timeout:g} s)",
                    plugin_id=self.plugin_id,
                    pid=self.pid,
                    idle=idle,
                    timeout=policy.timeout,
                )
        else:
            self._warned = False
        self._watch()

    def _declare_hung(self, idle: float, state: str | None = None) -> None:
        """Out of rotation, sessions failed, KILL: in that order, at once."""
        self.hung = True
        self.is_ready = False
        timeout = self._liveness.timeout
        self.log.error(
            "plugin {plugin_id} instance {pid} wrote nothing for {idle:.1f} s (process state {state}):"
            " hung; failing its {count} session(s), killing and replacing it",
            plugin_id=self.plugin_id,
            pid=self.pid,
            idle=idle,
            state=state or "unknown",
            count=len(self.sessions),
        )
        self._supervisor.instance_hung(self)
        self.sessions.fail_all(INSTANCE_HUNG_ERROR_TYPE, hung_message(timeout, state))
        self.kill()

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
        unless told otherwise (default: ``session_timeout``; None with it:
        no limit).
    :param liveness: when a ready instance counts as hung.
    :param on_failed: called with ``(runtime, message)`` when the runtime
        gives up restarting after a successful :meth:`start`.
    :param on_ready: called with ``(runtime)`` whenever an instance joins
        the rotation after :meth:`start` has fired (a restarted instance).
    :param declaration: the plugin's declaration (its permissions decide
        which backwards invocations it may make).
    :param parent_death: the launcher that makes each process die with the
        daemon (:mod:`difydaemon.runtimes.parent_death`); None starts
        ``python -m <entrypoint>`` directly.
    :param process_table: an :class:`~difydaemon.interfaces.IProcessTable`
        used with ``parent_death`` (whose children lead their own process
        groups): stops signal whole groups, leftovers are killed when a
        plugin exits, a stopped plugin is hung.  None signals the plugin's
        process alone.
    :param max_instances: the most instances load may bring (None: just
        ``instance_count``, which is the minimum); see
        :mod:`difydaemon.runtimes.scaling`.
    :param scale_down_delay: seconds the load must not have needed every
        instance before one above ``instance_count`` is stopped.
    :param idle_timeout: seconds without any session after which
        ``on_idle(runtime)`` is called (its owner stops it and starts it
        again on the next request); None: never.
    :param memory_limit: bytes of memory each instance may use (the
        manifest's ``resource.memory``), enforced by the launcher (an
        rlimit, or the cgroup it joins); None, or no ``parent_death``: no limit.
    :param memory_cgroups: the
        :class:`~difydaemon.runtimes.cgroups.MemoryCgroups` that give each
        instance a cgroup v2 ``memory.max`` of ``memory_limit`` instead of
        the launcher's rlimit; None: the rlimit.
    :param on_idle: see ``idle_timeout``.

    ``on_failed``, ``on_ready`` and ``on_idle`` are also attributes, which
    the owner of a runtime made elsewhere sets.

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
        on_ready=None,
        declaration: dict | None = None,
        parent_death: ParentDeathSignal | None = None,
        process_table=None,
        max_instances: int | None = None,
        scale_down_delay: float = 60.0,
        idle_timeout: float | None = None,
        memory_limit: int | None = None,
        on_idle=None,
        memory_cgroups=None,
    ) -> None:
        if instance_count < 1:
            raise ValueError("instance_count must be at least 1")
        self.scaling = ScalingPolicy(
            instance_count, max(instance_count, max_instances or instance_count), scale_down_delay
        )
        self.idle_timeout = idle_timeout
        # only the launcher can set the limit
        self.memory_limit = memory_limit if parent_death is not None else None
        self.memory_cgroups = memory_cgroups if parent_death is not None else None
        self.on_idle = on_idle
        self._idle_call = None
        self._scale_call = None
        self._last_full_at = reactor.seconds()
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
        # only a launched child leads a group whose id is its pid
        self.process_table = process_table if parent_death is not None else None
        self.instance_count = instance_count
        self.max_line_size = max_line_size
        self.readiness_timeout = readiness_timeout
        self.session_timeout = session_timeout
        self.stop_grace_period = stop_grace_period
        self.drain_timeout = session_timeout if drain_timeout is None else drain_timeout
        self.restart_policy = restart_policy
        self.liveness = liveness
        self.on_failed = on_failed
        self.on_ready = on_ready
        self.state = "created"
        self.failure_message: str | None = None
        self._instances: list[LocalInstance] = []
        self._ready: list[LocalInstance] = []
        self._next = 0
        self._restarts: dict[int, object] = {}
        self._restart_delay = restart_policy.min_delay
        #: instances restarted after an exit (read by the metrics)
        self.restarts = 0
        #: instances that ended over their memory limit (read by the metrics)
        self.memory_kills = 0
        self._failed_starts = 0
        self._started: Deferred | None = None
        self._stopped_waiters: list[Deferred] = []
        self._drain: SessionDrain | None = None

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
        Cancelling the Deferred stops the runtime (without draining).
        """
        if self.state != "created":
            raise ValueError(f"runtime of {self.plugin_unique_identifier} is {self.state}")
        self.state = "starting"
        self._started = Deferred(self._cancel_start)
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
        handle = instance.open_session(session_id, request, listener)
        self._cancel_call("_idle_call")
        if self.scaling.scales:
            self._load_changed()
        return handle

    @property
    def in_flight(self) -> int:
        """Sessions open on all instances."""
        return sum(len(instance.sessions) for instance in self._instances)

    # -- load: idle stop and scaling ----------------------------------------

    def _cancel_call(self, name: str) -> None:
        call = getattr(self, name)
        setattr(self, name, None)
        if call is not None and call.active():
            call.cancel()

    def _arm_idle(self) -> None:
        """No session is open: the idle clock starts (unless it runs already)."""
        if self.idle_timeout is None or self.state != "running" or self._idle_call is not None:
            return
        self._idle_call = self._reactor.callLater(self.idle_timeout, self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_call = None
        if self.state != "running" or self.in_flight:
            return
        self.log.info(
            "plugin {plugin_id} had no session for {seconds:g} s: stopping it until the next request",
            plugin_id=self.plugin_id,
            seconds=self.idle_timeout,
        )
        self._tell("on_idle", self)

    def _load_changed(self) -> None:
        """A session opened: note whether every instance is needed, maybe start one more."""
        in_flight = self.in_flight
        count = self._instance_count()
        if in_flight >= count:
            self._last_full_at = self._reactor.seconds()
        starting = count - len(self._ready)
        if self.scaling.scale_up(in_flight, count, starting):
            slot = self._free_slot()
            self.log.info(
                "plugin {plugin_id}: {in_flight} session(s) in flight on {count} instance(s);"
                " starting instance {slot}",
                plugin_id=self.plugin_id,
                in_flight=in_flight,
                count=count,
                slot=slot,
            )
            self._launch(slot)
        self._arm_scale_down()

    def _instance_count(self) -> int:
        """Instances serving, starting or about to restart; not those being retired."""
        return sum(1 for instance in self._instances if not instance.retired) + len(self._restarts)

    def _free_slot(self) -> int:
        used = {instance.slot for instance in self._instances} | set(self._restarts)
        slot = 0
        while slot in used:
            slot += 1
        return slot

    def _arm_scale_down(self) -> None:
        if self._scale_call is not None or self.state != "running":
            return
        if self._instance_count() <= self.scaling.min_instances:
            return
        delay = max(0.0, self._last_full_at + self.scaling.scale_down_delay - self._reactor.seconds())
        self._scale_call = self._reactor.callLater(delay, self._scale_down)

    def _scale_down(self) -> None:
        """Stop one unused instance above the minimum if the load has been lighter for long enough."""
        self._scale_call = None
        if self.state != "running":
            return
        quiet_for = self._reactor.seconds() - self._last_full_at
        count = self._instance_count()
        if self.scaling.scale_down(count, quiet_for):
            unused = [instance for instance in self._instances if not instance.sessions and not instance.retired]
            if unused:
                # the newest goes: the oldest have warm caches
                instance = max(unused, key=lambda instance: instance.slot)
                instance.retired = True
                if instance in self._ready:
                    self._ready.remove(instance)
                self.log.info(
                    "plugin {plugin_id}: load needed fewer than {count} instance(s) for {seconds:g} s;"
                    " stopping instance {pid}",
                    plugin_id=self.plugin_id,
                    count=count,
                    seconds=quiet_for,
                    pid=instance.pid,
                )
                instance.terminate(self.stop_grace_period)
                self._last_full_at = self._reactor.seconds()
        self._arm_scale_down()

    def instance_unused(self, instance: LocalInstance) -> None:
        """The last session of an instance ended."""
        if not self.in_flight:
            self._arm_idle()

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

    def stop(self, drain_timeout: float | None = None, reason: str | None = None) -> Deferred:
        """
        Refuse new sessions, wait for open ones, then TERM every process and
        KILL it after ``stop_grace_period``.  Fires (with None) when every
        process has ended.

        :param drain_timeout: the longest wait for open sessions (None: the
            runtime's ``drain_timeout``).  A stop while stopping can bring
            the end of the wait forward, never push it back.
        :param reason: when given, the sessions still open at the end of
            the wait are failed with it (a -500 whose message is
            ``reason``) before TERM; otherwise they fail with
            ``ConnectionClosedError`` when their process has ended.
        """
        waiter: Deferred = Deferred()
        if self.state == "stopped":
            waiter.callback(None)
            return waiter
        self._stopped_waiters.append(waiter)
        timeout = self.drain_timeout if drain_timeout is None else drain_timeout
        if self.state == "stopping":
            if self._drain is not None:
                self._drain.limit(timeout, reason)
            return waiter
        self.state = "stopping"
        self._cancel_restarts()
        self._cancel_call("_idle_call")
        self._cancel_call("_scale_call")
        self._fail_start(
            errors.InternalServerError("plugin did not become ready: the runtime was stopped")
        )
        self.log.info("stopping plugin {plugin_id}", plugin_id=self.plugin_id)
        drain = self._drain = SessionDrain(
            self._reactor, [instance.sessions for instance in self._instances], self._terminate_all
        )
        if drain.open_sessions:
            self.log.info(
                "plugin {plugin_id}: waiting up to {timeout} s for {count} open session(s)",
                plugin_id=self.plugin_id,
                timeout=timeout,
                count=drain.open_sessions,
            )
        drain.start(timeout, reason)
        return waiter

    # -- supervision ----------------------------------------------------------

    def _memory_cgroup(self):
        """
        A new cgroup enforcing ``memory_limit`` for one instance, or None:
        no limit, no cgroups, or this one could not be made (that instance
        then has the rlimit, and the log says why).
        """
        if self.memory_limit is None or self.memory_cgroups is None:
            return None
        try:
            return self.memory_cgroups.create(self.memory_limit)
        except OSError as exc:
            self.log.warn(
                "plugin {plugin_id}: cannot make a cgroup for its memory limit ({reason}); using RLIMIT_DATA",
                plugin_id=self.plugin_id, reason=exc.strerror or str(exc),
            )
            return None

    def _launch(self, slot: int) -> None:
        self._restarts.pop(slot, None)
        cgroup = self._memory_cgroup()
        argv = child_argv(
            self.parent_death, [self.python, "-m", self.entrypoint], self.memory_limit,
            cgroup.path if cgroup is not None else None,
        )
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
            process_table=self.process_table,
            memory_limit=self.memory_limit,
            cgroup=cgroup,
        )
        try:
            instance.spawn()
        except OSError as exception:
            if cgroup is not None:
                instance.remove_cgroup(again=False)
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
            self._arm_idle()
            started.callback(None)
        elif self.state == "running" and not instance.retired:
            self._ready.append(instance)
            self._tell("on_ready", self)
        elif instance.retired:
            # stopped while it started (load fell): already TERMed
            pass
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

    def instance_hung(self, instance: LocalInstance) -> None:
        """
        A ready instance stopped writing, or went over its memory limit:
        out of rotation, replaced now.
        """
        if instance in self._ready:
            self._ready.remove(instance)
        if self.state in ("running", "starting"):
            instance.replaced = True
            reason = instance.memory_message() if instance.out_of_memory else "it stopped responding"
            self._schedule_restart(instance.slot, instance.started_at, reason)

    def instance_gone(self, instance: LocalInstance) -> None:
        """An instance's process ended: no more sessions for it."""
        if instance in self._ready:
            self._ready.remove(instance)
        self._instances.remove(instance)

    def instance_exited(self, instance: LocalInstance) -> None:
        """An instance's process ended and its sessions have been failed."""
        if instance.out_of_memory:
            self.memory_kills += 1
        self.log.info(
            "plugin {plugin_id} instance {pid} {how}",
            plugin_id=self.plugin_id,
            pid=instance.pid,
            how=instance.describe_exit(),
        )
        if self.state in ("running", "starting") and not instance.replaced and not instance.retired:
            if instance.protocol.is_ready:
                self._schedule_restart(instance.slot, instance.started_at, instance.describe_exit())
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
                f" in a row. Last failure: {message}",
                None,
            )
            return
        self._schedule_restart(slot, started_at)

    def _schedule_restart(self, slot: int, started_at, reason: str | None = None) -> None:
        if slot in self._restarts:
            return
        policy = self.restart_policy
        now = self._reactor.seconds()
        if started_at is not None and now - started_at >= policy.stable_after:
            self._restart_delay = policy.min_delay
        delay = self._restart_delay
        self._restart_delay = min(delay * policy.factor, policy.max_delay)
        self.log.info(
            "restarting plugin {plugin_id} instance in {delay:g} s ({reason})",
            plugin_id=self.plugin_id,
            delay=delay,
            reason=reason or "it did not start",
        )
        self.restarts += 1
        self._restarts[slot] = self._reactor.callLater(delay, self._launch, slot)

    def _fail(self, message: str, start_error) -> None:
        """Mark the runtime failed: no restarts, every process stopped."""
        was_starting = self.state == "starting"
        self.state = "failed"
        self.failure_message = message
        self._cancel_restarts()
        self._cancel_call("_idle_call")
        self._cancel_call("_scale_call")
        self.log.error(
            "plugin {plugin_id} runtime failed: {reason}",
            plugin_id=self.plugin_id,
            reason=message,
        )
        for instance in list(self._instances):
            instance.terminate(self.stop_grace_period)
        if was_starting:
            self._fail_start(start_error)
        else:
            self._tell("on_failed", self, message)

    def _tell(self, hook: str, *args) -> None:
        """Call the owner's ``on_ready``/``on_failed``, if any; a bug there is logged."""
        callback = getattr(self, hook)
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:
            self.log.failure(
                "{hook} callback of plugin {plugin_id} failed", hook=hook, plugin_id=self.plugin_id
            )

    def _cancel_start(self, started: Deferred) -> None:
        # Deferred.cancel then fails ``started`` with CancelledError.
        if self._started is started:
            self._started = None
            self.stop(drain_timeout=0)

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
