"""
Running functions: each deployed package is one SDK process serving HTTP
(``INSTALL_METHOD=serverless``) on a port of its own, kept running.

:class:`Function` supervises one such process the way Twisted's
``procmon`` does: a process that dies is started again after a delay that
doubles (up to :data:`MAX_RESTART_DELAY`) while it keeps dying soon after
starting, and falls back to :data:`MIN_RESTART_DELAY` once it has run for
:data:`STABLE_AFTER` seconds.  A running function is asked ``/health``
every :data:`LIVENESS_INTERVAL` seconds; one that fails
:data:`LIVENESS_FAILURES` checks in a row is hung, and is killed (and so
restarted).  It is restarted on the same port, so the
function URL the daemon stored stays good.  A stop sends TERM, then KILL
after a grace period.  Every process is started through the daemon's
parent-death launcher (:mod:`difydaemon.runtimes.parent_death`), so none
outlives a connector killed by SIGKILL.

:class:`FunctionTable` holds the running functions by package file name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from attrs import field, frozen
from twisted.internet import error as internet_error
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger

from difydaemon.runtimes.parent_death import ParentDeathSignal, child_argv
from difydaemon.runtimes.process import RollingTail, describe_exit
from difydaemon.sri.wire import FunctionItem

log = Logger()

#: seconds before the first restart of a function that died
MIN_RESTART_DELAY = 1.0
#: the longest wait between restarts of a function that keeps dying
MAX_RESTART_DELAY = 60.0
#: seconds of running after which a death counts as new, not as a crash loop
STABLE_AFTER = 30.0
#: seconds between TERM and KILL when a function is stopped (the SDK dies on TERM)
STOP_GRACE_PERIOD = 3.0
#: seconds between two health checks while a function starts
HEALTH_POLL_INTERVAL = 0.1
#: seconds between two health checks of a running function
LIVENESS_INTERVAL = 10.0
#: failed health checks in a row after which a running function counts as
#: hung and is killed (then restarted): about 30 s of not answering
LIVENESS_FAILURES = 3
#: bytes of a function's stdout and stderr kept for error messages
TAIL_SIZE = 4096

STATE_STARTING = "starting"
STATE_RUNNING = "running"
STATE_RESTARTING = "restarting"
STATE_STOPPED = "stopped"


class FunctionStartError(Exception):
    """A function did not start answering; the message says how it failed, with its output."""


@frozen
class FunctionSpec:
    """
    Everything needed to run one function.

    :ivar filename: the package file name it is known by (``instances``).
    :ivar name: the function's name.
    :ivar function_id: its ``ID``.
    :ivar host: the address it binds.
    :ivar port: its port.
    :ivar argv: the command line (``<venv python> -m <entrypoint>``).
    :ivar env: its whole environment.
    :ivar path: its working directory.
    """

    filename: str
    name: str
    function_id: str
    host: str
    port: int
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(hash=False, repr=False)
    path: str

    @property
    def endpoint(self) -> str:
        """The function URL: ``http://host:port`` (no path, no ``,`` or ``=``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class _FunctionProtocol(ProcessProtocol):
    """Logs one function process's output line by line, keeps its tails, and reports its end."""

    def __init__(self, name: str, ended: Callable[[_FunctionProtocol], None]) -> None:
        self._name = name
        self._ended = ended
        self.tails = {1: RollingTail(TAIL_SIZE), 2: RollingTail(TAIL_SIZE)}
        self._partial = {1: b"", 2: b""}
        self.exited = False
        self.exit_code: int | None = None
        self.exit_signal: int | None = None

    def connectionMade(self) -> None:
        # the SDK in serverless mode reads nothing from stdin
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD not in self.tails:
            return
        self.tails[childFD].write(data)
        lines = (self._partial[childFD] + data).split(b"\n")
        partial = lines.pop()
        if len(partial) > TAIL_SIZE:
            lines.append(partial)
            partial = b""
        self._partial[childFD] = partial
        for line in lines:
            self._log(childFD, line)

    def _log(self, childFD: int, line: bytes) -> None:
        if line.strip():
            log.info(
                "function {function} {stream}: {line}",
                function=self._name,
                stream="stdout" if childFD == 1 else "stderr",
                line=line.decode("utf-8", "replace").rstrip(),
            )

    def processEnded(self, reason) -> None:
        for childFD, partial in self._partial.items():
            if partial:
                self._log(childFD, partial)
        value = reason.value
        if isinstance(value, (internet_error.ProcessDone, internet_error.ProcessTerminated)):
            self.exit_code = value.exitCode
            self.exit_signal = value.signal
        self.exited = True
        self._ended(self)

    def describe(self) -> str:
        """How it ended, and the end of its output."""
        parts = [describe_exit(self.exit_code, self.exit_signal) if self.exited else "still running"]
        for childFD, label in ((2, "stderr"), (1, "stdout")):
            if len(self.tails[childFD]):
                parts.append(f"{label}:\n{self.tails[childFD].text()}")
        return "\n".join(parts)

    def signal(self, name: str) -> None:
        """Send a signal unless it has ended."""
        if self.exited or self.transport is None:
            return
        try:
            self.transport.signalProcess(name)
        except internet_error.ProcessExitedAlready:
            pass


class Function:
    """
    One deployed package, its process kept running.

    :param reactor: spawns, keeps time.
    :param spec: what to run.
    :param probe: ``probe(url) -> Deferred[bool]``: whether ``GET url/health`` answered 200.
    :param parent_death: the launcher that makes the process die with the connector.
    :ivar state: ``starting``, ``running``, ``restarting`` or ``stopped``.
    :ivar restarts: how many times it was started again after dying.
    """

    def __init__(
        self,
        reactor,
        spec: FunctionSpec,
        probe: Callable[[str], Deferred],
        parent_death: ParentDeathSignal | None = None,
        start_timeout: float = 60.0,
        stop_grace_period: float = STOP_GRACE_PERIOD,
    ) -> None:
        self._reactor = reactor
        self.spec = spec
        self._probe = probe
        self._parent_death = parent_death
        self._start_timeout = start_timeout
        self._stop_grace_period = stop_grace_period
        self.state = STATE_STARTING
        self.restarts = 0
        self._delay = MIN_RESTART_DELAY
        self._restart_call = None
        self._kill_call = None
        self._protocol: _FunctionProtocol | None = None
        self._started_at = 0.0
        self._exit_waiters: list[Deferred] = []
        self._liveness_call = None
        self._liveness_failures = 0

    @property
    def pid(self) -> int | None:
        """The running process's id, or None."""
        protocol = self._protocol
        if protocol is None or protocol.exited or protocol.transport is None:
            return None
        return protocol.transport.pid

    def item(self) -> FunctionItem:
        """How ``instances`` lists it."""
        return FunctionItem(self.spec.function_id, self.spec.name, self.spec.endpoint, self.state)

    # -- starting ------------------------------------------------------------------

    def start(self) -> Deferred:
        """
        Start the process and wait until it answers ``/health``.

        Fires with None; fails with :class:`FunctionStartError` when the
        process cannot be spawned, exits first, or does not answer within
        the start timeout (it is then killed and not restarted).
        """
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        protocol = self._spawn()
        try:
            await self._until_healthy(protocol)
        except FunctionStartError:
            self.state = STATE_STOPPED
            protocol.signal("KILL")
            raise
        self.state = STATE_RUNNING
        self._watch()

    def _spawn(self) -> _FunctionProtocol:
        protocol = _FunctionProtocol(self.spec.name, self._process_ended)
        argv = child_argv(self._parent_death, self.spec.argv)
        self._protocol = protocol
        self._started_at = self._reactor.seconds()
        try:
            self._reactor.spawnProcess(protocol, argv[0], argv, env=dict(self.spec.env), path=self.spec.path)
        except OSError as error:
            self._protocol = None
            self.state = STATE_STOPPED
            raise FunctionStartError(f"cannot start the function: {error}") from None
        log.info(
            "function {function} started on {endpoint} (pid {pid})",
            function=self.spec.name,
            endpoint=self.spec.endpoint,
            pid=self.pid,
        )
        return protocol

    async def _until_healthy(self, protocol: _FunctionProtocol) -> None:
        deadline = self._reactor.seconds() + self._start_timeout
        while True:
            if protocol.exited or self.state == STATE_STOPPED:
                raise FunctionStartError(f"the function exited before answering: {protocol.describe()}")
            try:
                healthy = await self._probe(self.spec.endpoint)
            except Exception:
                healthy = False
            if healthy and not protocol.exited:
                return
            if self._reactor.seconds() >= deadline:
                raise FunctionStartError(
                    f"the function did not answer GET /health within {self._start_timeout:g} s: {protocol.describe()}"
                )
            await deferLater(self._reactor, HEALTH_POLL_INTERVAL, lambda: None)

    # -- dying and restarting --------------------------------------------------------

    # -- liveness ----------------------------------------------------------------------

    def _watch(self) -> None:
        """Check /health again in a while."""
        self._liveness_failures = 0
        self._liveness_call = self._reactor.callLater(LIVENESS_INTERVAL, self._check_liveness)

    def _unwatch(self) -> None:
        call, self._liveness_call = self._liveness_call, None
        if call is not None and call.active():
            call.cancel()

    def _check_liveness(self) -> None:
        self._liveness_call = None
        protocol = self._protocol
        if self.state != STATE_RUNNING or protocol is None or protocol.exited:
            return
        Deferred.fromCoroutine(self._liveness_checked(protocol)).addErrback(
            lambda failure: log.failure("checking {function} failed", failure, function=self.spec.name)
        )

    async def _liveness_checked(self, protocol: _FunctionProtocol) -> None:
        try:
            healthy = await self._probe(self.spec.endpoint)
        except Exception:
            healthy = False
        if protocol is not self._protocol or self.state != STATE_RUNNING or protocol.exited:
            return
        if healthy:
            self._liveness_failures = 0
        else:
            self._liveness_failures += 1
            if self._liveness_failures >= LIVENESS_FAILURES:
                log.warn(
                    "function {function} did not answer /health {count} times in a row: killing it",
                    function=self.spec.name,
                    count=self._liveness_failures,
                )
                protocol.signal("KILL")
                return
        self._liveness_call = self._reactor.callLater(LIVENESS_INTERVAL, self._check_liveness)

    def _process_ended(self, protocol: _FunctionProtocol) -> None:
        if protocol is self._protocol:
            self._unwatch()
        if self._kill_call is not None and self._kill_call.active():
            self._kill_call.cancel()
        self._kill_call = None
        waiters, self._exit_waiters = self._exit_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if protocol is not self._protocol or self.state in (STATE_STOPPED, STATE_STARTING):
            # a stop, or a first start that failed (its caller reports it)
            return
        ran = self._reactor.seconds() - self._started_at
        if ran >= STABLE_AFTER:
            self._delay = MIN_RESTART_DELAY
        log.warn(
            "function {function} died ({how}) after {ran:.1f} s; restarting in {delay:g} s",
            function=self.spec.name,
            how=describe_exit(protocol.exit_code, protocol.exit_signal),
            ran=ran,
            delay=self._delay,
        )
        self.state = STATE_RESTARTING
        self._restart_call = self._reactor.callLater(self._delay, self._restart)
        self._delay = min(self._delay * 2, MAX_RESTART_DELAY)

    def _restart(self) -> None:
        self._restart_call = None
        if self.state == STATE_STOPPED:
            return
        self.restarts += 1
        try:
            protocol = self._spawn()
        except FunctionStartError as error:
            log.error("function {function} could not be restarted: {error}", function=self.spec.name, error=str(error))
            self.state = STATE_STOPPED
            return
        self.state = STATE_RESTARTING
        Deferred.fromCoroutine(self._restarted(protocol)).addErrback(
            lambda failure: log.failure("watching the restart of {function} failed", failure, function=self.spec.name)
        )

    async def _restarted(self, protocol: _FunctionProtocol) -> None:
        try:
            await self._until_healthy(protocol)
        except FunctionStartError as error:
            if protocol is self._protocol and not protocol.exited:
                # it will be restarted once it has died
                log.warn("function {function} did not come back: {error}", function=self.spec.name, error=str(error))
                protocol.signal("KILL")
            return
        if protocol is self._protocol and self.state == STATE_RESTARTING:
            self.state = STATE_RUNNING
            self._watch()
            log.info("function {function} is back", function=self.spec.name)

    # -- stopping ----------------------------------------------------------------------

    def stop(self) -> Deferred:
        """Stop for good: TERM, KILL after the grace period; fires once the process has ended."""
        self.state = STATE_STOPPED
        self._unwatch()
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        self._restart_call = None
        protocol = self._protocol
        waiter: Deferred = Deferred()
        if protocol is None or protocol.exited:
            waiter.callback(None)
            return waiter
        self._exit_waiters.append(waiter)
        if self._kill_call is None:
            protocol.signal("TERM")
            self._kill_call = self._reactor.callLater(self._stop_grace_period, protocol.signal, "KILL")
        return waiter


class FunctionTable:
    """The running functions, by package file name."""

    def __init__(self) -> None:
        self._functions: dict[str, Function] = {}

    def get(self, filename: str) -> Function | None:
        """The function of a package, if one is deployed."""
        return self._functions.get(filename)

    def forget(self, filename: str) -> None:
        """Drop a package's function from the table (one that is stopped for good)."""
        self._functions.pop(filename, None)

    def add(self, function: Function) -> None:
        """Deploy ``function`` (after its start succeeded)."""
        self._functions[function.spec.filename] = function

    def functions(self) -> list[Function]:
        """The deployed functions."""
        return list(self._functions.values())

    def ports(self) -> set[int]:
        """The ports functions hold."""
        return {function.spec.port for function in self._functions.values()}

    def remove(self, filename: str) -> Deferred:
        """Stop and forget a package's function; fires with whether there was one."""
        function = self._functions.pop(filename, None)
        if function is None:
            done: Deferred = Deferred()
            done.callback(False)
            return done
        return function.stop().addCallback(lambda _: True)

    def stop_all(self) -> Deferred:
        """Stop every function; fires once all have ended."""
        functions, self._functions = list(self._functions.values()), {}
        return DeferredList([function.stop() for function in functions], consumeErrors=True).addCallback(
            lambda _: None
        )

    def __len__(self) -> int:
        return len(self._functions)
