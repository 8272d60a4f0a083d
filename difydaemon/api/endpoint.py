"""
The public endpoint entrypoint: ``/e/<hook_id>/<path>`` (``http-api.md``
§2.6), no authentication.

A call is matched to its endpoint by hook id, checked (endpoint and
installation exist, endpoint enabled, plugin running and declaring
endpoints), rewritten into a raw HTTP/1.1 request
(:mod:`difydaemon.api.endpoint_http`) and sent to the plugin as an
``endpoint`` / ``invoke_endpoint`` session together with the endpoint's
decrypted settings.  The plugin answers with chunks
``{"status"?, "headers"?, "result"?}``: status and headers gather until the
first chunk with a ``result``, which starts the response; every ``result``
is hex-decoded and written as it comes.
"""

from __future__ import annotations

import binascii

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from difydaemon import errors
from difydaemon.api import envelope, sse
from difydaemon.api.admission import Admitted, Refused
from difydaemon.api.dispatch import new_session_id
from difydaemon.api.endpoint_http import MAX_BODY, IncomingRequest, canonical_header_name, raw_http_request
from difydaemon.api.forwarding import HOP_HEADER, hop_refusal
from difydaemon.api.paths import ENDPOINT_PREFIX
from difydaemon.api.relay import SessionRelay
from difydaemon.interfaces import ISessionListener
from difydaemon.invocation.dispatcher import serve_invoke
from difydaemon.invocation.session import InvocationSession, MalformedInvokeError
from difydaemon.observability.otel import INTERNAL
from difydaemon.observability.trace import traceparent_of
from difydaemon.management.endpoints import endpoint_group, setting_configs
from difydaemon.packaging.identifier import parse_identifier

log = Logger()

ACCESS_TYPE = "endpoint"
ACTION = "invoke_endpoint"
#: The methods the Go daemon routes to ``/e/`` (no PATCH).
METHODS = frozenset({b"HEAD", b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS"})
JSON_CONTENT_TYPE = b"application/json; charset=utf-8"
TIMEOUT_MESSAGE = "killed by timeout"
NO_RUNTIME_MESSAGE = "failed to get plugin runtime"
#: Status written when the plugin named none (or an informational one).
#: The Go daemon passes its default 100 to net/http, which sends it as an
#: interim response and then answers 200: what its clients see is 200.
DEFAULT_STATUS = 200

_INTERNAL = errors.InternalServerError.error_type
_ENDPOINT_NOT_FOUND = envelope.from_exception(errors.BadRequestError("endpoint not found"))
#: the width of ``endpoints.hook_id``: no stored hook id is longer
MAX_HOOK_ID = 127
#: an ``/e/`` call for a hook id no endpoint has, answered before its body is read
UNKNOWN_HOOK = Refused(404, JSON_CONTENT_TYPE, _ENDPOINT_NOT_FOUND, "unknown hook id")
_INSTALLATION_NOT_FOUND = envelope.from_exception(errors.BadRequestError("plugin installation not found"))
_BAD_IDENTIFIER = envelope.from_exception(errors.UniqueIdentifierError("invalid plugin unique identifier"))
_DISABLED = envelope.from_exception(errors.NotFoundError("endpoint not found"))
_PLUGIN_NOT_FOUND = envelope.from_exception(errors.PluginNotFoundError("plugin not found"))
_INTERNAL_ERROR = envelope.from_exception(errors.InternalServerError("internal server error"))
# framing is twisted.web's business, not the plugin's
_DROPPED_RESPONSE_HEADERS = frozenset({b"Transfer-Encoding"})


def _internal(message: str) -> bytes:
    return envelope.error(-500, message, _INTERNAL)


class ChunkError(ValueError):
    """A reply chunk that is not ``{"status"?: int, "headers"?: {str: str}, "result"?: str}``."""


def parse_chunk(chunk) -> tuple:
    """
    ``(status, headers, result)`` of one reply chunk, each None when absent
    or null, as the Go daemon's typed decoding accepts them.

    :raises ChunkError: with Go's "unmarshal json failed" wording.
    """
    if not isinstance(chunk, dict):
        raise ChunkError("unmarshal json failed: the chunk is not an object")
    status = chunk.get("status")
    if status is not None and (type(status) is not int or not 0 <= status <= 65535):
        raise ChunkError(f"unmarshal json failed: status {status!r} is not a uint16")
    headers = chunk.get("headers")
    if headers is not None and (
        not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values())
    ):
        raise ChunkError("unmarshal json failed: headers is not a map of strings")
    result = chunk.get("result")
    if result is not None and not isinstance(result, str):
        raise ChunkError("unmarshal json failed: result is not a string")
    return status, headers, result


def unhex(text: str) -> bytes:
    """
    The bytes of a hex string.

    :raises ValueError: in Go's ``encoding/hex`` words.
    """
    try:
        return binascii.unhexlify(text)
    except (binascii.Error, ValueError):
        if len(text) % 2:
            raise ValueError("encoding/hex: odd length hex string") from None
        raise ValueError("encoding/hex: invalid byte") from None


def _header_bytes(value: str) -> bytes:
    return value.encode("utf-8").replace(b"\r", b" ").replace(b"\n", b" ")


@implementer(ISessionListener)
class EndpointRelay(SessionRelay):
    """
    One public call and its plugin session: turns the plugin's chunks into
    the HTTP response, times the session out, and abandons it when the
    client goes away.

    :param reactor: for the timeout.
    :param request: the twisted.web request being answered.
    :param backwards: what serves the plugin's ``invoke`` messages
        (``handle(session, data)``), or None to refuse them.
    """

    def __init__(self, reactor, request, backwards=None) -> None:
        super().__init__(reactor)
        self.request = request
        self._backwards = backwards
        self.session = None  # the InvocationSession, once opened
        #: True once status and headers are out.
        self.started = False
        self._status = None
        self._headers: dict[bytes, bytes] = {}
        self._declared_length = None
        self._written = 0

    #: the session's span when OpenTelemetry is on, ended as the call is
    span = None
    #: why the call failed (the span's error), None while it has not
    failed_with = None

    # -- life of the call ---------------------------------------------------

    def _stop_timers(self) -> None:
        # every way the call ends passes here once
        super()._stop_timers()
        span, self.span = self.span, None
        if span is not None:
            span.end(self.failed_with)

    def client_gone(self, failure) -> None:
        """The client disconnected: the session ends, as a failure."""
        if not self.closed and self.failed_with is None:
            self.failed_with = "client gone"
        super().client_gone(failure)

    def refuse(self, status: int, body: bytes) -> None:
        """Answer a JSON envelope (nothing was written yet)."""
        if self.closed:
            return
        self.closed = True
        self._stop_timers()
        self._abandon()
        request = self.request
        request.setResponseCode(status)
        request.setHeader(b"content-type", JSON_CONTENT_TYPE)
        request.write(body)
        request.finish()

    def open(self, runtime, session: InvocationSession, timeout: float | None) -> None:
        """
        Open the plugin session of ``session.session_request`` on
        ``runtime``; time it out after ``timeout`` seconds (None: the
        runtime does).

        :raises difydaemon.errors.DaemonError: when the runtime refuses.
        """
        # set first: a runtime may deliver messages before open_session returns
        self.session = session
        self.opened(runtime.open_session(session.session_id, session.session_request, self), timeout)

    def invocation_session(self) -> InvocationSession | None:
        """Who the session serves and with which permissions (a serverless runtime records it)."""
        return self.session

    def session_timed_out(self) -> None:
        """``PLUGIN_MAX_EXECUTION_TIMEOUT`` passed."""
        self._fail(_INTERNAL, TIMEOUT_MESSAGE)

    # -- writing ------------------------------------------------------------------

    def _start(self) -> None:
        self.started = True
        request = self.request
        status = self._status if self._status is not None else DEFAULT_STATUS
        request.setResponseCode(DEFAULT_STATUS if status < 200 else status)
        # no guessed text/html: the plugin names its content type or none
        request.defaultContentType = None
        for name, value in self._headers.items():
            request.setHeader(name, value)
        length = self._headers.get(b"Content-Length")
        if length is not None and length.isdigit() and request.method != b"HEAD":
            self._declared_length = int(length)

    def _write(self, data: bytes) -> None:
        if self._declared_length is not None:
            # never more than the plugin announced (net/http refuses that too)
            data = data[: max(0, self._declared_length - self._written)]
        if data:
            self._written += len(data)
            self.request.write(data)

    def _finish(self) -> None:
        self.closed = True
        self.handle = None
        self._stop_timers()
        if not self.started:
            self._start()
        request = self.request
        request.finish()
        if self._declared_length is not None and self._written < self._declared_length:
            # the client waits for bytes that will never come: cut it off
            transport = getattr(request, "transport", None)
            if transport is not None:
                transport.loseConnection()

    def _fail(self, error_type: str, text: str) -> None:
        """
        End the call with an error: a 500 envelope when nothing is out
        yet, else the error appended to the body (as the Go daemon does).
        """
        if self.closed:
            return
        if self.failed_with is None:
            self.failed_with = error_type or text
        if not self.started:
            self.refuse(500, _internal(text))
            return
        if error_type == _INTERNAL and text == TIMEOUT_MESSAGE:
            # Go's handler writes the timeout envelope into the started body
            self._write(_internal(text))
        else:
            self._write(text.encode("utf-8"))
        self._finish()

    def _fail_session(self, text: str) -> None:
        self._abandon()
        self._fail("", text)

    # -- ISessionListener ---------------------------------------------------------

    def stream(self, chunk, raw) -> None:
        """One reply chunk: status and headers, or a piece of body."""
        if self.closed:
            return
        try:
            status, headers, result = parse_chunk(chunk)
        except ChunkError as exc:
            self._fail_session(sse.protocol_error_text("unmarshal_error", str(exc)))
            return
        if self.started:
            if result is None:
                return
            try:
                data = unhex(result)
            except ValueError:
                # the Go daemon's body writer stops there and ends the response
                self._abandon()
                self._finish()
                return
            self._write(data)
            return
        if status is not None:
            if not 100 <= status <= 999:
                self._fail_session(f"invalid WriteHeader code {status}")
                return
            self._status = status
        for name, value in (headers or {}).items():
            key = canonical_header_name(name.encode("utf-8"))
            if key not in _DROPPED_RESPONSE_HEADERS:
                self._headers.setdefault(key, _header_bytes(value))
        if result is None:
            return
        try:
            data = unhex(result)
        except ValueError as exc:
            self._fail_session(str(exc))
            return
        self._start()
        self._write(data)

    def invoke(self, request) -> None:
        """A backwards invocation: hand it over, or refuse it at once."""
        if self.closed or self.session is None:
            return
        try:
            serve_invoke(self._backwards, self.session, request)
        except MalformedInvokeError as exc:
            self._fail_session(sse.protocol_error_text("invoke_dify_error", str(exc)))

    def end(self) -> None:
        """The plugin is done: finish the response (status and headers if nothing else)."""
        if not self.closed:
            self._finish()

    def error(self, error_type, message, args) -> None:
        """
        The session failed: the runtime's own timeout or failure as it
        says, a plugin error as its JSON text.
        """
        if self.closed:
            return
        self.handle = None
        if error_type == _INTERNAL:
            self._fail(error_type, message)
        else:
            self._fail(error_type, sse.plugin_error_text(error_type, message, args))


class EndpointResource(Resource):
    """
    The leaf under ``/e/`` (mounted by
    :class:`~difydaemon.api.root.RootResource`; ``request.postpath`` is
    ``[hook_id, *path]``).

    :param reactor: for the timers.
    :param persistence: an IPersistence (endpoints by hook id).
    :param installations: ``get(tenant_id, plugin_id) ->
        Deferred[Installation | None]`` (the installation cache).
    :param registry: ``get(identifier) -> IPluginRuntime | None``.
    :param endpoints: the :class:`~difydaemon.management.endpoints.Endpoints`
        (declarations and settings decryption).
    :param backwards: serves the plugin's backwards invocations
        (``handle(session, data)``), or None to refuse them.
    :param max_execution_timeout: ``PLUGIN_MAX_EXECUTION_TIMEOUT``, for
        runtimes that do not time sessions out themselves.
    :param runtime_wait: seconds to wait for a runtime that is missing or
        not ready (a plugin still starting, restarting or retried after a
        failure: the registry's ``when_ready`` does the waiting).
    :param forwarder: a :class:`~difydaemon.api.forwarding.CallForwarder`
        sending calls for a debug plugin connected to another replica
        there; None (a daemon alone) serves every call here.
    :param tracing: a :class:`~difydaemon.observability.otel.Tracing`
        giving each plugin session a span, or None (``ENABLE_OTEL`` off):
        an incoming ``traceparent`` is then passed on unchanged.
    """

    isLeaf = True

    def __init__(
        self,
        reactor,
        persistence,
        installations,
        registry,
        endpoints,
        backwards=None,
        max_execution_timeout: float | None = 600.0,
        runtime_wait: float = 6.0,
        forwarder=None,
        tracing=None,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._forwarder = forwarder
        self._tracing = tracing
        self._persistence = persistence
        self._installations = installations
        self._registry = registry
        self._endpoints = endpoints
        self._backwards = backwards
        self._max_execution_timeout = max_execution_timeout
        self.runtime_wait = runtime_wait

    def render(self, request):
        """Check the route, then serve the call asynchronously."""
        postpath = request.postpath
        if request.method not in METHODS or not postpath or not postpath[0]:
            request.setResponseCode(404)
            request.setHeader(b"content-type", JSON_CONTENT_TYPE)
            return envelope.ROUTE_NOT_FOUND
        hook_id = postpath[0].decode("utf-8", "replace")
        if "\x00" in hook_id or len(hook_id) > MAX_HOOK_ID:
            # no endpoint has such a hook id, and PostgreSQL refuses a NUL in a query
            request.setResponseCode(404)
            request.setHeader(b"content-type", JSON_CONTENT_TYPE)
            return _ENDPOINT_NOT_FOUND
        content = request.content
        incoming = IncomingRequest(
            method=request.method,
            path=b"/" + b"/".join(postpath[1:]),
            query=request.uri.partition(b"?")[2],
            headers=tuple(
                (name, value)
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ),
            host=request.getHeader(b"host") or b"",
            secure=request.isSecure(),
            body=content.read(MAX_BODY) if content is not None else b"",
        )
        relay = EndpointRelay(self._reactor, request, self._backwards)
        request.notifyFinish().addErrback(relay.client_gone)
        d = Deferred.fromCoroutine(self._serve(relay, hook_id, incoming))
        d.addErrback(self._bug, relay)
        return NOT_DONE_YET

    def before_body(self, admitted: Admitted):
        """
        The check an ``/e/<hook_id>/...`` request with a body passes once its
        head is in, before its body is read (the HTTP channels call it): a
        hook id no endpoint has answers its 404 now, so nobody can make the
        daemon read bodies for nothing.  :meth:`render` still makes every
        check, this one included, once the body is in.

        :return: None for a request that is no endpoint call; else a
            Deferred firing with :data:`UNKNOWN_HOOK` or None (read the body).
        """
        segments = admitted.target.segments
        if len(segments) < 2 or segments[0] != ENDPOINT_PREFIX:
            return None
        hook_id = segments[1].decode("utf-8", "replace")
        if not hook_id or "\x00" in hook_id or len(hook_id) > MAX_HOOK_ID:
            return succeed(UNKNOWN_HOOK)
        found = self._persistence.get_endpoint_by_hook_id(hook_id)
        found.addCallback(lambda endpoint: UNKNOWN_HOOK if endpoint is None else None)
        return found

    def _bug(self, failure, relay: EndpointRelay) -> None:
        if isinstance(failure.value, errors.DaemonError):
            # the database gone, say: the caller reads why, and it is no bug of ours
            log.warn("endpoint call failed: {reason}", reason=failure.value.message)
            body = envelope.from_exception(failure.value)
        else:
            log.failure("endpoint call failed", failure)
            body = _INTERNAL_ERROR
        try:
            relay.refuse(500, body)
        except RuntimeError:
            pass  # the client has gone: nobody to answer

    async def _runtime(self, identifier: str):
        """The identifier's ready runtime, or the reason there is none (a DaemonError)."""
        runtime = self._registry.get(identifier)
        if runtime is not None and runtime.is_ready():
            return runtime
        return await self._registry.when_ready(identifier, self.runtime_wait)

    async def _forwarded(self, relay: EndpointRelay, identifier: str, incoming: IncomingRequest) -> bool:
        """
        Send the call to the replica holding its debug plugin, if another
        one does; whether it was sent (or refused: a call already forwarded
        once is not forwarded again).
        """
        runtime = self._registry.get(identifier)
        if runtime is not None and runtime.is_ready():
            return False
        hop = relay.request.requestHeaders.getRawHeaders(HOP_HEADER)
        if hop:
            relay.refuse(500, hop_refusal(identifier, hop[0]))
            return True
        nodes = await self._forwarder.holders(identifier)
        if not nodes or relay.closed:
            return relay.closed
        # the relay never opens a session: the call is the holder's now
        relay.closed = True
        self._forwarder.forward_endpoint(relay.request, identifier, incoming.body, nodes)
        return True

    async def _serve(self, relay: EndpointRelay, hook_id: str, incoming: IncomingRequest) -> None:
        endpoint = await self._persistence.get_endpoint_by_hook_id(hook_id)
        if endpoint is None:
            relay.refuse(404, _ENDPOINT_NOT_FOUND)
            return
        installation = await self._installations.get(endpoint.tenant_id, endpoint.plugin_id)
        if installation is None:
            relay.refuse(404, _INSTALLATION_NOT_FOUND)
            return
        try:
            identifier = parse_identifier(installation.plugin_unique_identifier).raw
        except errors.UniqueIdentifierError:
            relay.refuse(400, _BAD_IDENTIFIER)
            return
        if not endpoint.enabled:
            relay.refuse(404, _DISABLED)
            return
        if self._forwarder is not None and installation.runtime_type == "remote":
            if await self._forwarded(relay, identifier, incoming):
                return
        raw = raw_http_request(incoming, endpoint.hook_id)
        try:
            runtime = await self._runtime(identifier)
        except errors.DaemonError as exc:
            if not relay.closed:
                if self._registry.get(identifier) is None:
                    # no runtime at all: Go's 404, with the reason
                    relay.refuse(404, envelope.from_exception(errors.PluginNotFoundError(exc.message)))
                else:
                    relay.refuse(500, envelope.from_exception(exc))
            return
        if relay.closed:
            return
        declaration = await self._endpoints.declaration(identifier)
        group = endpoint_group(declaration)
        if group is None:
            relay.refuse(404, _PLUGIN_NOT_FOUND)
            return
        try:
            settings = await self._endpoints.decrypt_settings(endpoint, setting_configs(group))
        except errors.DaemonError as exc:
            relay.refuse(500, envelope.from_exception(exc))
            return
        if relay.closed:
            return
        session_request = {
            "session_id": new_session_id(),
            "conversation_id": None,
            "message_id": None,
            "app_id": None,
            "endpoint_id": endpoint.id,
            "context": None,
            "event": "request",
            "data": {
                # the Go daemon opens endpoint sessions without a user
                "user_id": "",
                "type": ACCESS_TYPE,
                "action": ACTION,
                "raw_http_request": raw.hex(),
                "settings": settings,
            },
        }
        self._trace(relay, session_request, installation.plugin_id, runtime)
        session = InvocationSession(
            tenant_id=endpoint.tenant_id,
            user_id="",
            plugin_id=installation.plugin_id,
            access_type=ACCESS_TYPE,
            declaration=declaration,
            session_request=session_request,
            runtime=runtime,
        )
        timeout = self._max_execution_timeout if getattr(runtime, "session_timeout", None) is None else None
        try:
            relay.open(runtime, session, timeout)
        except errors.DaemonError as exc:
            log.debug("cannot open a session of {identifier}: {reason}", identifier=identifier, reason=exc.message)
            relay.failed_with = exc.error_type
            relay.refuse(500, _internal(exc.message or NO_RUNTIME_MESSAGE))

    def _trace(self, relay: EndpointRelay, session_request: dict, plugin_id: str, runtime) -> None:
        """
        Pass the call's trace context on to the plugin session (as
        dispatch does): under the session's own span when tracing, else
        the request's valid ``traceparent`` unchanged.
        """
        request = relay.request
        span = getattr(request, "span", None)
        traceparent = span.traceparent if span is not None else traceparent_of(request.requestHeaders)
        if self._tracing is not None:
            relay.span = self._tracing.start(
                "plugin session " + ACTION,
                INTERNAL,
                traceparent,
                {
                    "plugin.id": plugin_id,
                    "plugin.session_id": session_request["session_id"],
                    "plugin.runtime_type": getattr(runtime, "runtime_type", "local"),
                    "plugin.operation": ACTION,
                },
            )
            traceparent = relay.span.traceparent
        if traceparent is not None:
            session_request["traceparent"] = traceparent

