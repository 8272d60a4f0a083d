"""
A fake Dify inner API (``dify-api-client.md`` §6), for tests where the daemon
calls Dify back on a plugin's behalf.

:class:`FakeDifyInnerAPI` is a Klein app serving ``POST /inner/api/<path>``
as Dify does: a missing or wrong ``X-Inner-Api-Key`` is a 404, streamed
answers are one length-prefixed frame per value, single answers a plain
JSON body (or one frame, with ``framed_singles``).  Every value is
``{"data": ..., "error": ""}``.  The default answers (:func:`default_values`)
have the shapes the dify_plugin SDK (0.10.x) builds its results from and
echo the request where that helps a test see what was sent.

Tests change answers per path with :meth:`~FakeDifyInnerAPI.answer`,
:meth:`~FakeDifyInnerAPI.fail`, :meth:`~FakeDifyInnerAPI.garbage`,
:meth:`~FakeDifyInnerAPI.error` and :meth:`~FakeDifyInnerAPI.slow` (timed on
the injected reactor).  Use :meth:`~FakeDifyInnerAPI.resource` with StubTreq,
or :meth:`~FakeDifyInnerAPI.listen` to serve it over TCP and
:meth:`~FakeDifyInnerAPI.stop` to take it down again.

The answer to ``upload/file/request`` points at ``/files/upload/for-plugin``
on the fake itself, which takes the SDK's multipart upload and answers 201
as Dify does.
"""

from __future__ import annotations

import json
from urllib.parse import urlencode

import orjson
from attrs import frozen
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.server import Site

from difydaemon.api.multipart import MultipartError, parse_form
from difydaemon.invocation.frames import encode_frame
from difydaemon.testing.openai import _ConnectionTrackingFactory, stop_listening

#: The paths Dify answers with a stream of values.
STREAM_PATHS = frozenset({"invoke/tool", "invoke/llm", "invoke/llm/structured-output", "invoke/tts", "invoke/app"})
#: What the default LLM answer says, one piece per chunk.
LLM_PIECES = ("Hello", " from", " the", " fake", " Dify.")
#: The prefix the fake's ``invoke/encrypt`` puts in front of secrets.
ENCRYPTED_PREFIX = "enc:"
UPLOAD_PATH = "/files/upload/for-plugin"
PROMPT_TOKENS = 7

#: Flask's 404 page, which is what Dify answers to a wrong key.
NOT_FOUND_PAGE = (
    b'<!doctype html>\n<html lang=en>\n<title>404 Not Found</title>\n<h1>Not Found</h1>\n'
    b"<p>The requested URL was not found on the server.</p>\n"
)


def _dumps(value) -> bytes:
    return orjson.dumps(value)


def llm_usage(completion_tokens: int) -> dict:
    """A full LLMUsage, prices as decimal strings as Dify's pydantic writes them."""
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "prompt_unit_price": "0.001",
        "prompt_price_unit": "0.001",
        "prompt_price": "0.0000070",
        "completion_tokens": completion_tokens,
        "completion_unit_price": "0.002",
        "completion_price_unit": "0.001",
        "completion_price": "0.0000100",
        "total_tokens": PROMPT_TOKENS + completion_tokens,
        "total_price": "0.0000170",
        "currency": "USD",
        "latency": 0.25,
    }


def embedding_usage(tokens: int) -> dict:
    """A full EmbeddingUsage."""
    return {
        "tokens": tokens,
        "total_tokens": tokens,
        "unit_price": "0.0001",
        "price_unit": "0.001",
        "total_price": "0.0000001",
        "currency": "USD",
        "latency": 0.05,
    }


def llm_chunks(body: dict, structured: bool = False) -> list[dict]:
    """
    LLMResultChunks carrying :data:`LLM_PIECES`; the last has the usage and
    ``finish_reason: "stop"`` (and, if ``structured``, the structured output).
    """
    model = body.get("model") or "fake-model"
    last = len(LLM_PIECES) - 1
    chunks = []
    for index, piece in enumerate(LLM_PIECES):
        chunk = {
            "model": model,
            "prompt_messages": [],
            "system_fingerprint": None,
            "delta": {
                "index": index,
                "message": {"role": "assistant", "content": piece, "name": None, "tool_calls": []},
                "usage": llm_usage(len(LLM_PIECES)) if index == last else None,
                "finish_reason": "stop" if index == last else None,
            },
        }
        if structured:
            chunk["structured_output"] = {"answer": "".join(LLM_PIECES)} if index == last else None
        chunks.append(chunk)
    return chunks


def _tool_messages(body: dict) -> list[dict]:
    parameters = body.get("tool_parameters")
    return [
        {"type": "text", "message": {"text": json.dumps(parameters, sort_keys=True)}, "meta": None},
        {
            "type": "json",
            "message": {
                "json_object": {
                    "tool_type": body.get("tool_type"),
                    "provider": body.get("provider"),
                    "tool": body.get("tool"),
                    "tool_parameters": parameters,
                }
            },
            "meta": None,
        },
    ]


def _embeddings(body: dict) -> list[dict]:
    # One vector per input, derived from its length so tests can tell them apart.
    inputs = body.get("texts")
    if inputs is None:
        inputs = [d.get("content", "") if isinstance(d, dict) else d for d in body.get("documents") or []]
    inputs = [str(i) for i in inputs or []]
    return [
        {
            "model": body.get("model") or "fake-embedding",
            "embeddings": [[float(len(text)), float(index), 0.5] for index, text in enumerate(inputs)],
            "usage": embedding_usage(sum(len(text.split()) for text in inputs)),
        }
    ]


def _rerank(body: dict) -> list[dict]:
    docs = [d.get("content", "") if isinstance(d, dict) else str(d) for d in body.get("docs") or []]
    # Earlier documents score higher; top_n and score_threshold apply as in Dify.
    scored = [{"index": i, "text": text, "score": round(1.0 / (i + 1), 6)} for i, text in enumerate(docs)]
    threshold = body.get("score_threshold")
    if isinstance(threshold, (int, float)):
        scored = [d for d in scored if d["score"] >= threshold]
    top_n = body.get("top_n")
    if isinstance(top_n, int):
        scored = scored[:top_n]
    return [{"model": body.get("model") or "fake-rerank", "docs": scored}]


def _tts(body: dict) -> list[dict]:
    audio = str(body.get("content_text", "")).encode("utf-8")
    half = len(audio) // 2
    return [{"result": audio[:half].hex()}, {"result": audio[half:].hex()}]


def _speech2text(body: dict) -> list[dict]:
    file = body.get("file")
    size = len(file) // 2 if isinstance(file, str) else 0
    return [{"result": f"fake transcript of {size} bytes"}]


def _node_response(body: dict, outputs: dict) -> list[dict]:
    return [{"process_data": {}, "inputs": {"query": body.get("query")}, "outputs": outputs}]


def _parameter_extractor(body: dict) -> list[dict]:
    names = [p.get("name") for p in body.get("parameters") or [] if isinstance(p, dict)]
    outputs = {name: f"value of {name}" for name in names if isinstance(name, str)}
    outputs.update({"__is_success": 1, "__reason": None})
    return _node_response(body, outputs)


def _question_classifier(body: dict) -> list[dict]:
    classes = [c for c in body.get("classes") or [] if isinstance(c, dict)]
    first = classes[0] if classes else {}
    return _node_response(body, {"class_name": first.get("name"), "class_id": first.get("id")})


def _app(body: dict) -> list[dict]:
    conversation_id = body.get("conversation_id") or "fake-conversation"
    answer = f"fake answer to {body.get('query')!r}"
    if body.get("response_mode") == "blocking":
        return [{"event": "message", "answer": answer, "conversation_id": conversation_id, "metadata": {}}]
    return [
        {"event": "message", "answer": "fake ", "conversation_id": conversation_id},
        {"event": "message", "answer": answer[len("fake ") :], "conversation_id": conversation_id},
        {"event": "message_end", "conversation_id": conversation_id, "metadata": {}},
    ]


def _app_info(body: dict) -> list[dict]:
    # Dify answers the app's parameters wrapped once more in "data".
    return [
        {
            "data": {
                "opening_statement": f"fake app {body.get('app_id')}",
                "suggested_questions": [],
                "user_input_form": [],
                "file_upload": {"image": {"enabled": False}},
                "system_parameters": {"file_size_limit": 15},
            }
        }
    ]


def encrypt_values(body: dict) -> list[dict]:
    """
    ``invoke/encrypt``: the secret-input fields of ``data`` get
    :data:`ENCRYPTED_PREFIX` (encrypt) or lose it (decrypt); clear answers
    an empty object.  The value is wrapped in ``data`` as Dify does.
    """
    data = body.get("data") if isinstance(body.get("data"), dict) else {}
    secrets = {c.get("name") for c in body.get("config") or [] if isinstance(c, dict) and c.get("type") == "secret-input"}
    opt = body.get("opt")
    if opt == "clear":
        return [{"data": {}}]
    result = dict(data)
    for name in secrets:
        value = result.get(name)
        if not isinstance(value, str):
            continue
        if opt == "encrypt":
            result[name] = ENCRYPTED_PREFIX + value
        elif opt == "decrypt" and value.startswith(ENCRYPTED_PREFIX):
            result[name] = value[len(ENCRYPTED_PREFIX) :]
    return [{"data": result}]


_DEFAULTS = {
    "invoke/tool": _tool_messages,
    "invoke/llm": llm_chunks,
    "invoke/llm/structured-output": lambda body: llm_chunks(body, structured=True),
    "invoke/text-embedding": _embeddings,
    "invoke/multimodal-embedding": _embeddings,
    "invoke/rerank": _rerank,
    "invoke/multimodal-rerank": _rerank,
    "invoke/tts": _tts,
    "invoke/speech2text": _speech2text,
    "invoke/moderation": lambda body: [{"result": "unsafe" in str(body.get("text", ""))}],
    "invoke/summary": lambda body: [{"summary": "summary: " + str(body.get("text", ""))[:100]}],
    "invoke/parameter-extractor": _parameter_extractor,
    "invoke/question-classifier": _question_classifier,
    "invoke/app": _app,
    "fetch/app/info": _app_info,
    "invoke/encrypt": encrypt_values,
}


def default_values(path: str, body: dict) -> list | None:
    """
    The ``data`` values the fake answers to ``path`` by default (one for a
    single answer), or None for a path Dify does not serve.
    ``upload/file/request`` is left to the fake, which knows its own address.
    """
    build = _DEFAULTS.get(path)
    return None if build is None else build(body)


@frozen
class ReceivedRequest:
    """
    One request the fake received.

    :ivar path: the part after ``/inner/api/`` (``invoke/llm``), or the
        whole path for an upload.
    :ivar headers: lower-case header name -> last value.
    :ivar body: the parsed JSON body; None if it was not JSON.
    """

    path: str
    headers: dict
    body: object


@frozen
class UploadedFile:
    """One file the SDK posted to the upload URL."""

    filename: str
    mimetype: str
    content: bytes


@frozen
class _Reply:
    status: int
    content_type: bytes
    pieces: tuple  # written in order; a delayed reply pauses between two of them


def _envelope(data, error: str = "") -> dict:
    return {"data": data, "error": error}


class FakeDifyInnerAPI:
    """
    The fake inner API (see the module docstring).

    :param reactor: times :meth:`slow` answers and serves :meth:`listen`.
    :param api_key: the only ``X-Inner-Api-Key`` accepted.
    :param framed_singles: answer single calls with one frame instead of a
        plain JSON body, as recent Dify versions do.

    :ivar received: every :class:`ReceivedRequest`, oldest first.
    :ivar uploads: every :class:`UploadedFile`, oldest first.
    """

    app = Klein()

    def __init__(self, reactor, api_key: str, framed_singles: bool = False) -> None:
        self.reactor = reactor
        self.api_key = api_key
        self.framed_singles = framed_singles
        self.received: list[ReceivedRequest] = []
        self.uploads: list[UploadedFile] = []
        self._overrides: dict = {}
        self._delays: dict = {}
        self._listening: list = []

    def resource(self):
        """The twisted.web resource of the fake."""
        return self.app.resource()

    # -- overrides ----------------------------------------------------------

    def answer(self, path: str, items, framed: bool | None = None) -> None:
        """
        Answer ``path`` with these ``data`` values from now on.

        :param framed: one frame per value (True) or one plain JSON body
            (False, needs exactly one value); None does what Dify does for
            the path.
        """
        items = list(items)
        if framed is False and len(items) != 1:
            raise ValueError("a plain JSON answer carries exactly one value")
        self._overrides[path] = lambda: self._encode(path, [_envelope(item) for item in items], framed)

    def error(self, path: str, message: str, items=(), framed: bool | None = None) -> None:
        """Answer ``path`` with ``items`` (if any), then a value whose ``error`` is ``message``."""
        envelopes = [_envelope(item) for item in items] + [_envelope(None, message)]
        self._overrides[path] = lambda: self._encode(path, envelopes, framed)

    def fail(self, path: str, status: int, body: bytes = b"") -> None:
        """Answer ``path`` with HTTP ``status`` and this raw body."""
        self._overrides[path] = lambda: _Reply(status, b"text/plain; charset=utf-8", (body,))

    def garbage(self, path: str, raw: bytes) -> None:
        """Answer ``path`` with HTTP 200 and these raw bytes."""
        self._overrides[path] = lambda: _Reply(200, b"application/octet-stream", (raw,))

    def slow(self, path: str, seconds: float, after: int = 0) -> None:
        """
        Delay the answers to ``path``: send the first ``after`` pieces (frames,
        for a framed answer), then wait ``seconds`` on the reactor before the
        rest.  With ``after=0`` not even the status line goes out before.
        """
        self._delays[path] = (seconds, after)

    def reset(self, path: str) -> None:
        """Go back to the default answer for ``path``, without delay."""
        self._overrides.pop(path, None)
        self._delays.pop(path, None)

    # -- serving --------------------------------------------------------------

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> Deferred:
        """
        Serve the fake over HTTP on ``interface:port`` (0: any free port).

        :returns: Deferred[IListeningPort]; :func:`base_url` of it is the
            daemon's ``DIFY_INNER_API_URL``.
        """
        # As the daemon's own site: no form parsing (the upload route parses
        # its multipart body itself), no access log.
        site = Site(self.resource(), parsePOSTFormSubmission=False)
        site.log = lambda request: None
        factory = _ConnectionTrackingFactory(site)
        d = TCP4ServerEndpoint(self.reactor, port, interface=interface).listen(factory)

        def listening(listening_port):
            self._listening.append((listening_port, factory))
            return listening_port

        return d.addCallback(listening)

    def stop(self) -> Deferred:
        """
        Stop every port :meth:`listen` opened and abort their open
        connections (the "inner API is down" case).  Fires when all are closed.
        """
        listening, self._listening = self._listening, []
        return stop_listening(listening)

    # -- routes ---------------------------------------------------------------

    @app.route("/inner/api/<path:path>", methods=["POST"])
    def inner_api(self, request, path):
        raw = request.content.read() if request.content is not None else b""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        self.received.append(ReceivedRequest(path, headers, body))
        if request.getHeader(b"x-inner-api-key") != self.api_key.encode("utf-8"):
            return self._send(request, path, _Reply(404, b"text/html; charset=utf-8", (NOT_FOUND_PAGE,)))
        override = self._overrides.get(path)
        if override is not None:
            reply = override()
        else:
            reply = self._default(request, path, body if isinstance(body, dict) else {})
        return self._send(request, path, reply)

    @app.route(UPLOAD_PATH, methods=["POST"])
    def upload(self, request):
        content_type = request.getHeader(b"content-type")
        body = request.content.read() if request.content is not None else b""
        self.received.append(ReceivedRequest(UPLOAD_PATH, {}, None))
        try:
            form = parse_form(content_type.decode("latin-1") if content_type else None, body)
        except MultipartError as exc:
            request.setResponseCode(400)
            return str(exc).encode("utf-8")
        content = form.files.get("file")
        if content is None:
            request.setResponseCode(400)
            return b"no file part"
        filename = _query_value(request, b"filename") or "file"
        mimetype = _query_value(request, b"mimetype") or "application/octet-stream"
        self.uploads.append(UploadedFile(filename, mimetype, content))
        request.setResponseCode(201)
        request.setHeader(b"content-type", b"application/json")
        return _dumps(
            {
                "id": f"fake-file-{len(self.uploads)}",
                "name": filename,
                "size": len(content),
                "extension": filename.rsplit(".", 1)[-1] if "." in filename else "",
                "mime_type": mimetype,
                "preview_url": None,
            }
        )

    def _default(self, request, path: str, body: dict) -> _Reply:
        if path == "upload/file/request":
            host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
            query = urlencode({"filename": body.get("filename", ""), "mimetype": body.get("mimetype", "")})
            values = [{"url": f"http://{host}{UPLOAD_PATH}?{query}"}]
        else:
            values = default_values(path, body)
        if values is None:
            return _Reply(404, b"text/html; charset=utf-8", (NOT_FOUND_PAGE,))
        return self._encode(path, [_envelope(value) for value in values], None)

    def _encode(self, path: str, envelopes: list, framed: bool | None) -> _Reply:
        stream = path in STREAM_PATHS
        if framed is None:
            framed = stream or self.framed_singles
        if framed:
            # Dify's content types, though nobody reads them.
            content_type = b"text/event-stream" if stream else b"application/json"
            return _Reply(200, content_type, tuple(encode_frame(_dumps(e)) for e in envelopes))
        return _Reply(200, b"application/json", (_dumps(envelopes[0]),))

    def _send(self, request, path: str, reply: _Reply):
        request.setResponseCode(reply.status)
        request.setHeader(b"content-type", reply.content_type)
        delay = self._delays.get(path)
        if delay is None:
            return b"".join(reply.pieces)
        seconds, after = delay
        for piece in reply.pieces[:after]:
            request.write(piece)
        rest = b"".join(reply.pieces[after:])
        # Klein cancels this Deferred if the client goes away first.
        call = None
        d = Deferred(lambda _: call.cancel())
        call = self.reactor.callLater(seconds, d.callback, rest)
        return d


def _query_value(request, name: bytes) -> str | None:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


def base_url(port) -> str:
    """The ``DIFY_INNER_API_URL`` of a port :meth:`FakeDifyInnerAPI.listen` opened."""
    address = port.getHost()
    return f"http://{address.host}:{address.port}"
