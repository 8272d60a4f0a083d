"""
Calling a function: ``POST <function_url>/invoke?action=...``
(``serverless.md`` §3.2 - §3.5).

One :class:`InvokeClient` serves every function of the daemon over one
pool of kept-alive connections with a short connect timeout (the Go daemon
builds a client per call and dials with the execution timeout, §11.4):
:func:`~.function_client.function_http_client`.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from difydaemon.errors import InternalServerError
from difydaemon.http_body import BodyLost, BodyStream, StopReading, read_head, reason_of
from difydaemon.runtimes.serverless.response import (
    ERROR_BODY_LIMIT,
    INNER_ERROR_TYPE,
    Failed,
    InvokeResponseDecoder,
    http_failure,
)

log = Logger()

_JSON = [b"application/json"]
_EVENT_STREAM = [b"text/event-stream"]
SESSION_HEADER = b"Dify-Plugin-Session-ID"
TRACEPARENT_HEADER = b"traceparent"


def invoke_url(function_url: str, action: str) -> str:
    """``<function_url>/invoke?action=<action>`` (path-joined, as Go does)."""
    return function_url.rstrip("/") + "/invoke?action=" + action


def backoff(attempt: int) -> float:
    """Seconds before attempt ``attempt`` (1-based, after the first): 0.5 s doubling, capped at 30 s."""
    return min(0.5 * 2 ** (attempt - 1), 30.0)


class _Retryable(Exception):
    """An attempt failed in a way worth another attempt (transport error, 502)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvokeClient:
    """
    Sends sessions to functions and turns their responses into outcomes.

    :param reactor: for deadlines and backoff.
    :param http: a treq-like client (:func:`~.function_client.function_http_client`, or
        ``StubTreq`` in tests).
    :param max_request_bytes: ``MAX_SERVERLESS_REQUEST_BYTES``.
    :param max_attempts: ``MAX_SERVERLESS_RETRY_TIMES`` (≤ 0 means 1).
    :param max_line_size: ``PLUGIN_RUNTIME_MAX_BUFFER_SIZE``.
    :param execution_timeout: ``PLUGIN_MAX_EXECUTION_TIMEOUT``: the
        deadline of a whole call, retries included.
    """

    def __init__(
        self,
        reactor,
        http,
        max_request_bytes: int = 5242880,
        max_attempts: int = 3,
        max_line_size: int = 5242880,
        execution_timeout: float = 600.0,
    ) -> None:
        self._reactor = reactor
        self._http = http
        self.max_request_bytes = max_request_bytes
        self.max_attempts = max(max_attempts, 1)
        self.max_line_size = max_line_size
        self.execution_timeout = execution_timeout

    def invoke(self, function_url: str, action: str, session_id: str, request: dict,
               on_outcome: Callable[[object], None]) -> Deferred:
        """
        Send one session request; hand each outcome (``Chunk``,
        ``LogLine``, then one ``Finished`` or ``Failed``) to ``on_outcome``.

        Deferred[None], fired after the last outcome; cancelling it drops
        the call (the connection is closed) and gives no more outcomes.

        The request's ``traceparent`` (the session's trace context) is also
        sent as the ``traceparent`` header, as Go's instrumented client
        does, so a function behind a tracing gateway joins the trace.
        """
        return Deferred.fromCoroutine(self.call(function_url, action, session_id, request, on_outcome))

    async def call(self, function_url: str, action: str, session_id: str, request: dict,
                   on_outcome: Callable[[object], None]) -> None:
        """
        :meth:`invoke` as a coroutine, for a caller that is one already:
        awaited directly, it spares every call a Deferred of its own and
        the hop through it (cancelling the caller drops the call alike).
        """
        body = orjson.dumps(request)
        if len(body) > self.max_request_bytes:
            on_outcome(
                Failed(
                    InternalServerError.error_type,
                    f"ServerlessPayloadTooLarge: action={action} payload_bytes={len(body)}"
                    f" max_request_bytes={self.max_request_bytes}",
                )
            )
            return
        await self._call(invoke_url(function_url, action), session_id, body, on_outcome, request.get("traceparent"))

    async def _call(self, url: str, session_id: str, body: bytes, on_outcome, traceparent=None) -> None:
        headers = {
            b"Content-Type": _JSON,
            b"Accept": _EVENT_STREAM,
            SESSION_HEADER: [session_id.encode("ascii", "replace")],
        }
        if type(traceparent) is str:
            # checked where it entered the daemon, or one of ours
            headers[TRACEPARENT_HEADER] = [traceparent.encode("ascii", "replace")]
        state = _CallState(self._reactor, self.execution_timeout)
        try:
            await self._attempts(url, headers, body, on_outcome, state)
        except _Deadline:
            on_outcome(
                Failed(
                    INNER_ERROR_TYPE,
                    f"failed to read response body: no answer within PLUGIN_MAX_EXECUTION_TIMEOUT"
                    f" ({self.execution_timeout:g} s)",
                )
            )
        finally:
            state.close()

    async def _attempts(self, url, headers, body, on_outcome, state) -> None:
        last = ""
        for attempt in range(self.max_attempts):
            if attempt:
                await state.sleep(backoff(attempt))
            try:
                response = await state.wait(self._http.post(url, data=body, headers=headers, unbuffered=True))
            except (_Deadline, CancelledError):
                raise
            except Exception as exc:
                last = reason_of(exc)
                log.info("serverless call to {url} failed (attempt {attempt}): {reason}", url=url,
                         attempt=attempt + 1, reason=last)
                continue
            request_id = _header(response, b"x-amzn-requestid")
            error_type = _header(response, b"x-amzn-errortype")
            if response.code == 502:
                head = await state.wait(read_head(response, ERROR_BODY_LIMIT))
                last = f"status code 502: {head[:200].decode('utf-8', 'replace')}"
                continue
            if not 200 <= response.code < 300 or error_type:
                head = await state.wait(read_head(response, ERROR_BODY_LIMIT))
                phrase = response.phrase.decode("latin-1") if isinstance(response.phrase, bytes) else str(response.phrase)
                on_outcome(http_failure(response.code, phrase, error_type, request_id, head))
                return
            await self._read(response, request_id, on_outcome, state)
            return
        on_outcome(
            Failed(
                INNER_ERROR_TYPE,
                f"Error sending request to serverless: all {self.max_attempts} attempts failed, last error: {last}",
            )
        )

    async def _read(self, response, request_id, on_outcome, state) -> None:
        decoder = InvokeResponseDecoder(self.max_line_size, response.code, request_id)

        def sink(data: bytes) -> None:
            # After the last outcome the rest of the body is read and
            # dropped: closing the connection instead would lose it from the
            # pool, or worse, put it back closing (the body's last chunk
            # is often in the same read as the session's end).
            if not decoder.done:
                for outcome in decoder.feed(data):
                    on_outcome(outcome)
                if decoder.abandon:
                    raise StopReading()

        reader = BodyStream(sink)
        response.deliverBody(reader)
        try:
            await state.wait(reader.done, reader)
        except BodyLost as exc:
            if not decoder.done:
                decoder.done = True
                on_outcome(Failed(INNER_ERROR_TYPE, f"failed to read response body: {exc.reason}"))
            return
        except _Deadline:
            if decoder.done:
                return  # the session ended; only the rest of its body was late
            raise
        for outcome in decoder.finish():
            on_outcome(outcome)


def _header(response, name: bytes) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else None


class _Deadline(Exception):
    """The call's execution deadline passed."""


class _CallState:
    """
    The deadline of one call, and what it must interrupt when it passes.

    The deadline's timer starts at the first :meth:`wait`, once the first
    request is written rather than before it: the request leaves sooner,
    and the deadline starts the same instant on the reactor's clock (the
    first wait comes in the same turn).
    """

    def __init__(self, reactor, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = timeout
        self._waiting: Deferred | None = None
        self._reader: BodyStream | None = None
        self.expired = False
        self._timer = None

    def _expire(self) -> None:
        self.expired = True
        if self._reader is not None:
            self._reader.stop(Failure(_Deadline()))
        elif self._waiting is not None:
            self._waiting.cancel()

    async def wait(self, d, reader: BodyStream | None = None):
        """Wait for ``d`` unless the deadline passes first."""
        if not isinstance(d, Deferred):
            d = Deferred.fromCoroutine(d)
        if self._timer is None:
            self._timer = self._reactor.callLater(self._timeout, self._expire)
        self._waiting, self._reader = d, reader
        try:
            return await d
        except CancelledError:
            if self.expired:
                raise _Deadline() from None
            raise
        finally:
            self._waiting = self._reader = None

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` unless the deadline passes first."""
        d: Deferred = Deferred()
        call = self._reactor.callLater(seconds, d.callback, None)
        d.addErrback(lambda f: (call.cancel() if call.active() else None, f)[1])
        await self.wait(d)

    def close(self) -> None:
        timer = self._timer
        if timer is not None and timer.active():
            timer.cancel()
