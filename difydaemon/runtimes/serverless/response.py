"""
A function's ``/invoke`` response (``serverless.md`` §3.5), decoded without
I/O.

The function answers like an AWS Lambda Function URL in response-streaming
mode: a non-2xx status or an ``x-amzn-ErrorType`` header is a failure
(:func:`http_failure`); otherwise the body is the session's plugin events,
one per line, which :class:`InvokeResponseDecoder` turns into the outcomes
the runtime hands to the session's listener.  The line splitting and the
event shapes are those of the stdio codec; only what a line *means* differs
(a stray non-JSON line or a top-level ``error`` event ends the session).
"""

from __future__ import annotations

import orjson
from attrs import frozen

from difydaemon.runtimes.codec import (
    ForeignLine,
    Log,
    MalformedLine,
    OversizedLine,
    PluginErrorEvent,
    PluginOutputDecoder,
    SessionMessage,
)
from difydaemon.runtimes.sessions import plugin_error_fields

#: the error type of failures the daemon finds in the response
INNER_ERROR_TYPE = "PluginDaemonInnerError"
#: the error type of a failed function call (status, Lambda error)
RUNTIME_ERROR_TYPE = "PluginRuntimeError"
#: what an ``invoke`` session message fails with: serverless is half duplex
NOT_SUPPORTED_ERROR_TYPE = "serverless_event_not_supported"
NOT_SUPPORTED_MESSAGE = "serverless event is not supported by full duplex"
NO_SESSION_RESPONSE = "no valid session response"
#: how much of a failed response's body is read and kept
ERROR_BODY_LIMIT = 4096
#: how much of a non-JSON line an error quotes
QUOTE_LIMIT = 1024


@frozen
class Chunk:
    """One ``stream`` message: ``raw`` is its compact JSON as the function sent it."""

    data: object
    raw: bytes


@frozen
class Finished:
    """The session's ``end`` (sent or synthesized when the body ended)."""


@frozen
class Failed:
    """The session failed; nothing follows."""

    error_type: str
    message: str
    args: dict | None = None


@frozen
class LogLine:
    """A ``log`` event: logged by the daemon, nothing sent to Dify."""

    log: Log


def runtime_failure(status_code: int, error_type: str, error_message: str | None, request_id: str | None) -> Failed:
    """The "session error" of §3.5 step 6."""
    message = f"Plugin runtime request failed: {error_type}"
    if error_message:
        message += f": {error_message}"
    args: dict = {"status_code": status_code}
    if request_id:
        args["request_id"] = request_id
    return Failed(RUNTIME_ERROR_TYPE, message, args)


def _lambda_error(value) -> tuple[str, str, str] | None:
    """``(errorType, errorMessage, requestId)`` of a Lambda error object, else None."""
    if not isinstance(value, dict):
        return None
    error_type = value.get("errorType")
    if not isinstance(error_type, str) or not error_type:
        return None
    message = value.get("errorMessage")
    request_id = value.get("requestId")
    return (
        error_type,
        message if isinstance(message, str) else "",
        request_id if isinstance(request_id, str) else "",
    )


def http_failure(status_code: int, reason: str, header_error_type: str | None, request_id: str | None,
                 body: bytes) -> Failed:
    """
    What a non-2xx response, or a 2xx one with ``x-amzn-ErrorType``, fails
    the session with.  ``body`` is at most :data:`ERROR_BODY_LIMIT` bytes of
    the body: a Lambda error object names the type and message; any other
    body is quoted as the message, so the operator reads what the function
    said.
    """
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        value = None
    found = _lambda_error(value)
    if found is not None:
        error_type, message, body_request_id = found
    elif isinstance(value, dict) and isinstance(value.get("errorMessage"), str):
        # Lambda names the type in the header and the message in the body
        error_type, message = "", value["errorMessage"]
        body_request_id = value.get("requestId") if isinstance(value.get("requestId"), str) else ""
    else:
        error_type, body_request_id = "", ""
        message = body[:ERROR_BODY_LIMIT].decode("utf-8", "replace").strip()
    error_type = header_error_type or error_type or f"{status_code} {reason}".strip()
    return runtime_failure(status_code, error_type, message, request_id or body_request_id)


class InvokeResponseDecoder:
    """
    Incremental decoder of a 2xx ``/invoke`` body.

    :meth:`feed` and :meth:`finish` return outcomes: :class:`Chunk`,
    :class:`LogLine`, then exactly one of :class:`Finished` or
    :class:`Failed`, last.  After it, input is ignored.

    :param max_line_size: ``PLUGIN_RUNTIME_MAX_BUFFER_SIZE``: a longer line
        fails the session.
    :param status_code: the response's status (quoted in errors).
    :param request_id: the ``x-amzn-RequestId`` header, if any.
    """

    def __init__(self, max_line_size: int, status_code: int = 200, request_id: str | None = None) -> None:
        self._lines = PluginOutputDecoder(max_line_size)
        self._status_code = status_code
        self._request_id = request_id
        self._max_line_size = max_line_size
        self._seen_session = False
        #: True once the last outcome was given
        self.done = False
        #: True when the rest of the body is not worth reading (a line over
        #: the limit, output that is not the SDK's): the caller hangs up
        #: instead of draining it
        self.abandon = False

    def feed(self, data: bytes) -> list:
        """The outcomes of the lines ``data`` completes."""
        if self.done:
            return []
        out: list = []
        for item in self._lines.feed(data):
            self._item(item, out)
            if self.done:
                break
        return out

    def finish(self) -> list:
        """The body ended: its last line, and the ``end`` it may lack."""
        if self.done:
            return []
        out = self.feed(b"\n")
        if self.done:
            return out
        self.done = True
        if self._seen_session:
            out.append(Finished())
        else:
            out.append(runtime_failure(self._status_code, NO_SESSION_RESPONSE, None, self._request_id))
        return out

    def _fail(self, out: list, failure: Failed) -> None:
        self.done = True
        out.append(failure)

    def _item(self, item, out: list) -> None:
        if type(item) is SessionMessage:
            self._seen_session = True
            kind = item.kind
            if kind == "stream":
                out.append(Chunk(item.data, item.raw_data))
            elif kind == "end":
                self.done = True
                out.append(Finished())
            elif kind == "error":
                self._fail(out, Failed(*plugin_error_fields(item.data)))
            elif kind == "invoke":
                self._fail(out, Failed(NOT_SUPPORTED_ERROR_TYPE, NOT_SUPPORTED_MESSAGE))
            # other session message types are the SDK's future: skipped
        elif isinstance(item, ForeignLine):
            self._foreign(item, out)
        elif isinstance(item, Log):
            out.append(LogLine(item))
        elif isinstance(item, PluginErrorEvent):
            data = item.data if isinstance(item.data, str) else orjson.dumps(item.data).decode()
            self._fail(out, Failed(INNER_ERROR_TYPE, f"encountered an error: {data}"))
        elif isinstance(item, MalformedLine):
            self._fail(
                out,
                Failed(INNER_ERROR_TYPE, f"failed to parse session message {item.reason}: {_quote(item.line)}"),
            )
        elif isinstance(item, OversizedLine):
            self.abandon = True
            self._fail(
                out,
                Failed(
                    INNER_ERROR_TYPE,
                    f"failed to read response body: a line of at least {item.size} bytes"
                    f" is longer than the {self._max_line_size} bytes allowed",
                ),
            )
        # heartbeats are ignored

    def _foreign(self, item: ForeignLine, out: list) -> None:
        if not item.is_json:
            self.abandon = True
            self._fail(
                out,
                Failed(
                    INNER_ERROR_TYPE,
                    f"encountered an error: invalid JSON status: {self._status_code}"
                    f" original response: {_quote(item.line)}",
                ),
            )
            return
        found = _lambda_error(orjson.loads(item.line))
        if found is not None:
            error_type, message, request_id = found
            self._fail(out, runtime_failure(self._status_code, error_type, message, self._request_id or request_id))
        # JSON with no or an unknown event: ignored


def _quote(line: bytes) -> str:
    return line[:QUOTE_LIMIT].decode("utf-8", "replace")

