"""
The process protocol of one local plugin subprocess (``runtimes.md`` §1.4,
§1.5).

:class:`PluginProcessProtocol` only frames: it feeds stdout through the
codec, hands session messages to its owner, logs the plugin's log and error
events, keeps the tails of stderr and of non-JSON stdout for error messages,
and turns the first heartbeat into readiness.

Whatever the plugin writes that is not protocol -- its ``log`` events, a
stray ``print()`` on stdout, any stderr line -- is logged in the namespace
``difydaemon.plugin`` with the fields ``plugin_id``, ``instance``, ``pid``,
``stream`` (``log``, ``stdout`` or ``stderr``) and ``plugin_message``, so a
JSON log can be filtered per plugin; such a line never breaks a session.  What a session message or an
exit means is the owner's business (:mod:`difydaemon.runtimes.local`).
"""

from __future__ import annotations

from twisted.internet import error as internet_error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel

from difydaemon import errors
from difydaemon.observability.logs import PLUGIN_NAMESPACE
from difydaemon.runtimes.codec import (
    ForeignLine,
    Heartbeat,
    Log,
    MalformedLine,
    OversizedLine,
    PluginErrorEvent,
    PluginOutputDecoder,
    SessionMessage,
)

DEFAULT_TAIL_SIZE = 4096

#: the plugins' own output, as log events (module level: a Logger class
#: attribute would take its namespace from the class)
_plugin_log = Logger(namespace=PLUGIN_NAMESPACE)

#: how much of a JSON line without an event (the SDK's manifest dump) is logged
_JSON_LINE_LOGGED = 1024

_LOG_LEVELS = {
    "debug": LogLevel.debug,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "fatal": LogLevel.error,
    "critical": LogLevel.error,
}


def log_level(level: str) -> LogLevel:
    """The daemon log level of a plugin log level name (anything else: info)."""
    return _LOG_LEVELS.get(level.lower(), LogLevel.info)


class RollingTail:
    """The newest ``size`` bytes written to it."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data = bytearray()

    def write(self, data: bytes) -> None:
        """Append ``data``, forgetting what falls off the front."""
        buffer = self._data
        buffer += data
        excess = len(buffer) - self.size
        if excess > 0:
            del buffer[:excess]

    def text(self) -> str:
        """The kept bytes as text, stripped."""
        return self._data.decode("utf-8", "replace").strip()

    def __len__(self) -> int:
        return len(self._data)


def describe_exit(exit_code: int | None, signal: int | None) -> str:
    """``exited with code 1``, ``killed by signal 9``."""
    if exit_code is not None:
        return f"exited with code {exit_code}"
    if signal is not None:
        return f"killed by signal {signal}"
    return "exited"


class PluginProcessProtocol(ProcessProtocol):
    """
    Frames one plugin subprocess for its owner.

    The owner gets plain method calls: ``session_message(item)`` for each
    :class:`~difydaemon.runtimes.codec.SessionMessage` (the hot path),
    ``process_reaped(protocol)`` once when the process itself has exited
    (its pipes may still be held open by what it spawned), and
    ``process_ended(protocol)`` once, when the process has exited and its
    pipes are closed, after :attr:`ready` has been settled.

    :ivar ready: fires with None on the first heartbeat; fails with an
        :class:`~difydaemon.errors.InternalServerError` naming the failed
        step, with the output tails, if the process exits first or no
        heartbeat comes within ``readiness_timeout`` (the process is then
        killed).
    :ivar last_active: ``reactor.seconds()`` of the latest stdout or
        stderr bytes.
    :ivar reaped: whether the process itself has exited (its pid may be
        reused from then on).
    :ivar exit_code: set when the process has ended (None if a signal
        ended it).
    :ivar exit_signal: the signal that ended it, if any.
    """

    log = Logger()

    def __init__(
        self,
        owner,
        reactor,
        plugin_id: str,
        max_line_size: int,
        readiness_timeout: float,
        tail_size: int = DEFAULT_TAIL_SIZE,
        instance: int | None = None,
    ) -> None:
        self._owner = owner
        self._reactor = reactor
        self.plugin_id = plugin_id
        #: which of the plugin's instances this is (its slot), for the log
        self.instance = instance
        self._decoder = PluginOutputDecoder(max_line_size)
        self._readiness_timeout = readiness_timeout
        self._readiness_timer = None
        self.ready: Deferred = Deferred()
        self.is_ready = False
        self.stderr_tail = RollingTail(tail_size)
        self.stdout_tail = RollingTail(tail_size)
        self._stderr_partial = b""
        self.last_active = reactor.seconds()
        self.reaped = False
        self.ended = False
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        #: Whether KILL has been sent; a TERM after it would be noise.
        self.killed = False
        # Set when stdout broke the protocol; later output is not read.
        self._reading = True

    @property
    def pid(self) -> int | None:
        """The process id, while it runs."""
        return self.transport.pid if self.transport is not None else None

    def connectionMade(self) -> None:
        self.last_active = self._reactor.seconds()
        self._readiness_timer = self._reactor.callLater(
            self._readiness_timeout, self._readiness_expired
        )

    def outReceived(self, data: bytes) -> None:
        self.last_active = self._reactor.seconds()
        if not self._reading:
            return
        owner = self._owner
        for item in self._decoder.feed(data):
            # Session messages first: they are nearly every item.
            if type(item) is SessionMessage:
                owner.session_message(item)
            elif type(item) is Heartbeat:
                if not self.is_ready:
                    self._became_ready()
            else:
                self._handle_other(item)
                if not self._reading:
                    return

    def _handle_other(self, item) -> None:
        if isinstance(item, Log):
            _plugin_log.emit(
                log_level(item.level),
                "plugin {plugin_id}: {plugin_message}",
                plugin_id=self.plugin_id,
                instance=self.instance,
                pid=self.pid,
                stream="log",
                plugin_message=item.message,
                plugin_level=item.level,
                plugin_timestamp=item.timestamp,
            )
        elif isinstance(item, ForeignLine):
            if item.is_json:
                # The SDK's manifest dump and the like: not worth more than debug.
                self._plugin_output(LogLevel.debug, "stdout", item.line[:_JSON_LINE_LOGGED])
            else:
                # a print(): the plugin's own log output, not a protocol error
                self.stdout_tail.write(item.line + b"\n")
                self._plugin_output(LogLevel.info, "stdout", item.line)
        elif isinstance(item, PluginErrorEvent):
            self.log.error(
                "plugin {plugin_id} reported an error: {error}",
                plugin_id=self.plugin_id,
                error=item.data,
            )
        elif isinstance(item, MalformedLine):
            self.log.warn(
                "plugin {plugin_id} sent a malformed session message ({reason}): {line}",
                plugin_id=self.plugin_id,
                reason=item.reason,
                line=item.line[:1024].decode("utf-8", "replace"),
            )
        elif isinstance(item, OversizedLine):
            self._reading = False
            self.log.error(
                "plugin {plugin_id} wrote a stdout line of more than {limit} bytes"
                " (at least {size}); killing it",
                plugin_id=self.plugin_id,
                limit=self._decoder.max_line_size,
                size=item.size,
            )
            self.signal("KILL")

    def errReceived(self, data: bytes) -> None:
        self.last_active = self._reactor.seconds()
        self.stderr_tail.write(data)
        lines = (self._stderr_partial + data).split(b"\n")
        partial = lines.pop()
        if len(partial) > self.stderr_tail.size:
            lines.append(partial)
            partial = b""
        self._stderr_partial = partial
        for line in lines:
            self._log_stderr(line)

    def _log_stderr(self, line: bytes) -> None:
        if line.strip():
            self._plugin_output(LogLevel.warn, "stderr", line)

    def _plugin_output(self, level: LogLevel, stream: str, line: bytes) -> None:
        """One line of the plugin's own output as a log event."""
        _plugin_log.emit(
            level,
            "plugin {plugin_id} {stream}: {plugin_message}",
            plugin_id=self.plugin_id,
            instance=self.instance,
            pid=self.pid,
            stream=stream,
            plugin_message=line.decode("utf-8", "replace").rstrip(),
        )

    def processExited(self, reason) -> None:
        self.reaped = True
        self._owner.process_reaped(self)

    def processEnded(self, reason) -> None:
        self.reaped = True
        self.ended = True
        if self._stderr_partial:
            self._log_stderr(self._stderr_partial)
            self._stderr_partial = b""
        value = reason.value
        if isinstance(value, (internet_error.ProcessDone, internet_error.ProcessTerminated)):
            self.exit_code = value.exitCode
            self.exit_signal = value.signal
        self._cancel_readiness_timer()
        if not self.is_ready:
            self._fail_readiness(describe_exit(self.exit_code, self.exit_signal))
        self._owner.process_ended(self)

    def describe_exit(self) -> str:
        """How the process ended, for messages."""
        return describe_exit(self.exit_code, self.exit_signal)

    def signal(self, name: str) -> bool:
        """Send a signal (``TERM``, ``KILL``); False if it had already exited."""
        if self.ended or self.reaped or self.transport is None:
            return False
        try:
            self.transport.signalProcess(name)
        except internet_error.ProcessExitedAlready:
            return False
        if name == "KILL":
            self.killed = True
        return True

    def output_tails(self) -> str:
        """The stderr tail and the non-JSON stdout tail, labelled."""
        parts = []
        if len(self.stderr_tail):
            parts.append("stderr:\n" + self.stderr_tail.text())
        if len(self.stdout_tail):
            parts.append("stdout:\n" + self.stdout_tail.text())
        return "\n".join(parts)

    def _became_ready(self) -> None:
        self.is_ready = True
        self._cancel_readiness_timer()
        self.ready.callback(None)

    def _readiness_expired(self) -> None:
        self._readiness_timer = None
        if self.is_ready or self.ended:
            return
        self.signal("KILL")
        self._fail_readiness(f"no heartbeat within {self._readiness_timeout:g} s")

    def _fail_readiness(self, what: str) -> None:
        if self.ready.called:
            return
        message = f"plugin did not become ready: {what}"
        tails = self.output_tails()
        if tails:
            message = f"{message}\n{tails}"
        self.ready.errback(errors.InternalServerError(message))

    def _cancel_readiness_timer(self) -> None:
        timer = self._readiness_timer
        if timer is not None:
            self._readiness_timer = None
            timer.cancel()
