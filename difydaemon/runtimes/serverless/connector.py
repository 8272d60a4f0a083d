"""
The client of an SRI connector (``serverless.md`` §2): ping, find an
existing function, launch (build and deploy) a package; and, where the
connector offers it (``dify-sri`` does), remove a function.

Every call sends the API key verbatim as ``Authorization`` (no ``Bearer``)
and joins its path onto the base URL, keeping a base path
(``https://x/sri`` -> ``https://x/sri/ping``).  Better than Go (§11.5), the
launch deadline counts idle time: a build may take as long as it likes
while the connector keeps saying something.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from urllib.parse import quote

import orjson
from attrs import frozen
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure

from difydaemon.http_body import BodyLost, BodyStream, StopReading, read_head, reason_of
from difydaemon.runtimes.serverless.launch_stream import (
    DONE,
    ERROR,
    FUNCTION,
    FUNCTION_URL,
    IGNORED,
    INFO,
    LaunchStreamDecoder,
)

log = Logger()

#: the W3C trace context header, on the calls an install makes
TRACEPARENT_HEADER = b"traceparent"

#: seconds a ping or an instances call may take (Go's read deadline)
CALL_TIMEOUT = 60.0
#: how much of a refused launch's body the error quotes
ERROR_BODY_LIMIT = 4096
MISSING_FUNCTION_MESSAGE = "Internal server error, failed to get lambda url or function name"
NO_END_MESSAGE = "the connector's launch stream ended before the function was reported ready"
#: outcomes of :meth:`SRIClient.remove_function`
REMOVED = "removed"
NOT_THERE = "not there"
UNSUPPORTED = "unsupported"


class ConnectorError(Exception):
    """A connector call failed; ``message`` says why, in the connector's words when it gave any."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@frozen
class FunctionInfo:
    """
    A deployed function.

    :ivar name: the connector's function name.
    :ivar url: the function URL ``/invoke`` is joined onto.
    :ivar resource_name: the connector's resource name ("DRN"), kept in memory only.
    """

    name: str
    url: str
    resource_name: str = ""


def package_filename(author: str, name: str, version: str, checksum: str) -> str:
    """The connector's name of a package: ``<author>@<name>@<version>@<checksum>.difypkg``."""
    return f"{author}@{name}@{version}@{checksum}.difypkg"


def launch_body(boundary: str, filename: str, package: bytes, verified: bool, identifier: str) -> bytes:
    """
    The ``multipart/form-data`` body of ``POST /v1/launch``: the package as
    ``context``, then ``verified`` and ``metadata``.
    """
    crlf = b"\r\n"
    dash = b"--" + boundary.encode()
    metadata = orjson.dumps({"plugin_unique_identifier": identifier})
    escaped = filename.replace("\\", "\\\\").replace('"', '\\"')
    parts = [
        dash,
        b'Content-Disposition: form-data; name="context"; filename="' + escaped.encode() + b'"',
        b"Content-Type: application/octet-stream",
        b"",
        package,
        dash,
        b'Content-Disposition: form-data; name="verified"',
        b"",
        b"true" if verified else b"false",
        dash,
        b'Content-Disposition: form-data; name="metadata"',
        b"",
        metadata,
        dash + b"--",
        b"",
    ]
    return crlf.join(parts)


def _lower_keys(value):
    # Go decodes JSON keys case-insensitively
    return {k.lower(): v for k, v in value.items()} if isinstance(value, dict) else {}


def decode_instances(body: bytes) -> FunctionInfo | None:
    """
    The function an instances answer names, None for "not found".

    :raises ConnectorError: for a body that is not JSON or that carries an ``error``.
    """
    try:
        answer = _lower_keys(orjson.loads(body))
    except orjson.JSONDecodeError:
        raise ConnectorError(f"unexpected response from plugin controller: {body[:ERROR_BODY_LIMIT]!r}") from None
    error = answer.get("error")
    if error:
        raise ConnectorError(f"unexpected response from plugin controller: {error}")
    items = answer.get("items")
    if not isinstance(items, list) or not items:
        return None
    first = _lower_keys(items[0])
    return FunctionInfo(
        name=str(first.get("name") or ""),
        url=str(first.get("endpoint") or ""),
        resource_name=str(first.get("resourcename") or ""),
    )


class SRIClient:
    """
    Talks to one connector.

    :param reactor: for deadlines.
    :param http: a treq-like client (``treq.client.HTTPClient`` with a
        short connect timeout, or ``StubTreq`` in tests).
    :param base_url: ``DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL``.
    :param api_key: ``DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY``.
    :param launch_idle_timeout: seconds the launch stream may stay silent
        (``DIFY_PLUGIN_SERVERLESS_CONNECTOR_LAUNCH_TIMEOUT``).
    :param call_timeout: seconds a ping or instances call may take.
    """

    def __init__(
        self,
        reactor,
        http,
        base_url: str,
        api_key: str,
        launch_idle_timeout: float = 240.0,
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._http = http
        self._base = base_url.rstrip("/")
        self._headers = {b"Authorization": [api_key.encode("utf-8")]}
        self.launch_idle_timeout = launch_idle_timeout
        self.call_timeout = call_timeout

    def url(self, path: str) -> str:
        """``path`` joined onto the base URL."""
        return self._base + "/" + path.lstrip("/")

    def _headers_with(self, traceparent: str | None) -> dict:
        """A copy of the calls' headers, with ``traceparent`` when the call is part of a trace (an install's)."""
        headers = dict(self._headers)
        if traceparent:
            headers[TRACEPARENT_HEADER] = [traceparent.encode("ascii", "replace")]
        return headers

    async def _get_body(self, method: str, path: str, traceparent: str | None = None) -> bytes:
        """The whole body of a short call, within the call timeout (its status is not checked, as in Go)."""
        _code, body = await self._call(method, path, traceparent)
        return body

    async def _call(self, method: str, path: str, traceparent: str | None = None) -> tuple[int, bytes]:
        """The status and whole body of a short call, within the call timeout."""
        timed_out = []
        requesting = self._http.request(
            method, self.url(path), headers=self._headers_with(traceparent), unbuffered=True
        )
        reader = None

        def expire() -> None:
            timed_out.append(True)
            if reader is not None:
                reader.stop(Failure(CancelledError()))
            else:
                requesting.cancel()

        deadline = self._reactor.callLater(self.call_timeout, expire)
        pieces: list[bytes] = []
        code = 0
        try:
            try:
                response = await requesting
                code = response.code
                reader = BodyStream(pieces.append)
                response.deliverBody(reader)
                await reader.done
            except CancelledError:
                if timed_out:
                    raise ConnectorError(
                        f"connector {method} {path} timed out after {self.call_timeout:g} seconds"
                    ) from None
                raise
            except BodyLost as exc:
                raise ConnectorError(f"connector {method} {path} failed: {exc.reason}") from None
            except Exception as exc:
                raise ConnectorError(f"connector {method} {path} failed: {reason_of(exc)}") from exc
        finally:
            if deadline.active():
                deadline.cancel()
        return code, b"".join(pieces)

    async def ping(self) -> None:
        """
        ``POST /ping``: the body must be the JSON string ``"pong"`` (the
        status is not checked, as in Go).

        :raises ConnectorError: otherwise.
        """
        body = await self._get_body("POST", "ping")
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        if answer != "pong":
            raise ConnectorError(
                f"connector ping at {self.url('ping')} failed: expected \"pong\", got {body[:200]!r}"
                " (is DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY right?)"
            )

    async def find_function(self, filename: str, traceparent: str | None = None) -> FunctionInfo | None:
        """
        ``GET /v1/runner/instances?filename=...``: the deployed function of a
        package, or None.  ``traceparent``: the install's trace context.
        """
        path = "v1/runner/instances?filename=" + quote(filename, safe="")
        return decode_instances(await self._get_body("GET", path, traceparent))

    async def remove_function(self, filename: str) -> str:
        """
        ``DELETE /v1/runner/instances?filename=...``: ask the connector to
        stop and remove the function of a package no longer installed.  Not
        an SRI call: an extension of ``dify-sri`` (``serverless.md`` §11.7),
        which a connector without it answers 404 or 405.

        :return: :data:`REMOVED`, :data:`NOT_THERE` (the connector had no
            such function) or :data:`UNSUPPORTED` (404, 405 or 501).
        :raises ConnectorError: any other status, an ``error`` in the answer,
            or a failed call.
        """
        path = "v1/runner/instances?filename=" + quote(filename, safe="")
        code, body = await self._call("DELETE", path)
        if code in (404, 405, 501):
            return UNSUPPORTED
        try:
            answer = _lower_keys(orjson.loads(body))
        except orjson.JSONDecodeError:
            answer = {}
        if code != 200 or answer.get("error"):
            reason = answer.get("error") or body[:200].decode("utf-8", "replace")
            raise ConnectorError(f"connector DELETE v1/runner/instances answered {code}: {reason}")
        return REMOVED if answer.get("removed") else NOT_THERE

    async def launch(
        self,
        filename: str,
        package: bytes,
        verified: bool,
        identifier: str,
        progress: Callable[[str], None],
        traceparent: str | None = None,
    ) -> FunctionInfo:
        """
        ``POST /v1/launch``: build and deploy a package, reporting the
        connector's progress lines to ``progress``.

        The first ``failed`` line ends the launch with the connector's
        message (Go reads on, and a later ``end`` could turn a failure into
        a success); a stream that ends, or stays silent for
        ``launch_idle_timeout`` seconds, before the function was reported
        ready fails too.  ``traceparent``: the install's trace context,
        sent as that header.

        :raises ConnectorError: with why.
        """
        boundary = secrets.token_hex(16)
        headers = self._headers_with(traceparent)
        headers[b"Content-Type"] = [b"multipart/form-data; boundary=" + boundary.encode()]
        requesting = self._http.post(
            self.url("v1/launch"),
            data=launch_body(boundary, filename, package, verified, identifier),
            headers=headers,
            unbuffered=True,
        )
        state = _LaunchState(progress)
        reader: BodyStream | None = None
        idle: list = []

        def expire() -> None:
            idle.append(True)
            if reader is not None:
                reader.stop(Failure(CancelledError()))
            else:
                requesting.cancel()

        timer = self._reactor.callLater(self.launch_idle_timeout, expire)
        decoder = LaunchStreamDecoder()

        def sink(data: bytes) -> None:
            timer.reset(self.launch_idle_timeout)
            state.feed(decoder.feed(data))

        try:
            try:
                response = await requesting
                if response.code != 200:
                    head = await read_head(response, ERROR_BODY_LIMIT)
                    raise ConnectorError(
                        f"request failed with status code: {response.code} and respond with: "
                        f"{head.decode('utf-8', 'replace')}"
                    )
                timer.reset(self.launch_idle_timeout)
                reader = BodyStream(sink)
                response.deliverBody(reader)
                await reader.done
            except CancelledError:
                if idle:
                    raise ConnectorError(
                        f"the connector said nothing for {self.launch_idle_timeout:g} seconds while launching"
                    ) from None
                raise
            except BodyLost as exc:
                raise ConnectorError(f"the connector's launch stream broke: {exc.reason}") from None
            except (ConnectorError, CancelledError):
                raise
            except Exception as exc:
                raise ConnectorError(f"failed to launch on the connector: {reason_of(exc)}") from exc
            if state.result is None:
                state.feed(decoder.finish())
        finally:
            if timer.active():
                timer.cancel()
        if state.result is None:
            raise ConnectorError(NO_END_MESSAGE)
        return state.result


class _LaunchState:
    """What a launch stream said so far; raises out of the body sink to stop reading."""

    def __init__(self, progress) -> None:
        self._progress = progress
        self.name = ""
        self.url = ""
        self.result: FunctionInfo | None = None

    def feed(self, events) -> None:
        for event in events:
            kind = event.kind
            if kind == INFO:
                self._progress(f"{event.text} {event.detail}".strip() if event.detail else event.text)
            elif kind == ERROR:
                raise ConnectorError(event.text or "the connector reported a failed launch")
            elif kind == FUNCTION:
                self.name = event.text
            elif kind == FUNCTION_URL:
                self.url = event.text
            elif kind == DONE:
                if not self.name or not self.url:
                    raise ConnectorError(MISSING_FUNCTION_MESSAGE)
                self.result = FunctionInfo(self.name, self.url)
                raise StopReading()
            elif kind == IGNORED:
                log.warn("connector launch stream data not match: {line}", line=event.text[:200])
