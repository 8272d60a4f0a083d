"""
The serverless IPluginRuntime: one function, one HTTP request per session
(``serverless.md`` §3), and the factory the runtime registry brings
serverless identifiers up with (§2.4, §7).

Nothing runs between calls: a runtime is ready as long as it has not been
stopped.  A session is registered in the live-session table before its
request goes out (so the function's backwards transactions find it) and
forgotten when it ends.
"""

from __future__ import annotations

import orjson
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from difydaemon import errors
from difydaemon.interfaces import IPluginRuntime
from difydaemon.invocation.session import InvocationSession
from difydaemon.observability.trace import traceparent_of_progress
from difydaemon.packaging.identifier import parse_identifier
from difydaemon.runtimes.codec import SessionMessage
from difydaemon.runtimes.serverless.batching import (
    BATCHED_ACTIONS,
    BatchMerger,
    BatchMismatch,
    PayloadTooLarge,
    batch_request,
    plan_batches,
)
from difydaemon.runtimes.serverless.connector import (
    UNSUPPORTED,
    ConnectorError,
    FunctionInfo,
    package_filename,
)
from difydaemon.runtimes.serverless.response import Chunk, Failed, Finished, LogLine
from difydaemon.runtimes.serverless.sessions import ServerlessSession
from difydaemon.runtimes.sessions import SessionDrain, SessionTable

log = Logger()

RUNTIME_TYPE = "serverless"
NO_DUPLEX_MESSAGE = "serverless plugins answer backwards invocations over /backwards-invocation/transaction"
STOPPED_MESSAGE = "failed to get plugin runtime: the serverless runtime is stopped"
#: seconds a session stays registered at most (Go's session_info TTL)
SESSION_TTL = 1800.0


class _Handle:
    """A caller's hold on one serverless session: closing it drops the HTTP call."""

    __slots__ = ("_table_handle", "call")

    def __init__(self, table_handle) -> None:
        self._table_handle = table_handle
        self.call: Deferred | None = None

    def close(self) -> None:
        self._table_handle.close()
        call, self.call = self.call, None
        if call is not None:
            call.cancel()


@implementer(IPluginRuntime)
class ServerlessRuntime:
    """
    The runtime of one identifier deployed as a function.

    :param reactor: for drains.
    :param plugin_unique_identifier: the identifier served.
    :param declaration: its declaration.
    :param function: where it runs.
    :param invoker: the daemon's :class:`~.invoke.InvokeClient`.
    :param sessions: the IServerlessSessions transactions look sessions up in.
    :param drain_timeout: seconds :meth:`stop` waits for open sessions by default.
    """

    runtime_type = RUNTIME_TYPE

    def __init__(self, reactor, plugin_unique_identifier: str, declaration: dict, function: FunctionInfo, invoker,
                 sessions, drain_timeout: float = 30.0) -> None:
        self._reactor = reactor
        self.plugin_unique_identifier = plugin_unique_identifier
        self.plugin_id = parse_identifier(plugin_unique_identifier).plugin_id
        self.declaration = declaration
        self.function = function
        self._invoker = invoker
        self._sessions = sessions
        self._drain_timeout = drain_timeout
        self._table = SessionTable(reactor, None)
        # the call of each session that has not had its last outcome yet:
        # only those are dropped at the end of a drain; a call whose session
        # ended is reading the rest of its body, and hanging up on it would
        # cut the function's (or its gateway's) answer short
        self._calls: dict[str, Deferred] = {}
        self._stopping = False
        self._drain: SessionDrain | None = None
        self._stopped: Deferred | None = None

    def repoint(self, function: FunctionInfo) -> None:
        """Send new sessions to another function (an admin reinstall or switch)."""
        self.function = function

    @property
    def session_timeout(self) -> float:
        """Sessions time out in the invoke client (``PLUGIN_MAX_EXECUTION_TIMEOUT``), not in dispatch."""
        return self._invoker.execution_timeout

    def is_ready(self) -> bool:
        return not self._stopping

    def open_session(self, session_id: str, request: dict, listener):
        if self._stopping:
            raise errors.InternalServerError(STOPPED_MESSAGE)
        handle = _Handle(self._table.open(session_id, listener))
        session = self._session_of(listener, request)
        call = Deferred.fromCoroutine(self._run(session_id, request, session))
        if not call.called and session_id in self._table:
            self._calls[session_id] = call
        call.addBoth(self._call_done, call, session_id)
        if not call.called:
            handle.call = call
        return handle

    def _session_of(self, listener, request: dict) -> ServerlessSession:
        """What a transaction of this session may do, from the listener that opened it."""
        invocation = getattr(listener, "invocation_session", None)
        session = invocation() if invocation is not None else None
        if session is None:
            session = InvocationSession.of("", self.plugin_id, request, self)
        return ServerlessSession.of(session, self.plugin_unique_identifier)

    def _call_done(self, result, call: Deferred, session_id: str):
        if self._calls.get(session_id) is call:
            # ended without a last outcome (cancelled, closed while
            # registering): forgotten here, once; a last outcome forgets it
            # as it is delivered
            del self._calls[session_id]
            self._forget(session_id)
        if isinstance(result, Failure):
            if result.check(CancelledError):
                return None
            if result.check(errors.CoordinationUnavailableError):
                # Redis down: the session could not be shared, so its
                # callbacks could not be served; the function was not called
                log.warn("serverless session {session_id} not started: {reason}",
                         session_id=session_id, reason=result.value.reason)
                self._deliver(session_id, Failed(result.value.error_type, result.value.message))
                return None
            log.failure("serverless session {session_id} failed", result, session_id=session_id)
            self._deliver(session_id, Failed(errors.InternalServerError.error_type, "internal server error"))
        return None

    def _forget(self, session_id: str) -> None:
        """Drop a session from the live ones; with Redis down its key expires by itself."""
        self._sessions.forget(session_id).addErrback(_forget_failed, session_id)

    def _deliver(self, session_id: str, outcome) -> None:
        kind = type(outcome)
        if kind is Chunk:
            # the most frequent outcome, first
            self._table.deliver(SessionMessage(session_id, "stream", outcome.data, outcome.raw))
            return
        if kind is Finished or kind is Failed:
            self._calls.pop(session_id, None)
            if kind is Finished:
                self._table.deliver(SessionMessage(session_id, "end", None, None))
            else:
                data = {"error_type": outcome.error_type, "message": outcome.message, "args": outcome.args}
                self._table.deliver(SessionMessage(session_id, "error", data, None))
            # no transaction of an ended session, even while its body
            # drains; forgotten in the same turn as the end is delivered,
            # but after it: the caller's answer is sent first
            self._forget(session_id)
        elif kind is LogLine:
            entry = outcome.log
            log.info(
                "plugin {identifier} [{level}]: {message}",
                identifier=self.plugin_unique_identifier,
                level=entry.level,
                message=entry.message,
            )

    async def _run(self, session_id: str, request: dict, session: ServerlessSession) -> None:
        await self._sessions.register(session, SESSION_TTL)
        if session_id not in self._table:
            return  # closed while registering
        data = request.get("data") or {}
        action = str(data.get("action") or "")
        if action in BATCHED_ACTIONS and isinstance(data.get("texts"), list):
            await self._run_batched(session_id, action, request)
            return
        await self._invoker.call(
            self.function.url, action, session_id, request, lambda outcome: self._deliver(session_id, outcome)
        )

    async def _run_batched(self, session_id: str, action: str, request: dict) -> None:
        """Embedding / num-tokens: batches one after another, one merged result (§3.3)."""
        try:
            batches = plan_batches(request, self._invoker.max_request_bytes)
        except PayloadTooLarge as exc:
            self._deliver(session_id, Failed(errors.InternalServerError.error_type, str(exc)))
            return
        if len(batches) == 1:
            await self._invoker.call(
                self.function.url, action, session_id, request, lambda outcome: self._deliver(session_id, outcome)
            )
            return
        merger = BatchMerger(action, len(request["data"]["texts"]))
        for indexes in batches:
            results: list = []
            failed: list = []

            def collect(outcome) -> None:
                kind = type(outcome)
                if kind is Chunk:
                    results.append(outcome.data)
                elif kind is Failed:
                    failed.append(outcome)
                elif kind is LogLine:
                    self._deliver(session_id, outcome)

            await self._invoker.call(self.function.url, action, session_id, batch_request(request, indexes), collect)
            if failed:
                self._deliver(session_id, failed[0])
                return
            try:
                merger.add(len(indexes), results)
            except BatchMismatch as exc:
                self._deliver(session_id, Failed("PluginDaemonInnerError", str(exc)))
                return
        try:
            merged = merger.result()
        except BatchMismatch as exc:
            self._deliver(session_id, Failed("PluginDaemonInnerError", str(exc)))
            return
        self._deliver(session_id, Chunk(merged, orjson.dumps(merged)))
        self._deliver(session_id, Finished())

    def send(self, session_id: str, message: dict) -> None:
        raise errors.InternalServerError(NO_DUPLEX_MESSAGE)

    def stop(self, drain_timeout=None, reason=None) -> Deferred:
        if self._drain is not None:
            self._drain.limit(drain_timeout, reason)
            return self._when_stopped()
        self._stopping = True
        self._stopped = Deferred()
        self._drain = SessionDrain(self._reactor, [self._table], self._drained)
        self._drain.start(self._drain_timeout if drain_timeout is None else drain_timeout, reason)
        return self._when_stopped()

    def _when_stopped(self) -> Deferred:
        waiter: Deferred = Deferred()
        if self._stopped.called:
            waiter.callback(None)
        else:
            self._stopped.addBoth(lambda result: (waiter.callback(None), result)[1])
        return waiter

    def _drained(self) -> None:
        for call in list(self._calls.values()):
            call.cancel()
        self._stopped.callback(None)


def function_filename(identifier: str, declaration: dict) -> str:
    """The connector's package name of an identifier: manifest author, name, version and the checksum."""
    parsed = parse_identifier(identifier)
    author = declaration.get("author") or parsed.author or ""
    name = declaration.get("name") or parsed.name
    version = declaration.get("version") or parsed.version
    return package_filename(author, name, version, parsed.checksum)


class ServerlessRuntimeFactory:
    """
    Brings serverless identifiers up for the
    :class:`~difydaemon.runtimes.registry.RuntimeRegistry`: an install
    reuses the connector's function of the same package or launches one,
    then records it (``serverless_runtimes``); a daemon start only reads
    the rows back -- nothing runs between calls.

    :param reactor: for the runtimes' drains.
    :param persistence: an IPersistence.
    :param connector: the :class:`~.connector.SRIClient`.
    :param invoker: the :class:`~.invoke.InvokeClient` every runtime shares.
    :param sessions: the IServerlessSessions.
    """

    def __init__(self, reactor, persistence, connector, invoker, sessions) -> None:
        self._reactor = reactor
        self._persistence = persistence
        self.connector = connector
        self._invoker = invoker
        self._sessions = sessions
        # identifier -> the connector's package name, for discard()
        self._filenames: dict[str, str] = {}

    def runtime(self, identifier: str, declaration: dict, function: FunctionInfo) -> ServerlessRuntime:
        """The runtime of a deployed function."""
        self._filenames[identifier] = function_filename(identifier, declaration)
        return ServerlessRuntime(self._reactor, identifier, declaration, function, self._invoker, self._sessions)

    def launch(self, plugin_unique_identifier, declaration, package, progress):
        return Deferred.fromCoroutine(self._launch(plugin_unique_identifier, declaration, package, progress))

    async def _launch(self, identifier, declaration, package, progress, reuse: bool = True) -> ServerlessRuntime:
        function = await self.deploy(identifier, declaration, package, progress, reuse)
        return self.runtime(identifier, declaration, function)

    async def deploy(self, identifier: str, declaration: dict, package: bytes, progress, reuse: bool = True) -> FunctionInfo:
        """
        Find (``reuse``) or launch the function of a package and record it.

        :raises InternalServerError: with the connector's message when it fails.
        """
        filename = function_filename(identifier, declaration)
        # an install's progress carries its span's trace context (ENABLE_OTEL)
        traceparent = traceparent_of_progress(progress)
        try:
            function = await self.connector.find_function(filename, traceparent) if reuse else None
            if function is None or not function.url or not function.name:
                progress("Installing...")
                function = await self.connector.launch(
                    filename, package, bool(declaration.get("verified")), identifier, progress, traceparent
                )
            else:
                progress(f"reusing the connector's function {function.name}")
        except ConnectorError as exc:
            raise errors.InternalServerError(exc.message) from None
        parsed = parse_identifier(identifier)
        await self._persistence.upsert_serverless_runtime(identifier, function.url, function.name, parsed.checksum)
        return function

    def launch_installed(self, plugin_unique_identifier, progress):
        return Deferred.fromCoroutine(self._launch_installed(plugin_unique_identifier))

    async def _launch_installed(self, identifier: str):
        row = await self._persistence.get_serverless_runtime(identifier)
        if row is None:
            return None
        declaration = await self._persistence.get_declaration(identifier)
        return self.runtime(identifier, declaration or {}, FunctionInfo(row.function_name, row.function_url))

    def installed(self):
        d = self._persistence.list_serverless_runtimes()
        return d.addCallback(lambda rows: [row.plugin_unique_identifier for row in rows])

    def discard(self, plugin_unique_identifier):
        """
        The identifier is no longer installed (its row went with the plugins
        row): ask the connector to remove its function, so uninstalls do not
        leak functions (``serverless.md`` §11.7).  Never fails: a connector
        without the route, or one that fails, is logged and left alone.
        """
        return Deferred.fromCoroutine(self._discard(plugin_unique_identifier))

    async def _discard(self, identifier: str) -> None:
        # the manifest's names when this daemon saw them, else the identifier's (the same for any sane package)
        filename = self._filenames.pop(identifier, None) or function_filename(identifier, {})
        try:
            outcome = await self.connector.remove_function(filename)
        except ConnectorError as exc:
            log.warn(
                "plugin {identifier} uninstalled; removing its function {filename} from the connector failed: {error}",
                identifier=identifier, filename=filename, error=exc.message,
            )
            return
        if outcome == UNSUPPORTED:
            log.info(
                "plugin {identifier} uninstalled; the connector cannot remove functions, {filename} stays there",
                identifier=identifier, filename=filename,
            )
        else:
            log.info(
                "plugin {identifier} uninstalled; the connector's function {filename}: {outcome}",
                identifier=identifier, filename=filename, outcome=outcome,
            )


def _forget_failed(failure, session_id: str) -> None:
    if failure.check(errors.CoordinationUnavailableError):
        log.warn("serverless session {session_id} not forgotten now ({reason}); it expires by itself",
                 session_id=session_id, reason=failure.value.reason)
    else:
        log.failure("forgetting serverless session {session_id}", failure, session_id=session_id)
