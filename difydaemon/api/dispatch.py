"""
The dispatch path: ``POST /plugin/<tenant>/dispatch/...`` (``http-api.md``
§2.2, §2.3, §3).

This is the hot path of every Dify workflow step that calls a plugin, so it
is a plain twisted.web leaf resource rather than a Klein route (Klein's
routing costs 0.1 - 0.25 ms of CPU per request: ``performance.md``), and
chunks are relayed as the plugin's own bytes, several per write.

A request goes through the Go daemon's steps in its order: the route (an
unknown one is gin's 404 before any group middleware), ``X-Plugin-ID``,
the tenant's installation, its identifier, the body, the runtime; then the
session's chunks are written as Server-Sent Events (or, for the polling
routes, the last one as one JSON envelope).
"""

from __future__ import annotations

from os import urandom

import orjson
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from difydaemon import errors
from difydaemon.api import envelope, sse
from difydaemon.api.answers import JSON_CONTENT_TYPE
from difydaemon.api.answers import answer_json as _answer
from difydaemon.dispatch_routes import ChunkError, route_table, validate_data
from difydaemon.api.forwarding import HOP_HEADER, hop_refusal
from difydaemon.api.relay import SessionRelay
from difydaemon.interfaces import ISessionListener
from difydaemon.invocation.dispatcher import serve_invoke
from difydaemon.invocation.session import InvocationSession, MalformedInvokeError
from difydaemon.observability.otel import INTERNAL, SERVER
from difydaemon.observability.trace import traceparent_of
from difydaemon.packaging.identifier import parse_identifier

NO_RUNTIME_MESSAGE = "failed to get plugin runtime"
TIMEOUT_MESSAGE = "killed by timeout"
NO_POLLING_RESULT_MESSAGE = "no polling result received from plugin"
INVOKE_DIFY_ERROR = "invoke_dify_error"
#: the metrics' error class of a session ended by the daemon's own check
PLUGIN_INVOKE_ERROR = "PluginInvokeError"

_INTERNAL = errors.InternalServerError.error_type
_PLUGIN_ID_REQUIRED = envelope.from_exception(errors.BadRequestError("plugin_id is required"))
_PLUGIN_NOT_FOUND = envelope.from_exception(errors.PluginNotFoundError("plugin not found"))
_NO_RUNTIME = envelope.from_exception(errors.InternalServerError(NO_RUNTIME_MESSAGE))
_loads = orjson.loads

log = Logger()

# the RFC 4122 variant digit (10xx) for each random hex digit
_VARIANT_DIGIT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def new_session_id() -> str:
    """
    A random (version 4) UUID string; four times as fast as
    ``str(uuid.uuid4())``, which matters on the dispatch path: the version
    digit is written over a random one and the variant digit keeps two
    random bits.
    """
    h = urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT_DIGIT[h[16]]}{h[17:20]}-{h[20:]}"


def _is_json(content_type: bytes | None) -> bool:
    # gin binds JSON for application/json with or without parameters
    if content_type is None:
        return False
    if content_type == b"application/json":
        return True
    return content_type.split(b";", 1)[0].strip().lower() == b"application/json"


def build_plugin_request(session_id: str, route, body: dict, data: dict) -> dict:
    """
    The §0.2 request that opens a session: the eight keys in order, and
    ``data`` = the route's data with ``user_id``, ``type`` and ``action``
    (those three win over same-named data keys: they route the request).
    An empty ``credential_type`` is dropped so the SDK uses its default.
    """
    out = dict(data)
    user_id = body.get("user_id")
    out["user_id"] = user_id if isinstance(user_id, str) else ""
    out["type"] = route.access_type
    out["action"] = route.action
    if "credential_type" in out and not out["credential_type"]:
        del out["credential_type"]
    get = body.get
    return {
        "session_id": session_id,
        "conversation_id": get("conversation_id"),
        "message_id": get("message_id"),
        "app_id": get("app_id"),
        "endpoint_id": get("endpoint_id"),
        "context": get("context"),
        "event": "request",
        "data": out,
    }


class _Relay(SessionRelay):
    """
    What one dispatch request and its plugin session share (beyond the
    session's life, kept by :class:`SessionRelay`): the plugin request,
    the runtime and the chunk check.  Subclasses decide what the response
    looks like.
    """

    __slots__ = (
        "request",
        "plugin_request",
        "session_id",
        "runtime",
        "_check",
        "tenant_id",
        "plugin_id",
        "backwards",
        "route",
        "meter",
        "error_class",
        "span",
    )

    def __init__(self, reactor, request, plugin_request: dict, chunk_check) -> None:
        super().__init__(reactor)
        self.request = request
        self.plugin_request = plugin_request
        self.session_id = plugin_request["session_id"]
        self._check = chunk_check
        self.runtime = None
        #: who the session serves, for backwards invocations
        self.tenant_id = ""
        self.plugin_id = ""
        #: the BackwardsInvocations serving the plugin's calls, or None
        self.backwards = None
        #: the dispatch route (its access type and action label the metrics)
        self.route = None
        #: the InvocationMeter of the open session, when metrics are on
        self.meter = None
        #: why the session failed (the metrics' error class), None while it has not
        self.error_class = None
        #: the session's span, when OpenTelemetry is on
        self.span = None

    # -- life of the request -------------------------------------------------

    def refuse(self, status: int, body: bytes) -> None:
        """Answer a plain JSON envelope: no session was opened."""
        if self.closed:
            return
        if status != 200 and self.error_class is None:
            self.error_class = f"http_{status}"
        self.closed = True
        self._stop_timers()
        _answer(self.request, status, body)

    def session_timed_out(self) -> None:
        """The backstop timeout fired (the runtime has no timeout of its own)."""
        self.error(_INTERNAL, TIMEOUT_MESSAGE, None)

    def _stop_timers(self) -> None:
        # every way a relay closes passes here once: count the session's end
        super()._stop_timers()
        meter = self.meter
        if meter is not None:
            self.meter = None
            error_class = self.error_class
            meter.finish("success" if error_class is None else "error", error_class)
        span = self.span
        if span is not None:
            self.span = None
            span.end(self.error_class)

    def client_gone(self, failure) -> None:
        """The client disconnected: the session ends as an error."""
        if not self.closed and self.error_class is None:
            self.error_class = "client_gone"
        super().client_gone(failure)

    def _fail_session(self, inner: str) -> None:
        """Stop the plugin session and end the response with a PluginInvokeError."""
        self._abandon()
        self.fail_with(inner)

    # -- ISessionListener (the parts every relay shares) ------------------

    def invoke(self, request) -> None:
        """
        The plugin calls back into Dify: hand it to the backwards
        invocations (which answer on the session's runtime), or refuse it
        at once when there are none, so the plugin never waits for its own
        timeout.  A malformed request closes the session's stream.
        """
        if self.closed:
            return
        try:
            serve_invoke(self.backwards, self.invocation_session(), request)
        except MalformedInvokeError as exc:
            self._fail_session(sse.protocol_error_text(INVOKE_DIFY_ERROR, str(exc)))

    def invocation_session(self) -> InvocationSession:
        """Who the session serves and with which permissions (a serverless runtime records it)."""
        return InvocationSession.of(self.tenant_id, self.plugin_id, self.plugin_request, self.runtime)

    def fail_with(self, inner: str) -> None:
        raise NotImplementedError

    def error(self, error_type, message, args) -> None:
        raise NotImplementedError


class TurnFlush:
    """
    Flushes, one reactor turn later, the streams that queued items in this
    turn, with one ``callLater(0)`` for them all: one plugin read holds the
    chunks of many sessions.  When every stream queued in a turn has ended
    within it (an echo's chunk and its end come in one read), the call is
    cancelled and nothing is left behind.

    A stream is added with its ``queued`` flag set, clears it when flushed
    or ended, and calls :meth:`discard` if it ends while still queued.
    """

    __slots__ = ("_reactor", "_relays", "_queued", "_call")

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._relays: list = []
        # streams added this turn and not ended yet
        self._queued = 0
        self._call = None

    def add(self, relay) -> None:
        """Call ``relay.flush()`` one turn from now."""
        self._relays.append(relay)
        self._queued += 1
        if self._call is None:
            self._call = self._reactor.callLater(0, self._run)

    def discard(self) -> None:
        """A stream added this turn has ended; with none left, nothing is to be flushed."""
        self._queued -= 1
        if self._queued == 0 and self._call is not None:
            call, self._call = self._call, None
            call.cancel()
            self._relays = []

    def _run(self) -> None:
        self._call = None
        self._queued = 0
        relays, self._relays = self._relays, []
        for relay in relays:
            # from now on they belong to no turn, whatever flushing one does
            relay.queued = False
        for relay in relays:
            relay.flush()


@implementer(ISessionListener)
class StreamRelay(_Relay):
    """
    Writes a session's chunks as Server-Sent Events (§3.1).

    Chunks delivered within one reactor turn (a plugin read usually holds
    several) go out in one ``request.write``, flushed a turn later by
    ``turns`` or by the end of the stream.

    :param coalesce: batch the writes of one turn; False writes each chunk
        at once.
    :param turns: the :class:`TurnFlush` shared by the streams of one
        resource (one of its own when None).
    """

    __slots__ = ("_pending", "queued", "_turns", "_coalesce", "_started")

    def __init__(self, reactor, request, plugin_request: dict, chunk_check, coalesce: bool = True,
                 turns: TurnFlush | None = None) -> None:
        super().__init__(reactor, request, plugin_request, chunk_check)
        self._pending: list[bytes] = []
        #: whether ``turns`` is to flush this stream
        self.queued = False
        self._turns = turns if turns is not None else TurnFlush(reactor)
        self._coalesce = coalesce
        self._started = False

    def _start(self) -> None:
        self._started = True
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", sse.CONTENT_TYPE)

    def stream(self, chunk, raw) -> None:
        """Check one chunk and queue its item."""
        if self.closed:
            return
        try:
            payload = self._check(chunk, raw)
        except ChunkError as exc:
            self._fail_session(sse.protocol_error_text(exc.error_type, exc.message))
            return
        if payload is None:
            return
        item = sse.SUCCESS_HEAD + payload + sse.ITEM_TAIL
        if not self._coalesce:
            if not self._started:
                self._start()
            self.request.write(item)
            return
        self._pending.append(item)
        if not self.queued:
            self.queued = True
            self._turns.add(self)

    def flush(self) -> None:
        """Write the items queued in the last turn (nothing once closed)."""
        self.queued = False
        if self.closed or not self._pending:
            return
        if not self._started:
            self._start()
        pending, self._pending = self._pending, []
        self.request.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _unqueue(self) -> None:
        if self.queued:
            self.queued = False
            self._turns.discard()

    def end(self) -> None:
        """The plugin finished: write what is queued and finish."""
        self._close(None)

    def error(self, error_type, message, args) -> None:
        """
        The session failed: a daemon-made internal error (the timeout) is
        written as it is; anything else is the plugin's, wrapped in a
        ``PluginInvokeError`` (§3.2).
        """
        if self.error_class is None:
            self.error_class = error_type if isinstance(error_type, str) and error_type else "unknown"
        if error_type == _INTERNAL:
            self._close(sse.error_item(-500, message, error_type))
        else:
            self._close(sse.invoke_error_item(sse.plugin_error_text(error_type, message, args)))

    def fail_with(self, inner: str) -> None:
        """End the stream with a PluginInvokeError around ``inner``."""
        if self.error_class is None:
            self.error_class = PLUGIN_INVOKE_ERROR
        self._close(sse.invoke_error_item(inner))

    def _close(self, last: bytes | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.handle = None
        self._unqueue()
        self._stop_timers()
        pending = self._pending
        if last is not None:
            pending.append(last)
        request = self.request
        if not self._started:
            self._start()
        last = b""
        if pending:
            self._pending = []
            last = pending[0] if len(pending) == 1 else b"".join(pending)
        finish_with = getattr(request, "finish_with", None)
        if finish_with is not None:
            # the lean channel's request: the last items and the end in one send, now
            finish_with(last)
            return
        if last:
            request.write(last)
        request.finish()

    def client_gone(self, failure) -> None:
        """The client disconnected: drop what is queued and abandon the session."""
        self._pending = []
        self._unqueue()
        super().client_gone(failure)


@implementer(ISessionListener)
class PollingRelay(_Relay):
    """
    Answers one plain JSON envelope with the session's last chunk (§2.3).
    """

    __slots__ = ("_last",)

    def __init__(self, reactor, request, plugin_request: dict, chunk_check) -> None:
        super().__init__(reactor, request, plugin_request, chunk_check)
        self._last: bytes | None = None

    def stream(self, chunk, raw) -> None:
        """Check one result; the last one wins."""
        if self.closed:
            return
        try:
            self._last = self._check(chunk, raw)
        except ChunkError as exc:
            self._fail_session(sse.protocol_error_text(exc.error_type, exc.message))

    def end(self) -> None:
        """Answer the last result, or an error if there was none."""
        if self._last is None:
            self.fail_with(NO_POLLING_RESULT_MESSAGE)
        else:
            self._respond(200, b'{"code":0,"message":"success","data":' + self._last + b"}")

    def error(self, error_type, message, args) -> None:
        """The session failed (HTTP 500, as the Go handler answers)."""
        if self.error_class is None:
            self.error_class = error_type if isinstance(error_type, str) and error_type else "unknown"
        if error_type == _INTERNAL:
            self._respond(500, envelope.error(-500, message, error_type))
        else:
            self.fail_with(sse.plugin_error_text(error_type, message, args))

    def fail_with(self, inner: str) -> None:
        """Answer HTTP 500 with a PluginInvokeError around ``inner``."""
        if self.error_class is None:
            self.error_class = PLUGIN_INVOKE_ERROR
        self._respond(500, sse.invoke_error_envelope(inner))

    def _respond(self, status: int, body: bytes) -> None:
        if self.closed:
            return
        self.handle = None
        self.refuse(status, body)


class _Departure:
    """
    Whether the client of one dispatch request has gone, and which relay to
    tell.  It listens to ``notifyFinish`` from the moment the request is
    rendered: on both stacks a ``notifyFinish`` asked for after the client
    left never fires, so one asked for only once the installation lookup
    resolved would miss a client that left during the lookup.

    :ivar gone: True once the client has disconnected.
    :ivar relay: the request's relay once it has one; told of the departure.
    """

    __slots__ = ("gone", "relay")

    def __init__(self) -> None:
        self.gone = False
        self.relay = None

    def __call__(self, failure) -> None:
        """The request's ``notifyFinish`` errback: the client went away."""
        self.gone = True
        relay = self.relay
        if relay is not None:
            relay.client_gone(failure)


class DispatchResource(Resource):
    """
    The leaf under ``/plugin/<tenant>/dispatch/`` (mounted by
    :class:`~difydaemon.api.root.RootResource`, which has checked
    ``X-Api-Key``; ``request.postpath`` is ``[tenant, b"dispatch", *route]``).
    The daemon's connections usually reach it without twisted.web, through
    :class:`~difydaemon.api.dispatch_channel.DispatchChannel`, whose
    requests offer only the request API used here.

    :param reactor: for the retry and timeout timers.
    :param installations: ``get(tenant_id, plugin_id) ->
        Deferred[Installation | None]`` (an
        :class:`~difydaemon.management.installations.InstallationCache`).
    :param registry: ``get(identifier) -> IPluginRuntime | None`` (a
        :class:`~difydaemon.runtimes.registry.RuntimeRegistry`).
    :param max_execution_timeout: seconds before a session is "killed by
        timeout" (``PLUGIN_MAX_EXECUTION_TIMEOUT``).  Runtimes that time
        sessions out themselves say so with a ``session_timeout``
        attribute that is not None; only for the others does dispatch keep
        a timer of its own, so no session has two.
    :param runtime_wait: seconds to wait for a runtime that is missing or
        not ready (a plugin still starting, restarting, or backing off
        after a failure) before answering 500 with the reason.
    :param coalesce_writes: batch the SSE items of one reactor turn.
    :param backwards: a
        :class:`~difydaemon.invocation.dispatcher.BackwardsInvocations`
        serving the plugins' calls into Dify; None refuses each at once.
    :param forwarder: a
        :class:`~difydaemon.api.forwarding.CallForwarder` sending calls
        for a debug plugin connected to another replica there; None (a
        daemon alone) serves every call here.
    :param metrics: a :class:`~difydaemon.observability.metrics.DaemonMetrics`
        counting sessions, or None (``PROMETHEUS_ENABLED=false``).
    :param tracing: a :class:`~difydaemon.observability.otel.Tracing`, or
        None: an incoming ``traceparent`` is then passed on unchanged.
    """

    isLeaf = True

    def __init__(
        self,
        reactor,
        installations,
        registry,
        max_execution_timeout: float | None = 600.0,
        runtime_wait: float = 6.0,
        coalesce_writes: bool = True,
        routes=None,
        backwards=None,
        forwarder=None,
        metrics=None,
        tracing=None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self.metrics = metrics
        self.tracing = tracing
        self._installations = installations
        self._registry = registry
        self._max_execution_timeout = max_execution_timeout
        #: seconds a call waits for a runtime that is not ready
        self.runtime_wait = runtime_wait
        self._coalesce = coalesce_writes
        self._turns = TurnFlush(reactor)
        self._routes = route_table() if routes is None else route_table(routes)
        self._valid_identifiers: set[str] = set()
        #: serves the plugins' backwards invocations (None: refuse them)
        self.backwards = backwards
        #: forwards calls for debug plugins held by other replicas (None: alone)
        self.forwarder = forwarder

    def render(self, request):
        """Resolve the route and the installation, then continue in :meth:`_installed`."""
        postpath = request.postpath
        route = self._routes.get(b"/".join(postpath[2:])) if request.method == b"POST" else None
        if route is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", JSON_CONTENT_TYPE)
            return envelope.ROUTE_NOT_FOUND
        headers = request.requestHeaders
        plugin_ids = headers.getRawHeaders(b"x-plugin-id")
        if not plugin_ids or not plugin_ids[0]:
            request.setResponseCode(400)
            request.setHeader(b"content-type", JSON_CONTENT_TYPE)
            return _PLUGIN_ID_REQUIRED
        try:
            tenant_id = postpath[0].decode("utf-8")
            plugin_id = plugin_ids[0].decode("utf-8")
        except UnicodeDecodeError:
            tenant_id = None
        # no installation has ids that are not UTF-8 or that hold a NUL
        # (which PostgreSQL refuses in a query)
        if tenant_id is None or "\x00" in tenant_id or "\x00" in plugin_id:
            request.setResponseCode(404)
            request.setHeader(b"content-type", JSON_CONTENT_TYPE)
            return _PLUGIN_NOT_FOUND
        departure = _Departure()
        request.notifyFinish().addErrback(departure)
        d = self._installations.get(tenant_id, plugin_id)
        d.addCallbacks(
            self._installed,
            self._lookup_failed,
            callbackArgs=(request, route, departure),
            errbackArgs=(request, departure),
        )
        return NOT_DONE_YET

    def _lookup_failed(self, failure, request, departure) -> None:
        if isinstance(failure.value, errors.DaemonError):
            body = envelope.from_exception(failure.value)
        else:
            log.failure("installation lookup failed", failure)
            body = envelope.from_exception(errors.InternalServerError("failed to fetch plugin installation"))
        if not departure.gone:
            _answer(request, 500, body)

    def _bug(self, request) -> None:
        log.failure("dispatch failed")
        if request.finished or request.startedWriting:
            return
        try:
            _answer(request, 500, envelope.from_exception(errors.InternalServerError("internal server error")))
        except RuntimeError:
            # the client has gone: there is nobody to answer
            pass

    def _installed(self, installation, request, route, departure) -> None:
        if departure.gone:
            # the client left during the lookup: nobody to answer, no session to open
            return
        # one callback instead of a second errback: each costs a
        # _runCallbacks pass on every request
        try:
            self._dispatch(installation, request, route, departure)
        except Exception:
            self._bug(request)

    def _dispatch(self, installation, request, route, departure) -> None:
        if installation is None:
            _answer(request, 404, _PLUGIN_NOT_FOUND)
            return
        identifier = installation.plugin_unique_identifier
        if identifier not in self._valid_identifiers:
            try:
                parse_identifier(identifier)
            except errors.UniqueIdentifierError as exc:
                _answer(request, 400, envelope.from_exception(exc))
                return
            if len(self._valid_identifiers) > 10000:
                self._valid_identifiers.clear()
            self._valid_identifiers.add(identifier)
        if self.forwarder is not None and installation.runtime_type == "remote":
            runtime = self._registry.get(identifier)
            if runtime is None or not runtime.is_ready():
                # a debug plugin connected to another replica, perhaps
                hop = request.requestHeaders.getRawHeaders(HOP_HEADER)
                if hop:
                    _answer(request, 500, hop_refusal(identifier, hop[0]))
                    return
                self.forwarder.forward(
                    request, identifier, departure,
                    lambda: self._installed_here(installation, request, route, departure),
                )
                return
        self._served_here(installation, request, route, departure)

    def _installed_here(self, installation, request, route, departure) -> None:
        if departure.gone:
            return
        try:
            self._served_here(installation, request, route, departure)
        except Exception:
            self._bug(request)

    def _served_here(self, installation, request, route, departure) -> None:
        """Open the call's session on this replica (waiting for its runtime if need be)."""
        identifier = installation.plugin_unique_identifier
        body = None
        if _is_json(request.requestHeaders.getRawHeaders(b"content-type", (None,))[0]):
            try:
                body = _loads(request.content.read())
            except orjson.JSONDecodeError:
                pass
        if type(body) is not dict:
            body = {}
        data = body.get("data")
        if type(data) is not dict:
            data = {}
        failures = validate_data(route, data)
        if failures:
            _answer(request, 400, envelope.from_exception(errors.BadRequestError("\n".join(failures))))
            return
        plugin_request = build_plugin_request(new_session_id(), route, body, data)
        # the HTTP stack's server span when it traces; a resource that
        # traces under a stack that does not starts its own
        span = getattr(request, "span", None)
        if span is not None:
            traceparent = span.traceparent
        else:
            traceparent = traceparent_of(request.requestHeaders)
            if self.tracing is not None:
                traceparent = self._trace_request(request, route, traceparent)
        if traceparent is not None:
            plugin_request["traceparent"] = traceparent
        if route.polling:
            relay = PollingRelay(self._reactor, request, plugin_request, route.new_chunk_check())
        else:
            relay = StreamRelay(
                self._reactor, request, plugin_request, route.new_chunk_check(), self._coalesce, self._turns
            )
        relay.tenant_id = installation.tenant_id
        relay.plugin_id = installation.plugin_id
        relay.backwards = self.backwards
        relay.route = route
        departure.relay = relay
        self._open(relay, identifier)

    def _open(self, relay: _Relay, identifier: str) -> None:
        """
        Open the session on the identifier's runtime, or wait (up to
        ``runtime_wait``) for the registry to have a ready one: a plugin
        still starting, restarting, or retried after a failure.
        """
        if relay.closed:
            return
        runtime = self._registry.get(identifier)
        if runtime is not None and runtime.is_ready():
            self._open_on(relay, runtime, identifier)
            return
        waiting = self._registry.when_ready(identifier, self.runtime_wait)
        relay.retry_call = _Waiting(waiting)
        waiting.addCallbacks(
            self._runtime_ready, self._no_runtime, callbackArgs=(relay, identifier), errbackArgs=(relay,)
        )

    def _runtime_ready(self, runtime, relay: _Relay, identifier: str) -> None:
        relay.retry_call = None
        if not relay.closed:
            self._open_on(relay, runtime, identifier)

    def _no_runtime(self, failure, relay: _Relay) -> None:
        relay.retry_call = None
        if relay.closed or failure.check(CancelledError):
            return
        if isinstance(failure.value, errors.DaemonError):
            relay.refuse(500, envelope.from_exception(failure.value))
        else:
            log.failure("waiting for a plugin runtime failed", failure)
            relay.refuse(500, _NO_RUNTIME)

    def _open_on(self, relay: _Relay, runtime, identifier: str) -> None:
        # set first: a runtime may deliver messages before open_session returns
        relay.runtime = runtime
        route = relay.route
        if self.metrics is not None:
            relay.meter = self.metrics.invocation(
                relay.plugin_id, route.access_type, getattr(runtime, "runtime_type", "local"), route.action
            )
        if self.tracing is not None:
            self._trace_session(relay, runtime)
        try:
            handle = runtime.open_session(relay.session_id, relay.plugin_request, relay)
        except errors.DaemonError as exc:
            relay.error_class = exc.error_type
            # it said it was ready: waiting again could go round forever
            log.debug("cannot open a session of {identifier}: {reason}", identifier=identifier, reason=exc.message)
            relay.refuse(500, envelope.from_exception(exc))
            return
        timeout = None
        if getattr(runtime, "session_timeout", None) is None:
            timeout = self._max_execution_timeout
        relay.opened(handle, timeout)


    def _trace_request(self, request, route, traceparent: str | None) -> str:
        """Start the HTTP request's span, ended when the response is; its traceparent."""
        span = self.tracing.start(
            "POST /plugin/:tenant_id/dispatch/" + route.path,
            SERVER,
            traceparent,
            {"http.request.method": "POST", "http.route": "/plugin/:tenant_id/dispatch/" + route.path},
        )
        request.notifyFinish().addBoth(lambda result: span.end(None if result is None else "client gone"))
        return span.traceparent

    def _trace_session(self, relay: _Relay, runtime) -> None:
        """Start the plugin session's span; the plugin and Dify see it as the parent."""
        route = relay.route
        span = self.tracing.start(
            "plugin session " + route.action,
            INTERNAL,
            relay.plugin_request.get("traceparent"),
            {
                "plugin.id": relay.plugin_id,
                "plugin.session_id": relay.session_id,
                "plugin.runtime_type": getattr(runtime, "runtime_type", "local"),
                "plugin.operation": route.action,
            },
        )
        relay.span = span
        relay.plugin_request["traceparent"] = span.traceparent


class _Waiting:
    """A relay's wait for a runtime, cancelled as its pending retry call is."""

    __slots__ = ("_deferred",)

    def __init__(self, deferred) -> None:
        self._deferred = deferred

    def active(self) -> bool:
        """Whether the wait is still on."""
        return not self._deferred.called

    def cancel(self) -> None:
        """Stop waiting (the client went away)."""
        self._deferred.cancel()
