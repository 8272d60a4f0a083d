"""
The daemon's client of the Dify inner API (``runtimes.md`` §4.2,
``http-api.md`` §8, ``dify-api-client.md`` §6).

Backwards invocations that Dify serves are POSTed to
``$DIFY_INNER_API_URL/inner/api/<path>`` with the ``X-Inner-Api-Key``
header and a JSON body.  Dify answers with ``{"data": ..., "error": ""}``
values: streamed calls as length-prefixed frames (one value per frame),
single calls as one plain JSON body or, in recent Dify versions, one frame.
A non-empty ``error`` or a null ``data`` is a failure.

Every failure -- HTTP status, connection, timeout, bad frame, bad JSON,
an ``error`` from Dify -- is an :class:`InnerAPIError` whose message is
what the plugin is told.
"""

from __future__ import annotations

from typing import Callable

import orjson
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from difydaemon.http_body import BodyStream, StopReading, reason_of
from difydaemon.invocation.frames import FRAME_OVERHEAD, MAGIC, FrameDecoder, FrameError
from difydaemon.observability.otel import CLIENT

#: How much of an unexpected answer is quoted in the error message.
QUOTED_BODY_SIZE = 1024
_MAGIC_BYTE = bytes([MAGIC])


class InnerAPIError(Exception):
    """
    A call to the Dify inner API failed.

    :ivar message: the reason, as the plugin will see it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _BodyReader(BodyStream):
    """A body reader whose lost connection is an :class:`InnerAPIError` naming the path."""

    def __init__(self, path: str, sink: Callable[[bytes], None]) -> None:
        super().__init__(sink)
        self._path = path

    def lost(self, reason: str) -> Exception:
        return InnerAPIError(f"failed to call dify inner api {self._path}: {reason}")


def _head_sink(pieces: list[bytes]) -> Callable[[bytes], None]:
    """A body sink keeping the first :data:`QUOTED_BODY_SIZE` bytes or so, then stopping."""
    size = 0

    def sink(data: bytes) -> None:
        nonlocal size
        pieces.append(data)
        size += len(data)
        if size > QUOTED_BODY_SIZE:
            raise StopReading()

    return sink


def _quote(body: bytes) -> str:
    text = body[:QUOTED_BODY_SIZE].decode("utf-8", "replace")
    return text + "..." if len(body) > QUOTED_BODY_SIZE else text


def _data_of(path: str, payload: bytes):
    """The ``data`` of one ``{"data": ..., "error": ""}`` value."""
    try:
        message = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise InnerAPIError(f"dify inner api {path} answered invalid JSON: {_quote(payload)}") from None
    if not isinstance(message, dict):
        raise InnerAPIError(f"dify inner api {path} answered JSON that is not an object: {_quote(payload)}")
    error = message.get("error")
    if error:
        raise InnerAPIError(error if isinstance(error, str) else str(error))
    data = message.get("data")
    if data is None:
        raise InnerAPIError(f"dify inner api {path} answered no data")
    return data


def make_http_client(reactor, connect_timeout: float) -> HTTPClient:
    """
    The treq client the daemon calls Dify with: kept-alive connections (a
    plugin often calls back many times in a row) and a bounded connect.
    Whoever stops the daemon should close its pool's cached connections.
    """
    return HTTPClient(Agent(reactor, connectTimeout=connect_timeout, pool=HTTPConnectionPool(reactor)))


class DifyInnerAPI:
    """
    Calls the Dify inner API.

    :param reactor: times the calls.
    :param http_client: a treq-like object: the ``treq`` module, a
        ``treq.client.HTTPClient`` or a ``treq.testing.StubTreq``; None
        for :func:`make_http_client` over ``reactor``.
    :param base_url: ``DIFY_INNER_API_URL``.
    :param api_key: ``DIFY_INNER_API_KEY``.
    :param write_timeout: seconds to connect
        (``DIFY_BACKWARDS_INVOCATION_WRITE_TIMEOUT``, given there in ms).
        Used only to build the client when ``http_client`` is None: a
        given client brings its own connect timeout, and no treq client
        tells when a request has been sent.
    :param read_timeout: seconds for the whole call, from the request to
        the end of the answer's body; when it expires the call is
        cancelled or the connection closed
        (``DIFY_BACKWARDS_INVOCATION_READ_TIMEOUT``).
    :param max_frame_size: the largest value accepted
        (``RESPONSE_MAX_BUFFER_SIZE``).
    :param tracing: a :class:`~difydaemon.observability.otel.Tracing`
        making a client span of each call, or None.

    Each call takes the ``traceparent`` of the plugin session it serves
    and sends it as a header (the call's own span's, with tracing on).
    """

    def __init__(
        self,
        reactor,
        http_client,
        base_url: str,
        api_key: str,
        write_timeout: float,
        read_timeout: float,
        max_frame_size: int,
        tracing=None,
    ) -> None:
        self._reactor = reactor
        self._tracing = tracing
        self._http = http_client if http_client is not None else make_http_client(reactor, write_timeout)
        self._base_url = base_url.rstrip("/") + "/inner/api/"
        self._headers = {"X-Inner-Api-Key": api_key, "Content-Type": "application/json"}
        self._read_timeout = read_timeout
        self._max_frame_size = max_frame_size

    def url(self, path: str) -> str:
        """The URL of an inner API ``path`` such as ``invoke/llm``."""
        return self._base_url + path

    async def stream(
        self, path: str, body: dict, on_item: Callable[[object], object], traceparent: str | None = None
    ) -> None:
        """
        Call a streamed endpoint; ``on_item(data)`` is called for each
        frame as it arrives.  Returns at the end of the stream.

        :raises InnerAPIError: on any failure; an exception from
            ``on_item`` stops the call and propagates unchanged.
        """
        decoder = FrameDecoder(self._max_frame_size)

        def sink(data: bytes) -> None:
            try:
                payloads = decoder.feed(data)
            except FrameError as exc:
                raise InnerAPIError(f"dify inner api {path} answered a bad frame: {exc}") from None
            for payload in payloads:
                on_item(_data_of(path, payload))

        await self._call(path, body, sink, traceparent)
        try:
            decoder.finish()
        except FrameError as exc:
            raise InnerAPIError(f"dify inner api {path} answered a bad frame: {exc}") from None

    async def single(self, path: str, body: dict, traceparent: str | None = None):
        """
        Call a single-answer endpoint and return the answer's ``data``.

        Both forms Dify uses are accepted: a plain JSON body, and a body of
        exactly one frame (it starts with the magic byte, which JSON cannot).

        :raises InnerAPIError: on any failure.
        """
        limit = self._max_frame_size + FRAME_OVERHEAD
        pieces: list[bytes] = []
        size = 0

        def sink(data: bytes) -> None:
            nonlocal size
            size += len(data)
            if size > limit:
                raise InnerAPIError(f"dify inner api {path} answered more than {limit} bytes")
            pieces.append(data)

        await self._call(path, body, sink, traceparent)
        answer = b"".join(pieces)
        if answer.startswith(_MAGIC_BYTE):
            decoder = FrameDecoder(self._max_frame_size)
            try:
                payloads = decoder.feed(answer)
                decoder.finish()
            except FrameError as exc:
                raise InnerAPIError(f"dify inner api {path} answered a bad frame: {exc}") from None
            if len(payloads) != 1:
                raise InnerAPIError(f"dify inner api {path} answered {len(payloads)} frames, expected one")
            answer = payloads[0]
        return _data_of(path, answer)

    async def encrypt(
        self,
        tenant_id: str,
        user_id: str,
        opt: str,
        namespace: str,
        identity: str,
        data: dict,
        config: list,
    ) -> dict:
        """
        Encrypt, decrypt or clear the secret fields of ``data`` through
        ``invoke/encrypt`` (``http-api.md`` §8).

        :param opt: ``encrypt``, ``decrypt`` or ``clear``.
        :param namespace: ``endpoint`` for endpoint settings.
        :param identity: the endpoint's id.
        :param config: the ProviderConfig dicts describing ``data``.
        :returns: ``data`` itself, without a call, when no ProviderConfig
            is a ``secret-input``; else Dify's answer.
        """
        if not any(isinstance(entry, dict) and entry.get("type") == "secret-input" for entry in config):
            return data
        answer = await self.single(
            "invoke/encrypt",
            {
                "tenant_id": tenant_id,
                "user_id": user_id,
                "type": "encrypt",
                "opt": opt,
                "namespace": namespace,
                "identity": identity,
                "data": data,
                "config": config,
            },
        )
        # Dify wraps the result once more: {"data": {"data": {...}}}.
        result = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(result, dict):
            raise InnerAPIError(f"dify inner api invoke/encrypt answered no data object: {_quote(orjson.dumps(answer))}")
        return result

    async def _call(
        self, path: str, body: dict, sink: Callable[[bytes], None], traceparent: str | None = None
    ) -> None:
        """
        POST ``body`` to ``path``, require HTTP 200 and give each piece of
        the answer's body to ``sink``, all within the read timeout.
        """
        headers = self._headers
        span = None
        if self._tracing is not None:
            span = self._tracing.start("dify inner api " + path, CLIENT, traceparent, {"url.path": "/inner/api/" + path})
            traceparent = span.traceparent
        if traceparent:
            headers = dict(headers, traceparent=traceparent)
        try:
            await self._post(path, body, sink, headers)
        except BaseException as exc:
            if span is not None:
                span.end(str(exc) or type(exc).__name__)
            raise
        if span is not None:
            span.end()

    async def _post(self, path: str, body: dict, sink: Callable[[bytes], None], headers: dict) -> None:
        timeout: InnerAPIError | None = None
        reader: _BodyReader | None = None
        requesting: Deferred | None = None

        def expire() -> None:
            nonlocal timeout
            timeout = InnerAPIError(f"call to dify inner api {path} timed out after {self._read_timeout:g} seconds")
            if reader is not None:
                reader.stop(Failure(timeout))
            elif requesting is not None:
                requesting.cancel()

        deadline = self._reactor.callLater(self._read_timeout, expire)
        try:
            requesting = self._http.post(
                self.url(path),
                data=orjson.dumps(body),
                headers=headers,
                unbuffered=True,
                allow_redirects=False,
            )
            try:
                response = await requesting
            except Exception as exc:
                if timeout is not None:
                    raise timeout from None
                if isinstance(exc, CancelledError):
                    raise
                raise InnerAPIError(f"failed to call dify inner api {path}: {reason_of(exc)}") from exc
            if response.code != 200:
                head: list[bytes] = []
                reader = _BodyReader(path, _head_sink(head))
                response.deliverBody(reader)
                try:
                    await reader.done
                except InnerAPIError:
                    # Lost while reading the error page: the status is what
                    # matters, unless the call timed out.
                    if timeout is not None:
                        raise
                raise InnerAPIError(
                    f"dify inner api {path} failed with status code {response.code}: {_quote(b''.join(head))}"
                )
            reader = _BodyReader(path, sink)
            response.deliverBody(reader)
            await reader.done
        finally:
            if deadline.active():
                deadline.cancel()
