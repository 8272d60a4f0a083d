"""
A fake OpenAI-compatible HTTP server, for tests and benchmarks that run the
official OpenAI model plugin without the internet.

It answers what that plugin calls:

- ``POST /v1/chat/completions`` with ``"stream": true``: ``chunk_count``
  server-sent events, one every ``interval`` seconds, each a
  ``chat.completion.chunk`` carrying one piece of text (the last one with
  ``finish_reason: "stop"``), then ``data: [DONE]``.  By default no usage
  chunk is sent, as in the Go daemon's benchmark, so the plugin counts tokens
  itself with tiktoken; ``usage_chunk=True`` adds the usage chunk that the
  real API sends when asked with ``stream_options.include_usage``.
- ``POST /v1/chat/completions`` without streaming: one ``chat.completion``
  with the whole text and its usage.
- ``GET /v1/models``: a model list (the plugin lists models only for
  fine-tuned ``ft:`` models).

A configured ``api_key`` makes every other key a 401 with OpenAI's error
body.  The pure parts (the text pieces, the JSON bodies, SSE framing) are
module functions; :class:`FakeOpenAIServer` is a plain twisted.web resource
whose timers run on the injected reactor.
"""

from __future__ import annotations

import json

from attrs import frozen
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

CHAT_COMPLETIONS_PATH = b"/v1/chat/completions"
MODELS_PATH = b"/v1/models"
DONE_EVENT = b"data: [DONE]\n\n"
CREATED = 1700000000
SYSTEM_FINGERPRINT = "fp_fake"
PROMPT_TOKENS = 9

_WORDS = (
    "the", "fake", "server", "streams", "one", "word", "per", "chunk", "so", "that",
    "tests", "and", "benchmarks", "can", "count", "every", "piece", "of", "text", "it", "sends",
)


def text_pieces(count: int) -> list[str]:
    """
    The ``count`` pieces of text a stream carries, in order: words from a
    fixed list, every one but the first preceded by a space.
    """
    return [(" " if i else "") + _WORDS[i % len(_WORDS)] for i in range(count)]


def full_text(count: int) -> str:
    """The whole answer: the ``count`` pieces joined."""
    return "".join(text_pieces(count))


def sse_event(data: bytes) -> bytes:
    """One server-sent event carrying ``data`` (one line of JSON)."""
    return b"data: " + data + b"\n\n"


def _dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def usage(completion_tokens: int, prompt_tokens: int = PROMPT_TOKENS) -> dict:
    """An OpenAI ``usage`` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_chunk(completion_id: str, model: str, content: str, finish_reason: str | None) -> bytes:
    """One ``chat.completion.chunk`` with one choice, as JSON bytes."""
    return _dumps(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": content},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
        }
    )


def usage_chunk(completion_id: str, model: str, completion_tokens: int) -> bytes:
    """The final chunk the API sends under ``stream_options.include_usage``: no choices, the usage."""
    return _dumps(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [],
            "usage": usage(completion_tokens),
        }
    )


def chat_completion(completion_id: str, model: str, count: int) -> bytes:
    """A whole (non-streamed) ``chat.completion`` whose answer has ``count`` pieces."""
    return _dumps(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": full_text(count)},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage(count),
        }
    )


def model_list(models) -> bytes:
    """A ``GET /v1/models`` answer naming ``models``."""
    return _dumps(
        {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": CREATED, "owned_by": "fake"} for name in models],
        }
    )


def error_body(message: str, error_type: str, code: str | None) -> bytes:
    """An OpenAI error body."""
    return _dumps({"error": {"message": message, "type": error_type, "param": None, "code": code}})


@frozen
class RecordedRequest:
    """
    One request the fake answered.

    :ivar method: ``GET`` or ``POST``.
    :ivar path: the path, without the query.
    :ivar authorization: the ``Authorization`` header, or None.
    :ivar body: the JSON body (None when there was none or it was not JSON).
    """

    method: str
    path: str
    authorization: str | None
    body: dict | None


class _Stream:
    """One streamed answer in progress: writes a chunk per tick until done or the client leaves."""

    def __init__(self, server: FakeOpenAIServer, request, completion_id: str, model: str, with_usage: bool) -> None:
        self._server = server
        self._request = request
        self._id = completion_id
        self._model = model
        self._with_usage = with_usage
        self._pieces = text_pieces(server.chunk_count)
        self._next = 0
        self._timer = None
        self._gone = False
        request.notifyFinish().addBoth(self._finished)

    def start(self) -> None:
        self._tick()

    def _finished(self, _) -> None:
        # The client went away (or the answer is complete): stop writing.
        self._gone = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def _tick(self) -> None:
        self._timer = None
        if self._gone:
            return
        index = self._next
        last = index == len(self._pieces) - 1
        self._request.write(
            sse_event(completion_chunk(self._id, self._model, self._pieces[index], "stop" if last else None))
        )
        self._next += 1
        if not last:
            self._timer = self._server.reactor.callLater(self._server.interval, self._tick)
            return
        tail = b""
        if self._with_usage:
            tail += sse_event(usage_chunk(self._id, self._model, len(self._pieces)))
        self._request.write(tail + DONE_EVENT)
        self._server.streams_completed += 1
        self._request.finish()


class FakeOpenAIServer(Resource):
    """
    The fake OpenAI API as a twisted.web resource (see the module docstring).

    :param reactor: schedules the chunks of streamed answers.
    :param chunk_count: pieces of text per answer (at least 1).
    :param interval: seconds between two streamed chunks.
    :param usage_chunk: whether streams end with a usage chunk when the
        request asks for one (``stream_options.include_usage``).
    :param api_key: the only key accepted; None accepts any.
    :param models: what ``GET /v1/models`` lists.
    :param record: whether to keep every request in :attr:`requests`
        (benchmarks turn it off).

    :ivar requests: the :class:`RecordedRequest` list, oldest first.
    :ivar streams_started: streamed answers begun.
    :ivar streams_completed: streamed answers sent to the end.
    """

    isLeaf = True

    def __init__(
        self,
        reactor,
        chunk_count: int = 20,
        interval: float = 0.0,
        usage_chunk: bool = False,
        api_key: str | None = None,
        models=("gpt-3.5-turbo", "gpt-4o-mini"),
        record: bool = True,
    ) -> None:
        super().__init__()
        if chunk_count < 1:
            raise ValueError("chunk_count must be at least 1")
        self.reactor = reactor
        self.chunk_count = chunk_count
        self.interval = interval
        self.usage_chunk = usage_chunk
        self.api_key = api_key
        self.models = tuple(models)
        self.record = record
        self.requests: list[RecordedRequest] = []
        self.streams_started = 0
        self.streams_completed = 0
        self._completions = 0

    def render(self, request):
        path = request.path
        body = None
        if request.method == b"POST":
            try:
                body = json.loads(request.content.read() or b"null")
            except ValueError:
                body = None
        authorization = request.getHeader(b"authorization")
        if self.record:
            self.requests.append(
                RecordedRequest(
                    method=request.method.decode("ascii", "replace"),
                    path=path.decode("utf-8", "replace"),
                    authorization=authorization.decode("utf-8", "replace") if authorization else None,
                    body=body if isinstance(body, dict) else None,
                )
            )
        if self.api_key is not None and authorization != b"Bearer " + self.api_key.encode("utf-8"):
            return self._json(
                request,
                401,
                error_body("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
            )
        if path == MODELS_PATH and request.method == b"GET":
            return self._json(request, 200, model_list(self.models))
        if path != CHAT_COMPLETIONS_PATH or request.method != b"POST":
            return self._json(request, 404, error_body("Unknown request URL.", "invalid_request_error", "unknown_url"))
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return self._json(request, 400, error_body("A model is required.", "invalid_request_error", None))
        self._completions += 1
        completion_id = f"chatcmpl-fake{self._completions}"
        model = body["model"]
        if not body.get("stream"):
            return self._json(request, 200, chat_completion(completion_id, model, self.chunk_count))
        options = body.get("stream_options")
        with_usage = self.usage_chunk and isinstance(options, dict) and bool(options.get("include_usage"))
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        self.streams_started += 1
        _Stream(self, request, completion_id, model, with_usage).start()
        return NOT_DONE_YET

    @staticmethod
    def _json(request, code: int, body: bytes) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return body


class _ConnectionTrackingFactory(WrappingFactory):
    """Knows its open connections, so that stopping can close them and wait."""

    def __init__(self, wrapped) -> None:
        super().__init__(wrapped)
        self._idle_waiters: list[Deferred] = []

    def registerProtocol(self, protocol) -> None:
        super().registerProtocol(protocol)
        # Chunks are small writes 10 ms apart: with Nagle's algorithm on,
        # each waits for the client's delayed ACK (~40 ms) and the stream
        # runs four times slower than asked.  Go's net/http sets it too.
        set_no_delay = getattr(protocol.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def unregisterProtocol(self, protocol) -> None:
        super().unregisterProtocol(protocol)
        if not self.protocols:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    def close_all(self) -> Deferred:
        """Abort every open connection; fires when all are closed."""
        waiter: Deferred = Deferred()
        if not self.protocols:
            waiter.callback(None)
            return waiter
        self._idle_waiters.append(waiter)
        for protocol in list(self.protocols):
            protocol.transport.abortConnection()
        return waiter


def stop_listening(listening) -> Deferred:
    """
    Stop each ``(port, factory)`` of ``listening`` (the factories
    :class:`_ConnectionTrackingFactory`) and abort their open connections;
    fires when all are closed.
    """
    waits = []
    for port, factory in listening:
        waits.append(maybeDeferred(port.stopListening))
        waits.append(factory.close_all())
    return DeferredList(waits, fireOnOneErrback=True, consumeErrors=True).addCallback(lambda _: None)


class FakeOpenAIListener:
    """
    A :class:`FakeOpenAIServer` served over HTTP; made by :func:`listen`.

    :ivar port_number: the TCP port.
    :ivar base_url: the ``openai_api_base`` credential that points the
        plugin here (the plugin appends ``/v1``).
    """

    def __init__(self, port, factory: _ConnectionTrackingFactory) -> None:
        self._port = port
        self._factory = factory
        host = port.getHost()
        self.port_number = host.port
        self.base_url = f"http://{host.host}:{host.port}"

    @property
    def open_connections(self) -> int:
        """Client connections open now."""
        return len(self._factory.protocols)

    def stop(self) -> Deferred:
        """
        Stop listening and abort every open connection (plugins keep
        connections alive).  Fires when the port and every connection are closed.
        """
        return DeferredList(
            [maybeDeferred(self._port.stopListening), self._factory.close_all()],
            fireOnOneErrback=True,
            consumeErrors=True,
        ).addCallback(lambda _: None)


def listen(reactor, server: FakeOpenAIServer, port: int = 0, interface: str = "127.0.0.1") -> FakeOpenAIListener:
    """
    Serve ``server`` over HTTP on ``interface:port`` (0: any free port).

    :raises twisted.internet.error.CannotListenError: when the port is taken.
    """
    # Neither form parsing nor an access log: under a benchmark's load
    # they would be most of the fake's CPU.
    site = Site(server, parsePOSTFormSubmission=False)
    site.log = lambda request: None
    factory = _ConnectionTrackingFactory(site)
    return FakeOpenAIListener(reactor.listenTCP(port, factory, interface=interface), factory)
