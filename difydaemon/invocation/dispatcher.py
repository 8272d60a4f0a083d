"""
Backwards invocations: a plugin, inside one of its sessions, asks Dify to
do something (``runtimes.md`` §4).

:class:`BackwardsInvocations` is the one place that maps an invoke
``type`` to the manifest permission it needs, the inner API path that
serves it and how the answer comes back (a stream of items or one
struct).  The session listeners of every runtime hand it the plugin's
``invoke`` messages; it answers on the same runtime, always ending with
``end``.
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from difydaemon import errors
from difydaemon.invocation.inner_api import InnerAPIError
from difydaemon.invocation.messages import backwards_error, backwards_response
from difydaemon.invocation.session import InvocationSession, parse_invoke
from difydaemon.invocation.storage import StorageError

STREAM = "stream"
SINGLE = "struct"

MODEL_SESSION_REFUSAL = "you can not invoke dify from model"
BACKWARDS_UNAVAILABLE_MESSAGE = "backwards invocation is not available"
_MODEL_CONFIG = ("provider", "model", "model_type")

log = Logger()


@frozen
class InvokeType:
    """
    How one invoke ``type`` is served.

    :ivar permission: the ``resource.permission`` path that must be true
        (``("model", "llm")`` means ``model.enabled`` and ``model.llm``);
        empty when always allowed.
    :ivar path: the inner API path under ``/inner/api/``; None for types
        the daemon serves itself (storage).
    :ivar mode: :data:`STREAM` or :data:`SINGLE`.
    :ivar fields: the request fields forwarded to Dify (the Go daemon
        decodes into a typed request, which drops every other field).
    """

    permission: tuple[str, ...]
    path: str | None
    mode: str
    fields: tuple[str, ...]


INVOKE_TYPES: dict[str, InvokeType] = {
    "tool": InvokeType(
        ("tool",), "invoke/tool", STREAM, ("tool_type", "provider", "tool", "tool_parameters", "credential_id")
    ),
    "llm": InvokeType(
        ("model", "llm"),
        "invoke/llm",
        STREAM,
        _MODEL_CONFIG + ("mode", "completion_params", "prompt_messages", "tools", "stop", "stream"),
    ),
    "llm_structured_output": InvokeType(
        ("model", "llm"),
        "invoke/llm/structured-output",
        STREAM,
        _MODEL_CONFIG
        + ("mode", "completion_params", "prompt_messages", "tools", "stop", "stream", "structured_output_schema"),
    ),
    "text_embedding": InvokeType(
        ("model", "text_embedding"), "invoke/text-embedding", SINGLE, _MODEL_CONFIG + ("texts", "input_type")
    ),
    "multimodal_embedding": InvokeType(
        ("model", "text_embedding"),
        "invoke/multimodal-embedding",
        SINGLE,
        _MODEL_CONFIG + ("documents", "input_type"),
    ),
    "rerank": InvokeType(
        ("model", "rerank"), "invoke/rerank", SINGLE, _MODEL_CONFIG + ("query", "docs", "score_threshold", "top_n")
    ),
    "multimodal_rerank": InvokeType(
        ("model", "rerank"),
        "invoke/multimodal-rerank",
        SINGLE,
        _MODEL_CONFIG + ("query", "docs", "score_threshold", "top_n"),
    ),
    "tts": InvokeType(("model", "tts"), "invoke/tts", STREAM, _MODEL_CONFIG + ("content_text", "voice")),
    "speech2text": InvokeType(("model", "speech2text"), "invoke/speech2text", SINGLE, _MODEL_CONFIG + ("file",)),
    "moderation": InvokeType(("model", "moderation"), "invoke/moderation", SINGLE, _MODEL_CONFIG + ("text",)),
    "node_parameter_extractor": InvokeType(
        ("node",), "invoke/parameter-extractor", SINGLE, ("parameters", "model", "query", "instruction")
    ),
    "node_question_classifier": InvokeType(
        ("node",), "invoke/question-classifier", SINGLE, ("classes", "model", "query", "instruction")
    ),
    "app": InvokeType(
        ("app",),
        "invoke/app",
        STREAM,
        ("app_id", "inputs", "query", "response_mode", "conversation_id", "files", "user"),
    ),
    "fetch_app": InvokeType(("app",), "fetch/app/info", SINGLE, ("app_id",)),
    "system_summary": InvokeType(("model", "llm"), "invoke/summary", SINGLE, ("text", "instruction")),
    "upload_file": InvokeType((), "upload/file/request", SINGLE, ("filename", "mimetype")),
    "storage": InvokeType(("storage",), None, SINGLE, ("opt", "key", "value")),
}


def permission_refusal(declaration: dict, permission: tuple[str, ...]) -> str | None:
    """
    Why the manifest does not allow ``permission``, or None when it does.

    ``("model", "llm")`` needs both ``model.enabled`` and ``model.llm``.
    """
    if not permission:
        return None
    resource = declaration.get("resource") if isinstance(declaration, dict) else None
    granted = resource.get("permission") if isinstance(resource, dict) else None
    group = granted.get(permission[0]) if isinstance(granted, dict) else None
    allowed = isinstance(group, dict) and group.get("enabled") is True
    if allowed and len(permission) > 1:
        allowed = group.get(permission[1]) is True
    if allowed:
        return None
    return f"permission denied, you need to enable {permission[-1]} access in plugin manifest"


def inner_api_request(session: InvocationSession, invoke_type: str, spec: InvokeType, request: dict) -> dict:
    """
    The body sent to Dify: the session's tenant, user and the invoke type
    (they win over whatever the plugin put there), then the fields the
    typed request knows.
    """
    body = {"tenant_id": session.tenant_id, "user_id": session.user_id, "type": invoke_type}
    for name in spec.fields:
        if name in request:
            body[name] = request[name]
    return body


def _storage_quota(declaration: dict):
    resource = declaration.get("resource") if isinstance(declaration, dict) else None
    granted = resource.get("permission") if isinstance(resource, dict) else None
    storage = granted.get("storage") if isinstance(granted, dict) else None
    return storage.get("size") if isinstance(storage, dict) else None


class BackwardsInvocations:
    """
    Serves the ``invoke`` messages of plugin sessions.

    :param inner_api: a :class:`~difydaemon.invocation.inner_api.DifyInnerAPI`.
    :param storage: a :class:`~difydaemon.invocation.storage.PluginStorage`.
    """

    def __init__(self, inner_api, storage) -> None:
        self._inner_api = inner_api
        self._storage = storage
        #: invocations running now, for tests and shutdown
        self.running: set[Deferred] = set()

    def handle(self, session: InvocationSession, data) -> None:
        """
        Answer one ``invoke`` message on ``session.runtime``: a refusal at
        once, anything else in the background.

        :raises MalformedInvokeError: when ``data`` lacks its type, id or
            request (the caller closes the session's stream instead).
        """
        invoke_type, backwards_id, request = parse_invoke(data)
        if session.access_type == "model":
            self._refuse(session, backwards_id, MODEL_SESSION_REFUSAL)
            return
        spec = INVOKE_TYPES.get(invoke_type)
        if spec is None:
            self._refuse(session, backwards_id, f"unsupported invoke type: {invoke_type}")
            return
        refusal = permission_refusal(session.declaration, spec.permission)
        if refusal is not None:
            self._refuse(session, backwards_id, refusal)
            return
        d = Deferred.fromCoroutine(self._run(session, invoke_type, backwards_id, spec, request))
        self.running.add(d)

        def done(result):
            self.running.discard(d)
            return result

        d.addBoth(done)
        d.addErrback(
            lambda failure: log.failure(
                "backwards invocation {invoke_type} of session {session_id} failed",
                failure,
                invoke_type=invoke_type,
                session_id=session.session_id,
            )
        )

    def _refuse(self, session: InvocationSession, backwards_id: str, message: str) -> None:
        for answer in backwards_error(session.session_request, backwards_id, message):
            if not _send(session, answer):
                return

    async def _run(self, session, invoke_type, backwards_id, spec: InvokeType, request: dict) -> None:
        session_request = session.session_request
        try:
            if spec.path is None:
                result = await self._storage.run(
                    session.tenant_id, session.plugin_id, _storage_quota(session.declaration), request
                )
                if not _send(session, backwards_response(session_request, backwards_id, "response", SINGLE, result)):
                    return
            elif spec.mode == STREAM:
                body = inner_api_request(session, invoke_type, spec, request)

                def on_item(item) -> None:
                    message = backwards_response(session_request, backwards_id, "response", STREAM, item)
                    if not _send(session, message):
                        raise _SessionGone()

                await self._inner_api.stream(spec.path, body, on_item, session_request.get("traceparent"))
            else:
                body = inner_api_request(session, invoke_type, spec, request)
                result = await self._inner_api.single(spec.path, body, session_request.get("traceparent"))
                if not _send(session, backwards_response(session_request, backwards_id, "response", SINGLE, result)):
                    return
        except _SessionGone:
            return
        except (InnerAPIError, StorageError) as exc:
            self._refuse(session, backwards_id, exc.message)
            return
        except errors.DaemonError as exc:
            self._refuse(session, backwards_id, exc.message)
            return
        _send(session, backwards_response(session_request, backwards_id, "end"))


def serve_invoke(backwards, session: InvocationSession, data) -> None:
    """
    What every session listener does with an ``invoke`` message: hand it to
    ``backwards`` (a :class:`BackwardsInvocations`), or, when there is none,
    refuse it at once with ``error`` + ``end`` so the plugin never waits
    for its own timeout.

    :raises MalformedInvokeError: when ``data`` lacks its type, id or
        request (the listener closes the session's stream instead).
    """
    if backwards is not None:
        backwards.handle(session, data)
        return
    _type, backwards_id, _request = parse_invoke(data)
    for answer in backwards_error(session.session_request, backwards_id, BACKWARDS_UNAVAILABLE_MESSAGE):
        if not _send(session, answer):
            return


class _SessionGone(Exception):
    """The session closed while Dify was still answering."""


def _send(session: InvocationSession, message: dict) -> bool:
    """Write one answer; False when the session is no longer there to take it."""
    try:
        session.runtime.send(session.session_id, message)
    except errors.DaemonError as exc:
        log.info(
            "backwards answer for session {session_id} dropped: {reason}",
            session_id=session.session_id,
            reason=exc.message,
        )
        return False
    return True
