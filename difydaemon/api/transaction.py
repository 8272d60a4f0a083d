"""
``POST /backwards-invocation/transaction``: a serverless plugin calls back
into Dify (``serverless.md`` §5).

A function cannot receive anything after its ``/invoke`` request, so each
backwards call is an HTTP request of its own: one plugin ``invoke``
message in, the same ``backwards_response`` messages a local plugin reads
on stdin out, each followed by a blank line.  The call goes through the
same :class:`~difydaemon.invocation.dispatcher.BackwardsInvocations`
(permissions, inner API, plugin storage) as local plugins: the
transaction's response plays the part of the runtime its answers are sent
on.

Better than Go (§11), still wire-compatible: only a live serverless
session is served, and only when the ``Dify-Plugin-Session-ID`` header
names the same session as the body; a malformed body is answered 400 at
once (Go waits for the transaction timeout), an oversized one 413 (Go cuts
it silently).  Blank-line keep-alives every 25 s keep the SDK's read
timeout from firing during a long Dify call.
"""

from __future__ import annotations

import orjson
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from difydaemon import errors
from difydaemon.api import envelope
from difydaemon.api.admission import TRANSACTION_BODY_LIMIT
from difydaemon.invocation.dispatcher import serve_invoke
from difydaemon.invocation.messages import backwards_error
from difydaemon.invocation.session import MalformedInvokeError, parse_invoke

log = Logger()

#: seconds between keep-alive blank lines
KEEPALIVE_INTERVAL = 25.0
SESSION_HEADER = b"dify-plugin-session-id"
SESSION_NOT_FOUND_MESSAGE = "failed to get session info from cache"
TIMEOUT_MESSAGE = "backwards invocation transaction timed out"
_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"


def refusal_body(backwards_request_id: str, session_id: str, error_type: str, detail: str, message: str) -> bytes:
    """The one JSON object (no trailing newline) a refused transaction answers (Go's SessionNotFound shape)."""
    return orjson.dumps(
        {
            "backwards_request_id": backwards_request_id,
            "event": "error",
            "message": message,
            "data": {"error_type": error_type, "detail": detail, "session_id": session_id},
        }
    )


class TransactionRefused(Exception):
    """A transaction answered at once with ``status`` and ``body``."""

    def __init__(self, status: int, body: bytes, content_type: bytes = _JSON) -> None:
        super().__init__(status)
        self.status = status
        self.body = body
        self.content_type = content_type


def parse_transaction(body: bytes) -> tuple[str, dict]:
    """
    The ``(session_id, invoke data)`` of a transaction body: one plugin
    event ``{"event":"session","session_id","data":{"type","data"}}``.

    :raises TransactionRefused: 400 for anything else.
    """
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise TransactionRefused(400, f"invalid transaction body: {exc}".encode(), _TEXT) from None
    if not isinstance(event, dict) or event.get("event") != "session":
        raise TransactionRefused(400, b"invalid transaction body: not a session event", _TEXT)
    session_id = event.get("session_id")
    if not isinstance(session_id, str) or not session_id:
        raise TransactionRefused(400, b"invalid transaction body: no session_id", _TEXT)
    message = event.get("data")
    if not isinstance(message, dict) or "type" not in message or "data" not in message:
        raise TransactionRefused(400, b"invalid transaction body: data is not a session message", _TEXT)
    return session_id, message["data"]


class TransactionStream:
    """
    The response of one transaction, as the runtime its answers go to:
    :meth:`send` writes a ``backwards_response`` message and finishes the
    response after its ``end``.

    :param reactor: for the keep-alives and the timeout.
    :param request: the twisted.web request.
    :param timeout: ``MAX_SERVERLESS_TRANSACTION_TIMEOUT``.
    """

    def __init__(self, reactor, request, timeout: float, keepalive: float = KEEPALIVE_INTERVAL) -> None:
        self._request = request
        self._reactor = reactor
        self.closed = False
        self._keepalive_interval = keepalive
        self._keepalive = reactor.callLater(keepalive, self._keep_alive)
        self._deadline = reactor.callLater(timeout, self._timed_out)
        self._session_request: dict | None = None
        self._backwards_request_id = ""
        request.notifyFinish().addBoth(self._gone)

    def serve(self, session, backwards_request_id: str) -> None:
        """Remember whose answers are written (for the timeout's own answer)."""
        self._session_request = session.session_request
        self._backwards_request_id = backwards_request_id

    def send(self, session_id: str, message: dict) -> None:
        if self.closed:
            raise errors.InternalServerError("the plugin closed the backwards invocation transaction")
        self._request.write(orjson.dumps(message) + b"\n\n")
        data = message.get("data")
        if isinstance(data, dict) and data.get("event") == "end":
            self._finish()

    def _keep_alive(self) -> None:
        if not self.closed:
            self._request.write(b"\n\n")
            self._keepalive = self._reactor.callLater(self._keepalive_interval, self._keep_alive)

    def _timed_out(self) -> None:
        if self.closed:
            return
        if self._session_request is not None:
            for message in backwards_error(self._session_request, self._backwards_request_id, TIMEOUT_MESSAGE):
                self._request.write(orjson.dumps(message) + b"\n\n")
        self._finish()

    def _finish(self) -> None:
        if not self.closed:
            self.closed = True
            self._stop_timers()
            self._request.finish()

    def _gone(self, _) -> None:
        self.closed = True
        self._stop_timers()

    def _stop_timers(self) -> None:
        for timer in (self._keepalive, self._deadline):
            if timer.active():
                timer.cancel()


class TransactionResource(Resource):
    """
    The ``/backwards-invocation/transaction`` leaf.

    :param reactor: for keep-alives and timeouts.
    :param sessions: the IServerlessSessions of live sessions.
    :param backwards: the BackwardsInvocations (None refuses every call).
    :param timeout: ``MAX_SERVERLESS_TRANSACTION_TIMEOUT`` seconds.
    :param body_limit: bytes a body may have (the front door refuses more first).
    """

    isLeaf = True

    def __init__(self, reactor, sessions, backwards, timeout: float = 300.0,
                 body_limit: int = TRANSACTION_BODY_LIMIT) -> None:
        super().__init__()
        self._reactor = reactor
        self._sessions = sessions
        self._backwards = backwards
        self.timeout = timeout
        self.body_limit = body_limit

    def render(self, request):
        if request.method != b"POST" or request.postpath not in ([b"transaction"], [b"transaction", b""]):
            return _answer(request, 404, _JSON, envelope.ROUTE_NOT_FOUND)
        body = request.content.read(self.body_limit + 1) if request.content is not None else b""
        try:
            if len(body) > self.body_limit:
                raise TransactionRefused(
                    413,
                    envelope.from_exception(errors.BadRequestError(f"request body is larger than {self.body_limit} bytes")),
                )
            session_id, data = parse_transaction(body)
        except TransactionRefused as refused:
            log.warn("backwards transaction refused: {status}", status=refused.status)
            return _answer(request, refused.status, refused.content_type, refused.body)
        header = request.requestHeaders.getRawHeaders(SESSION_HEADER, [b""])[0].decode("latin-1")
        d = self._sessions.lookup(session_id)
        d.addCallback(self._found, request, session_id, header, data)
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _found(self, session, request, session_id: str, header: str, data) -> None:
        backwards_id = data.get("backwards_request_id") if isinstance(data, dict) else None
        backwards_id = backwards_id if isinstance(backwards_id, str) else ""
        if session is None or header != session_id:
            detail = (
                f"session {session_id} is not a live serverless session"
                if session is None
                else "the Dify-Plugin-Session-ID header does not name the session of the body"
            )
            _answer(request, 400, _JSON, refusal_body(backwards_id, session_id, "SessionNotFound", detail,
                                                       SESSION_NOT_FOUND_MESSAGE))
            return
        try:
            parse_invoke(data)
        except MalformedInvokeError as exc:
            _answer(request, 400, _JSON, refusal_body(backwards_id, session_id, "BadRequest", str(exc),
                                                       "failed to parse request"))
            return
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        stream = TransactionStream(self._reactor, request, self.timeout)
        invocation = session.invocation_session(stream)
        stream.serve(invocation, backwards_id)
        serve_invoke(self._backwards, invocation, data)

    def _failed(self, failure, request) -> None:
        if isinstance(failure.value, errors.DaemonError):
            body = envelope.from_exception(failure.value)
        else:
            log.failure("backwards transaction failed", failure)
            body = envelope.from_exception(errors.InternalServerError("internal server error"))
        if not request.finished and not request.startedWriting:
            _answer(request, 500, _JSON, body)


def _answer(request, status: int, content_type: bytes, body: bytes):
    if request.finished or getattr(request, "_disconnected", False):
        # the plugin left while its session was looked up: nobody to answer
        return NOT_DONE_YET
    request.setResponseCode(status)
    request.setHeader(b"content-type", content_type)
    request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()
    return NOT_DONE_YET
