"""
The dispatch route table (``http-api.md`` §2.2, §2.3) and its checks.

Each route names the access type and action sent to the plugin, the
validation of the body's ``data`` (the Go daemon's ``validate`` tags, with
gin-like messages) and the check applied to every chunk the plugin streams
back.  Everything here is pure: no request, no runtime, no reactor.

Chunk checks are ``check(chunk, raw) -> bytes | None``: the JSON to relay
(``raw`` itself whenever nothing needs changing, so the hot path does not
re-encode), or None for nothing to relay yet; they raise
:class:`ChunkError` for a chunk that the Go daemon would have failed to
unmarshal or validate.
"""

from __future__ import annotations

import base64
import binascii

import orjson
from attrs import frozen

UNMARSHAL_ERROR = "unmarshal_error"
BLOB_ERROR = "blob_chunk_error"

#: ``http-api.md`` §2.2, "Validated model_type vocabulary".
MODEL_TYPES = frozenset(
    {
        "llm",
        "text-embedding",
        "rerank",
        "speech2text",
        "moderation",
        "tts",
        "text2img",
        "multimodal-embedding",
        "multimodal-rerank",
    }
)

TOOL_MESSAGE_TYPES = frozenset(
    {
        "text",
        "file",
        "blob",
        "blob_chunk",
        "json",
        "link",
        "image",
        "image_link",
        "binary_link",
        "variable",
        "log",
        "retriever_resources",
    }
)

PROMPT_ROLES = frozenset({"system", "user", "assistant", "tool"})
PROMPT_CONTENT_TYPES = frozenset({"text", "image", "audio", "video", "document"})
MULTIMODAL_CONTENT_TYPES = frozenset({"text", "image"})
TOOL_CHOICE_MODES = frozenset({"auto", "none", "required", "tool"})
POLLING_STATUSES = frozenset({"running", "succeeded", "failed"})
LLM_USAGE_FIELDS = (
    "prompt_tokens",
    "prompt_unit_price",
    "prompt_price_unit",
    "prompt_price",
    "completion_tokens",
    "completion_unit_price",
    "completion_price_unit",
    "completion_price",
    "total_tokens",
    "total_price",
    "currency",
    "latency",
)

#: Agent strategy blob reassembly limits (§3.4).
MAX_BLOB_PIECE = 8192
MAX_BLOB_FILE = 15 * 1024 * 1024


class ChunkError(Exception):
    """
    A plugin chunk the daemon refuses; the stream ends with a
    ``PluginInvokeError`` whose inner error is ``error_type`` / ``message``.
    """

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def _go_name(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _failure(namespace: str, field: str, tag: str) -> str:
    """One line of a go-playground validator message."""
    return f"Key: '{namespace}.{field}' Error:Field validation for '{field}' failed on the '{tag}' tag"


# -- request body checks ------------------------------------------------------
#
# Each check looks at one key of a JSON object and appends the failures it
# finds.  A value of the wrong JSON type counts as absent, as it does in Go
# (json.Unmarshal leaves the field zero and gin ignores the decode error).


@frozen
class Text:
    """A string; ``required`` means non-empty."""

    name: str
    required: bool = False
    one_of: frozenset | None = None
    go: str | None = None

    def check(self, data: dict, namespace: str, failures: list) -> None:
        value = data.get(self.name)
        if not isinstance(value, str) or not value:
            if self.required:
                failures.append(_failure(namespace, self.go or _go_name(self.name), "required"))
            return
        if self.one_of is not None and value not in self.one_of:
            failures.append(_failure(namespace, self.go or _go_name(self.name), "oneof"))


@frozen
class ModelType:
    """``model_type``: required, in the vocabulary, and maybe equal to one type."""

    equal: str | None = None
    vocabulary: bool = True

    def check(self, data: dict, namespace: str, failures: list) -> None:
        value = data.get("model_type")
        if not isinstance(value, str) or not value:
            failures.append(_failure(namespace, "ModelType", "required"))
        elif self.vocabulary and value not in MODEL_TYPES:
            failures.append(_failure(namespace, "ModelType", "model_type"))
        elif self.equal is not None and value != self.equal:
            failures.append(_failure(namespace, "ModelType", "eq"))


@frozen
class Number:
    """An integer; ``required`` means non-zero."""

    name: str
    required: bool = False
    go: str | None = None

    def check(self, data: dict, namespace: str, failures: list) -> None:
        value = data.get(self.name)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or value == 0:
            if self.required:
                failures.append(_failure(namespace, self.go or _go_name(self.name), "required"))


@frozen
class Mapping:
    """
    A JSON object; ``required`` means present (Go's non-nil map, so ``{}``
    passes), ``non_empty`` adds ``min=1``.
    """

    name: str
    required: bool = False
    non_empty: bool = False
    go: str | None = None

    def check(self, data: dict, namespace: str, failures: list) -> None:
        value = data.get(self.name)
        if not isinstance(value, dict):
            if self.required:
                failures.append(_failure(namespace, self.go or _go_name(self.name), "required"))
            return
        if self.non_empty and not value:
            failures.append(_failure(namespace, self.go or _go_name(self.name), "min"))


@frozen
class Items:
    """
    A JSON array; ``required`` means present (``[]`` passes, as Go's non-nil
    slice does); ``each`` checks every element that is an object.
    """

    name: str
    required: bool = False
    each: tuple = ()
    go: str | None = None

    def check(self, data: dict, namespace: str, failures: list) -> None:
        value = data.get(self.name)
        go = self.go or _go_name(self.name)
        if not isinstance(value, list):
            if self.required:
                failures.append(_failure(namespace, go, "required"))
            return
        if self.each:
            for index, item in enumerate(value):
                _check_object(item, self.each, f"{namespace}.{go}[{index}]", failures)


def _check_object(value, checks: tuple, namespace: str, failures: list) -> None:
    """Apply ``checks`` to an object's fields under ``namespace``; anything not an object counts as ``{}``."""
    if not isinstance(value, dict):
        value = {}
    for check in checks:
        check.check(value, namespace, failures)


@frozen
class Struct:
    """
    A nested object whose own fields are checked; absent counts as ``{}``
    (Go's ``required`` on a struct value never fails by itself).
    """

    name: str
    fields: tuple
    go: str | None = None

    def check(self, data: dict, namespace: str, failures: list) -> None:
        _check_object(data.get(self.name), self.fields, f"{namespace}.{self.go or _go_name(self.name)}", failures)


@frozen
class ToolChoice:
    """``tool_choice``: optional; its mode is required and ``tool`` needs a name."""

    def check(self, data: dict, namespace: str, failures: list) -> None:
        value = data.get("tool_choice")
        if not isinstance(value, dict):
            return
        mode = value.get("mode")
        if not isinstance(mode, str) or not mode:
            failures.append(_failure(f"{namespace}.ToolChoice", "Mode", "required"))
        elif mode not in TOOL_CHOICE_MODES:
            failures.append(_failure(f"{namespace}.ToolChoice", "Mode", "oneof"))
        elif mode == "tool":
            name = value.get("name")
            if not isinstance(name, str) or not name.strip():
                failures.append(_failure(f"{namespace}.ToolChoice", "name", "required_for_tool"))


_MULTIMODAL_CONTENT = (
    Text("content", required=True),
    Text("content_type", required=True, one_of=MULTIMODAL_CONTENT_TYPES),
)
_MODEL = (Text("provider", required=True), Text("model", required=True))
_LLM = (
    *_MODEL,
    ModelType("llm"),
    Items("tools", each=(Text("name", required=True),)),
    ToolChoice(),
)


def validate_data(route: "Route", data: dict) -> list[str]:
    """Every validation failure of a route's ``data``, as message lines."""
    failures: list[str] = []
    namespace = f"InvokePluginRequest[requests.{route.struct}].Data"
    for check in route.fields:
        check.check(data, namespace, failures)
    return failures


# -- chunk checks ------------------------------------------------------------------


def _unmarshal(message: str) -> ChunkError:
    return ChunkError(UNMARSHAL_ERROR, f"unmarshal json failed: {message}")


def _invalid(struct: str, field: str, tag: str) -> ChunkError:
    return _unmarshal(_failure(struct, field, tag))


def object_chunk(chunk, raw: bytes) -> bytes:
    """Any JSON object, relayed as sent."""
    if type(chunk) is not dict:
        raise _unmarshal("chunk is not a JSON object")
    return raw


def tool_chunk(chunk, raw: bytes) -> bytes:
    """A tool message: ``type`` in the allowed set; message and meta objects or null."""
    if type(chunk) is not dict:
        raise _unmarshal("chunk is not a JSON object")
    kind = chunk.get("type")
    if kind not in TOOL_MESSAGE_TYPES:
        tag = "required" if not kind else "is_valid_tool_response_chunk_type"
        raise _invalid("ToolResponseChunk", "Type", tag)
    message = chunk.get("message")
    if message is not None and type(message) is not dict:
        raise _unmarshal("message is not a JSON object")
    meta = chunk.get("meta")
    if meta is not None and type(meta) is not dict:
        raise _unmarshal("meta is not a JSON object")
    return raw


_PROMPT_MESSAGES_SUFFIX = b',"prompt_messages":[]}'


def llm_chunk(chunk, raw: bytes) -> bytes:
    """
    An LLMResultChunk: ``model``, ``delta.index`` and a non-null
    ``delta.message.content`` are required; ``prompt_messages: []`` is
    added (or replaces whatever the plugin sent), as Go's encoder does.
    """
    if type(chunk) is not dict:
        raise _unmarshal("chunk is not a JSON object")
    model = chunk.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("LLMResultChunk", "Model", "required")
    delta = chunk.get("delta")
    if type(delta) is not dict:
        raise _invalid("LLMResultChunk.Delta", "Index", "required")
    index = delta.get("index")
    if type(index) is not int:
        raise _invalid("LLMResultChunk.Delta", "Index", "required")
    message = delta.get("message")
    if type(message) is not dict:
        raise _unmarshal("role field is required")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise _unmarshal("role field is required")
    if role not in PROMPT_ROLES:
        raise _invalid("LLMResultChunk.Delta.Message", "Role", "prompt_message_role")
    content = message.get("content")
    if type(content) is list:
        for item in content:
            if type(item) is not dict or item.get("type") not in PROMPT_CONTENT_TYPES:
                raise _invalid("LLMResultChunk.Delta.Message", "Content", "prompt_message_content")
    elif type(content) is not str:
        if content is None:
            raise _unmarshal("content field is required")
        raise _unmarshal("content must be a string or an array of prompt message content")
    usage = delta.get("usage")
    if usage is not None:
        if type(usage) is not dict:
            raise _unmarshal("usage is not a JSON object")
        for name in LLM_USAGE_FIELDS:
            if usage.get(name) is None:
                raise _invalid("LLMResultChunk.Delta.Usage", _go_name(name), "required")
    prompt_messages = chunk.get("prompt_messages", None)
    if prompt_messages is None and "prompt_messages" not in chunk and raw[-1:] == b"}":
        # the common case: append the key without re-encoding the chunk
        return raw[:-1] + _PROMPT_MESSAGES_SUFFIX
    if prompt_messages == []:
        return raw
    out = dict(chunk)
    out["prompt_messages"] = []
    return orjson.dumps(out)


def check_polling_result(chunk) -> None:
    """
    Raise :class:`ChunkError` unless ``chunk`` is a valid ModelPollingResult
    (§2.3: running needs plugin_state, succeeded a result, failed an error).
    """
    if type(chunk) is not dict:
        raise _unmarshal("chunk is not a JSON object")
    status = chunk.get("status")
    if not isinstance(status, str) or not status:
        raise _invalid("ModelPollingResult", "Status", "required")
    if status not in POLLING_STATUSES:
        raise _invalid("ModelPollingResult", "Status", "oneof")
    if status == "running":
        state = chunk.get("plugin_state")
        if type(state) is not dict or not state:
            raise _invalid("ModelPollingResult", "PluginState", "required_for_running")
    elif status == "succeeded":
        if chunk.get("result") is None:
            raise _invalid("ModelPollingResult", "Result", "required_for_succeeded")
    else:
        error = chunk.get("error")
        if not isinstance(error, str) or not error.strip():
            raise _invalid("ModelPollingResult", "Error", "required_for_failed")
    for name in ("next_check_after_seconds", "expires_after_seconds", "max_attempts"):
        value = chunk.get(name)
        if value is not None and (type(value) is not int):
            raise _unmarshal(f"{name} is not an integer")


def polling_chunk(chunk, raw: bytes) -> bytes:
    """A ModelPollingResult, relayed as sent."""
    check_polling_result(chunk)
    return raw


class BlobAssembler:
    """
    The agent strategy chunk check (§3.4): tool messages, except that
    ``blob_chunk`` pieces are gathered per id and relayed as one ``blob``
    message when the piece marked ``end`` arrives.  One per request.
    """

    __slots__ = ("_files",)

    def __init__(self) -> None:
        self._files: dict[str, bytearray] = {}

    def __call__(self, chunk, raw: bytes) -> bytes | None:
        raw = tool_chunk(chunk, raw)
        if chunk["type"] != "blob_chunk":
            return raw
        message = chunk.get("message") or {}
        blob_id = message.get("id")
        blob = message.get("blob")
        end = message.get("end")
        total = message.get("total_length")
        # malformed pieces are skipped, as the Go daemon skips them
        if (
            not isinstance(blob_id, str)
            or not isinstance(blob, str)
            or type(end) is not bool
            or type(total) not in (int, float)
        ):
            return None
        files = self._files
        if end:
            data = files.pop(blob_id, b"")
            return orjson.dumps(
                {
                    "type": "blob",
                    "message": {"blob": base64.b64encode(data).decode("ascii")},
                    "meta": chunk.get("meta"),
                }
            )
        try:
            piece = base64.b64decode(blob, validate=True)
        except (binascii.Error, ValueError) as exc:
            files.pop(blob_id, None)
            raise _unmarshal(f"illegal base64 data: {exc}")
        if len(piece) > MAX_BLOB_PIECE:
            files.pop(blob_id, None)
            raise ChunkError(BLOB_ERROR, "single file chunk is too large")
        data = files.get(blob_id)
        if data is None:
            data = files[blob_id] = bytearray()
        if len(data) + len(piece) > MAX_BLOB_FILE:
            del files[blob_id]
            raise ChunkError(BLOB_ERROR, "file is too large")
        data += piece
        return None


def blob_assembler() -> BlobAssembler:
    """A fresh agent strategy chunk check (it keeps per-request state)."""
    return BlobAssembler()


# -- the table ----------------------------------------------------------------------


@frozen
class Route:
    """
    One dispatch route.

    :ivar path: below ``/plugin/<tenant>/dispatch/``.
    :ivar access_type: the ``type`` sent to the plugin.
    :ivar action: the ``action`` sent to the plugin.
    :ivar struct: the Go request struct's name (for validation messages).
    :ivar fields: the checks of ``data``.
    :ivar chunk_check: ``check(chunk, raw) -> bytes | None``, shared by
        every request of the route, or None when ``chunk_check_factory``
        makes one per request.
    :ivar chunk_check_factory: makes a per-request chunk check.
    :ivar polling: answer one plain JSON envelope (last chunk wins) instead
        of an SSE stream.
    """

    path: str
    access_type: str
    action: str
    struct: str
    fields: tuple
    chunk_check: object = object_chunk
    chunk_check_factory: object = None
    polling: bool = False

    def new_chunk_check(self):
        """The chunk check for one request."""
        if self.chunk_check_factory is not None:
            return self.chunk_check_factory()
        return self.chunk_check


def _datasource(*fields) -> tuple:
    return (Text("provider", required=True), Text("datasource", required=True), *fields)


ROUTES: tuple[Route, ...] = (
    # tool
    Route("tool/invoke", "tool", "invoke_tool", "RequestInvokeTool",
          (Text("provider", required=True), Text("tool", required=True)), tool_chunk),
    Route("tool/validate_credentials", "tool", "validate_tool_credentials", "RequestValidateToolCredentials",
          (Text("provider", required=True),)),
    Route("tool/get_runtime_parameters", "tool", "get_tool_runtime_parameters", "RequestGetToolRuntimeParameters",
          (Text("provider", required=True), Text("tool", required=True))),
    # model
    Route("llm/invoke", "model", "invoke_llm", "RequestInvokeLLM", _LLM, llm_chunk),
    Route("llm/num_tokens", "model", "get_llm_num_tokens", "RequestGetLLMNumTokens",
          (*_MODEL, ModelType("llm"), Items("tools", each=(Text("name", required=True),)))),
    Route("text_embedding/invoke", "model", "invoke_text_embedding", "RequestInvokeTextEmbedding",
          (*_MODEL, ModelType("text-embedding"), Items("texts", required=True),
           Text("input_type", required=True))),
    Route("multimodal_embedding/invoke", "model", "invoke_multimodal_embedding", "RequestInvokeMultimodalEmbedding",
          (*_MODEL, ModelType(vocabulary=False), Items("documents", required=True, each=_MULTIMODAL_CONTENT),
           Text("input_type", required=True, one_of=frozenset({"document", "query"})))),
    Route("text_embedding/num_tokens", "model", "get_text_embedding_num_tokens", "RequestGetTextEmbeddingNumTokens",
          (*_MODEL, ModelType("text-embedding"), Items("texts", required=True))),
    Route("rerank/invoke", "model", "invoke_rerank", "RequestInvokeRerank",
          (*_MODEL, ModelType("rerank"), Text("query", required=True), Items("docs", required=True))),
    Route("multimodal_rerank/invoke", "model", "invoke_multimodal_rerank", "RequestInvokeMultimodalRerank",
          (*_MODEL, ModelType(vocabulary=False), Struct("query", _MULTIMODAL_CONTENT),
           Items("docs", required=True, each=_MULTIMODAL_CONTENT))),
    Route("tts/invoke", "model", "invoke_tts", "RequestInvokeTTS",
          (*_MODEL, ModelType("tts"), Text("content_text", required=True), Text("voice", required=True),
           Text("tenant_id", required=True, go="TenantID"))),
    Route("tts/model/voices", "model", "get_tts_model_voices", "RequestGetTTSModelVoices",
          (*_MODEL, ModelType("tts"))),
    Route("speech2text/invoke", "model", "invoke_speech2text", "RequestInvokeSpeech2Text",
          (*_MODEL, ModelType("speech2text"), Text("file", required=True))),
    Route("moderation/invoke", "model", "invoke_moderation", "RequestInvokeModeration",
          (*_MODEL, ModelType("moderation"), Text("text", required=True))),
    Route("model/validate_provider_credentials", "model", "validate_provider_credentials",
          "RequestValidateProviderCredentials", (Text("provider", required=True),)),
    Route("model/validate_model_credentials", "model", "validate_model_credentials",
          "RequestValidateModelCredentials", (*_MODEL, ModelType())),
    Route("model/schema", "model", "get_ai_model_schemas", "RequestGetAIModelSchema", (*_MODEL, ModelType())),
    Route("model/polling/start", "model", "start_polling", "RequestStartPolling", _LLM, polling_chunk,
          polling=True),
    Route("model/polling/check", "model", "check_polling", "RequestCheckPolling",
          (*_MODEL, ModelType("llm"), Mapping("plugin_state", required=True, non_empty=True)), polling_chunk,
          polling=True),
    # agent strategy
    Route("agent_strategy/invoke", "agent_strategy", "invoke_agent_strategy", "RequestInvokeAgentStrategy",
          (Text("agent_strategy_provider", required=True), Text("agent_strategy", required=True)),
          None, blob_assembler),
    # oauth
    Route("oauth/get_authorization_url", "oauth", "get_authorization_url", "RequestOAuthGetAuthorizationURL",
          (Text("provider", required=True), Text("redirect_uri", required=True, go="RedirectURI"))),
    Route("oauth/get_credentials", "oauth", "get_credentials", "RequestOAuthGetCredentials",
          (Text("provider", required=True), Text("redirect_uri", required=True, go="RedirectURI"),
           Text("raw_http_request", required=True, go="RawHttpRequest"))),
    Route("oauth/refresh_credentials", "oauth", "refresh_credentials", "RequestOAuthRefreshCredentials",
          (Text("provider", required=True), Text("redirect_uri", required=True, go="RedirectURI"),
           Mapping("credentials", required=True))),
    # dynamic select
    Route("dynamic_select/fetch_parameter_options", "dynamic_parameter", "fetch_parameter_options",
          "RequestDynamicParameterSelect",
          (Mapping("credentials", required=True), Text("provider", required=True),
           Text("provider_action", required=True), Text("parameter", required=True))),
    # datasource
    Route("datasource/validate_credentials", "datasource", "validate_datasource_credentials",
          "RequestValidateDatasourceCredentials", (Text("provider", required=True),)),
    Route("datasource/get_website_crawl", "datasource", "invoke_website_datasource_get_crawl",
          "RequestDatasourceGetWebsiteCrawl", _datasource(Mapping("datasource_parameters", required=True))),
    Route("datasource/get_online_document_pages", "datasource", "invoke_online_document_datasource_get_pages",
          "RequestDatasourceGetOnlineDocumentPages", _datasource(Mapping("datasource_parameters", required=True))),
    Route("datasource/get_online_document_page_content", "datasource",
          "invoke_online_document_datasource_get_page_content", "RequestInvokeOnlineDocumentDatasourceGetContent",
          _datasource(Mapping("page", required=True)), tool_chunk),
    Route("datasource/online_drive_browse_files", "datasource", "invoke_online_drive_browse_files",
          "DatasourceOnlineDriveBrowseFilesRequest",
          _datasource(Struct("request", (Number("max_keys", required=True),)))),
    Route("datasource/online_drive_download_file", "datasource", "invoke_online_drive_download_file",
          "DatasourceOnlineDriveDownloadFileRequest",
          _datasource(Struct("request", (Text("id", required=True, go="ID"),))), tool_chunk),
    # trigger
    Route("trigger/invoke_event", "trigger", "invoke_trigger_event", "TriggerInvokeEventRequest",
          (Text("provider", required=True), Text("event", required=True),
           Text("raw_http_request", required=True, go="RawHTTPRequest"), Mapping("subscription", required=True))),
    Route("trigger/validate_credentials", "trigger", "validate_trigger_credentials",
          "TriggerValidateProviderCredentialsRequest", (Text("provider", required=True),)),
    Route("trigger/dispatch_event", "trigger", "dispatch_trigger_event", "TriggerDispatchEventRequest",
          (Text("provider", required=True), Mapping("subscription", required=True),
           Text("raw_http_request", required=True, go="RawHTTPRequest"))),
    Route("trigger/subscribe", "trigger", "subscribe_trigger", "TriggerSubscribeRequest",
          (Text("provider", required=True), Text("endpoint", required=True))),
    Route("trigger/unsubscribe", "trigger", "unsubscribe_trigger", "TriggerUnsubscribeRequest",
          (Text("provider", required=True), Mapping("subscription", required=True))),
    Route("trigger/refresh", "trigger", "refresh_trigger", "TriggerRefreshRequest",
          (Text("provider", required=True), Mapping("subscription", required=True))),
)


def route_table(routes=ROUTES) -> dict[bytes, Route]:
    """Routes by their path as bytes, the form ``request.postpath`` gives."""
    return {route.path.encode("ascii"): route for route in routes}
