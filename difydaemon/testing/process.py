"""
A fake process reactor for tests of code that spawns subprocesses.

:class:`FakeProcessReactor` is a ``MemoryReactorClock`` that also provides
``IReactorProcess``: :meth:`~FakeProcessReactor.spawnProcess` records the
call, connects the protocol to a :class:`FakeProcessTransport` and returns
it.  The test then plays the child: it feeds stdout and stderr bytes, reads
what was written to stdin, looks at the signals sent, and ends the process
with an exit code or a signal.  Time moves only when the test advances the
clock.
"""

from __future__ import annotations

import signal as signal_module

from attrs import frozen
from twisted.internet import error
from twisted.internet.interfaces import IAddress, IProcessTransport, IReactorProcess
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

#: Signals whose default action a fake child obeys unless told otherwise.
DEFAULT_FATAL_SIGNALS = frozenset({"KILL"})


@implementer(IAddress)
@frozen
class FakeProcessAddress:
    """The address of either end of a fake process's pipes."""


@frozen
class SpawnedProcess:
    """One recorded ``spawnProcess`` call and the transport it returned."""

    protocol: object
    executable: object
    args: list
    env: dict | None
    path: object
    uid: int | None
    gid: int | None
    usePTY: bool
    childFDs: dict | None
    transport: FakeProcessTransport


@implementer(IProcessTransport)
class FakeProcessTransport:
    """
    The parent's side of one fake child process.

    :ivar written: every ``bytes`` written to the child's stdin, in order.
    :ivar signals: every signal sent (``"TERM"``, ``"KILL"``, ...), in order.
    :ivar stdin_closed: whether the parent closed the child's stdin.
    :ivar fatal_signals: signals that end the child, with the signal's
        number as the reason, through ``reactor.callLater(0, ...)`` (so not
        inside ``signalProcess``, as with a real kernel); others are only
        recorded.
    :ivar ended: whether ``processEnded`` has been delivered.
    """

    disconnecting = False

    def __init__(self, reactor, protocol, pid: int, fatal_signals=DEFAULT_FATAL_SIGNALS) -> None:
        self._reactor = reactor
        self.proto = protocol
        self.pid: int | None = pid
        self.written: list[bytes] = []
        self.signals: list[str] = []
        self.stdin_closed = False
        self.fatal_signals = frozenset(fatal_signals)
        self.ended = False
        self.reaped = False
        self.pipes_closed_by_parent = False
        self._ending = False
        self._held: Failure | None = None

    # -- IProcessTransport -------------------------------------------------

    def write(self, data: bytes) -> None:
        """Record bytes written to the child's stdin."""
        if not isinstance(data, bytes):
            raise TypeError("Data must be bytes")
        self.written.append(data)

    def writeSequence(self, seq) -> None:
        """Record several writes to the child's stdin."""
        for data in seq:
            self.write(data)

    def writeToChild(self, childFD: int, data: bytes) -> None:
        """Record bytes for stdin; other descriptors are refused."""
        if childFD != 0:
            raise KeyError(childFD)
        self.write(data)

    def closeStdin(self) -> None:
        """Remember that stdin was closed."""
        self.stdin_closed = True

    def closeStdout(self) -> None:
        """Nothing to do: the fake has no pipes."""

    def closeStderr(self) -> None:
        """Nothing to do: the fake has no pipes."""

    def closeChildFD(self, descriptor: int) -> None:
        """Close stdin when asked for descriptor 0."""
        if descriptor == 0:
            self.closeStdin()

    def loseConnection(self) -> None:
        """
        Close stdin, as a real process transport does; once the child has
        exited with its pipes held (:meth:`exit_holding_pipes`), close
        them, which delivers ``processEnded``.
        """
        self.closeStdin()
        if self._held is not None and not self.ended:
            self.pipes_closed_by_parent = True
            reason, self._held = self._held, None
            self._close_pipes(reason)

    def signalProcess(self, signalID) -> None:
        """
        Record a signal; end the child if it is fatal.

        :raises twisted.internet.error.ProcessExitedAlready: if the child
            has ended.
        """
        if self.ended or self.reaped or self.pid is None:
            raise error.ProcessExitedAlready()
        self.signals.append(signalID)
        if signalID in self.fatal_signals and not self._ending:
            self._ending = True
            self._reactor.callLater(0, self._end_by_signal, _signal_number(signalID))

    def getPeer(self):
        """The fake child as an address."""
        return FakeProcessAddress()

    def getHost(self):
        """The fake parent as an address."""
        return FakeProcessAddress()

    # -- playing the child ------------------------------------------------

    def stdin_bytes(self) -> bytes:
        """Everything written to stdin so far, joined."""
        return b"".join(self.written)

    def stdout(self, data: bytes) -> None:
        """The child writes ``data`` on stdout."""
        self._require_running()
        self.proto.childDataReceived(1, data)

    def stderr(self, data: bytes) -> None:
        """The child writes ``data`` on stderr."""
        self._require_running()
        self.proto.childDataReceived(2, data)

    def exit(self, code: int = 0) -> None:
        """The child exits with ``code``: ``processEnded`` is delivered now."""
        self._end(_exit_reason(code))

    def kill_by_signal(self, signal_number: int) -> None:
        """A signal ends the child: ``processEnded`` is delivered now."""
        self._end(Failure(error.ProcessTerminated(signal=signal_number)))

    def exit_holding_pipes(self, code: int = 0) -> None:
        """
        The child exits with ``code`` but something it spawned keeps its
        pipes open: ``processExited`` is delivered now, ``processEnded``
        only when the parent closes the pipes (:meth:`loseConnection`) or
        the test calls :meth:`release_pipes`.
        """
        self._require_running()
        reason = _exit_reason(code)
        self.reaped = True
        self._ending = True
        self.pid = None
        self._held = reason
        self.proto.processExited(reason)

    def release_pipes(self) -> None:
        """What held the pipes of an exited child ends: ``processEnded`` is delivered."""
        reason, self._held = self._held, None
        if reason is not None and not self.ended:
            self._close_pipes(reason)

    def _end_by_signal(self, signal_number: int) -> None:
        if not self.ended and not self.reaped:
            self.kill_by_signal(signal_number)

    def _end(self, reason: Failure) -> None:
        self._require_running()
        self.reaped = True
        self._ending = True
        self.pid = None
        self.proto.processExited(reason)
        self._close_pipes(reason)

    def _close_pipes(self, reason: Failure) -> None:
        self.ended = True
        for fd in (0, 1, 2):
            self.proto.childConnectionLost(fd)
        self.proto.processEnded(reason)

    def _require_running(self) -> None:
        if self.ended or self.reaped:
            raise error.ProcessExitedAlready()


def _exit_reason(code: int) -> Failure:
    if code == 0:
        return Failure(error.ProcessDone(0))
    return Failure(error.ProcessTerminated(exitCode=code))


def _signal_number(signal_id) -> int:
    if isinstance(signal_id, int):
        return signal_id
    return int(getattr(signal_module, "SIG" + signal_id))


@implementer(IReactorProcess)
class FakeProcessReactor(MemoryReactorClock):
    """
    A memory reactor with a clock that records ``spawnProcess`` calls.

    :ivar spawned: every :class:`SpawnedProcess`, in order.
    :ivar spawn_error: when set, the next ``spawnProcess`` raises it (and
        clears it), as a real reactor raises ``OSError`` for a missing
        executable.
    :ivar fatal_signals: the ``fatal_signals`` of transports spawned from
        now on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[SpawnedProcess] = []
        self.spawn_error: BaseException | None = None
        self.fatal_signals = DEFAULT_FATAL_SIGNALS
        self._next_pid = 1000

    def spawnProcess(
        self,
        processProtocol,
        executable,
        args=(),
        env=None,
        path=None,
        uid=None,
        gid=None,
        usePTY=False,
        childFDs=None,
    ):
        """Record the call, connect the protocol, return its transport."""
        if self.spawn_error is not None:
            exception, self.spawn_error = self.spawn_error, None
            raise exception
        self._next_pid += 1
        transport = FakeProcessTransport(
            self, processProtocol, self._next_pid, self.fatal_signals
        )
        self.spawned.append(
            SpawnedProcess(
                processProtocol,
                executable,
                list(args),
                None if env is None else dict(env),
                path,
                uid,
                gid,
                usePTY,
                childFDs,
                transport,
            )
        )
        processProtocol.makeConnection(transport)
        return transport

    @property
    def running_processes(self) -> list[SpawnedProcess]:
        """The spawned processes that have not ended."""
        return [spawned for spawned in self.spawned if not spawned.transport.ended]
