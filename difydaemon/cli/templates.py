"""
The file templates of ``dify plugin init``, for the current SDK
(``dify_plugin`` 0.10.x).

Templates are :class:`string.Template` texts (``$name`` placeholders), so
the YAML and Python braces in them need no escaping.  The variables are:
``author``, ``name``, ``label``, ``description``, ``class_prefix`` (the name
in CamelCase) and, for model plugins, ``model_type`` (``text-embedding``),
``model_key`` (``text_embedding``) and ``model_name``.
"""

from __future__ import annotations

REQUIREMENTS = "dify_plugin>=0.10.0,<0.11.0\n"

MAIN_PY = """\
from dify_plugin import DifyPluginEnv, Plugin

plugin = Plugin(DifyPluginEnv(MAX_REQUEST_TIMEOUT=120))

if __name__ == "__main__":
    plugin.run()
"""

ICON_SVG = """\
<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">
  <rect x="4" y="4" width="56" height="56" rx="12" fill="#1c64f2"/>
  <path d="M20 44V20h12a12 12 0 0 1 0 24z" fill="#ffffff"/>
</svg>
"""

ICON_DARK_SVG = """\
<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">
  <rect x="4" y="4" width="56" height="56" rx="12" fill="#e5edff"/>
  <path d="M20 44V20h12a12 12 0 0 1 0 24z" fill="#1c64f2"/>
</svg>
"""

README_MD = """\
# $label

**Author:** $author
**Version:** 0.0.1
**Type:** $category

## Description

$description

## Development

Copy `.env.example` to `.env`, fill in the debugging key from your Dify
instance, install the requirements and run `python -m main`.  Build a
package with `dify plugin package .`.
"""

PRIVACY_MD = """\
# Privacy

$label does not collect, store or share any personal data.  Describe here
what data your plugin sends where, if that ever changes.
"""

DIFYIGNORE = """\
# Files that never go into the package
.env
.venv/
venv/
__pycache__/
*.py[cod]
.pytest_cache/
.mypy_cache/
.ruff_cache/
.idea/
.vscode/
.DS_Store
*.difypkg
*.signed.difypkg
.git/
"""

GITIGNORE = """\
.env
.venv/
venv/
__pycache__/
*.py[cod]
.pytest_cache/
.mypy_cache/
.ruff_cache/
.idea/
.vscode/
.DS_Store
*.difypkg
"""

ENV_EXAMPLE = """\
INSTALL_METHOD=remote
REMOTE_INSTALL_URL=localhost:5003
REMOTE_INSTALL_KEY=********-****-****-****-************
"""

# -- tool ---------------------------------------------------------------------

TOOL_PROVIDER_YAML = """\
identity:
  author: $author
  name: $name
  label:
    en_US: $label
  description:
    en_US: $description
  icon: icon.svg
  icon_dark: icon-dark.svg
tools:
  - tools/$name.yaml
extra:
  python:
    source: provider/$name.py
"""

TOOL_PROVIDER_PY = '''\
from typing import Any

from dify_plugin import ToolProvider
from dify_plugin.errors.tool import ToolProviderCredentialValidationError


class ${class_prefix}Provider(ToolProvider):
    def _validate_credentials(self, credentials: dict[str, Any]) -> None:
        try:
            # Check the credentials against the service here; this tool needs none.
            pass
        except Exception as e:
            raise ToolProviderCredentialValidationError(str(e)) from e
'''

TOOL_YAML = """\
identity:
  name: $name
  author: $author
  label:
    en_US: $label
description:
  human:
    en_US: Returns the text it is given
  llm: Returns the text it is given, as text and as JSON
parameters:
  - name: query
    type: string
    required: true
    label:
      en_US: Query
    human_description:
      en_US: The text to return
    llm_description: The text to return
    form: llm
extra:
  python:
    source: tools/$name.py
"""

TOOL_PY = '''\
from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


class ${class_prefix}Tool(Tool):
    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        query = str(tool_parameters.get("query", ""))
        yield self.create_text_message(query)
        yield self.create_json_message({"query": query, "length": len(query)})
'''

# -- extension (endpoints) ----------------------------------------------------

ENDPOINT_GROUP_YAML = """\
settings: []
endpoints:
  - endpoints/$name.yaml
"""

ENDPOINT_YAML = """\
path: "/$name"
method: "GET"
extra:
  python:
    source: endpoints/$name.py
"""

ENDPOINT_PY = '''\
import json
from collections.abc import Mapping

from werkzeug import Request, Response

from dify_plugin import Endpoint


class ${class_prefix}Endpoint(Endpoint):
    def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
        body = {"plugin": "$name", "path": r.path, "args": dict(r.args)}
        return Response(json.dumps(body), status=200, content_type="application/json")
'''

# -- models -------------------------------------------------------------------

MODEL_PROVIDER_YAML = """\
provider: $name
label:
  en_US: $label
description:
  en_US: $description
icon_small:
  en_US: icon.svg
icon_large:
  en_US: icon.svg
supported_model_types:
  - $model_type
configurate_methods:
  - predefined-model
provider_credential_schema:
  credential_form_schemas:
    - variable: api_key
      label:
        en_US: API Key
      type: secret-input
      required: false
      placeholder:
        en_US: Enter your API key
models:
  $model_key:
    predefined:
      - "models/$model_key/*.yaml"
extra:
  python:
    provider_source: provider/$name.py
    model_sources:
      - models/$model_key/$model_key.py
"""

MODEL_PROVIDER_PY = '''\
import logging

from dify_plugin import ModelProvider
from dify_plugin.errors.model import CredentialsValidateFailedError

logger = logging.getLogger(__name__)


class ${class_prefix}ModelProvider(ModelProvider):
    def validate_provider_credentials(self, credentials: dict) -> None:
        try:
            # Call the service with the credentials here.
            pass
        except CredentialsValidateFailedError:
            raise
        except Exception as e:
            logger.exception("credentials validation failed")
            raise CredentialsValidateFailedError(str(e)) from e
'''

_ERROR_MAPPING = '''\
    @property
    def _invoke_error_mapping(self) -> dict[type[InvokeError], list[type[Exception]]]:
        return {
            InvokeConnectionError: [ConnectionError],
            InvokeServerUnavailableError: [],
            InvokeRateLimitError: [],
            InvokeAuthorizationError: [PermissionError],
            InvokeBadRequestError: [ValueError],
        }
'''

_ERROR_IMPORTS = '''\
from dify_plugin.errors.model import (
    InvokeAuthorizationError,
    InvokeBadRequestError,
    InvokeConnectionError,
    InvokeError,
    InvokeRateLimitError,
    InvokeServerUnavailableError,
)
'''

MODEL_YAML = {
    "llm": """\
model: $model_name
label:
  en_US: $model_name
model_type: llm
features:
  - agent-thought
model_properties:
  mode: chat
  context_size: 4096
parameter_rules:
  - name: temperature
    use_template: temperature
  - name: max_tokens
    use_template: max_tokens
    default: 512
    min: 1
    max: 4096
pricing:
  input: "0"
  output: "0"
  unit: "0.000001"
  currency: USD
""",
    "text-embedding": """\
model: $model_name
label:
  en_US: $model_name
model_type: text-embedding
model_properties:
  context_size: 512
  max_chunks: 16
""",
    "rerank": """\
model: $model_name
label:
  en_US: $model_name
model_type: rerank
model_properties:
  context_size: 512
""",
    "tts": """\
model: $model_name
label:
  en_US: $model_name
model_type: tts
model_properties:
  default_voice: default
  voices:
    - mode: default
      name: Default
      language: ["en-US"]
  word_limit: 3500
  audio_type: mp3
  max_workers: 5
""",
    "speech2text": """\
model: $model_name
label:
  en_US: $model_name
model_type: speech2text
model_properties:
  file_upload_limit: 25
  supported_file_extensions: mp3,mp4,mpeg,mpga,m4a,wav,webm
""",
    "moderation": """\
model: $model_name
label:
  en_US: $model_name
model_type: moderation
model_properties:
  max_chunks: 32
  max_characters_per_chunk: 2000
""",
}

MODEL_PY = {
    "llm": '''\
from collections.abc import Generator

from dify_plugin import LargeLanguageModel
from dify_plugin.entities.model.llm import LLMResult, LLMResultChunk, LLMResultChunkDelta, LLMUsage
from dify_plugin.entities.model.message import AssistantPromptMessage, PromptMessage, PromptMessageTool
'''
    + _ERROR_IMPORTS
    + '''

class ${class_prefix}LargeLanguageModel(LargeLanguageModel):
    """A model that answers with the last message it was sent; replace it with calls to your service."""

    def _invoke(
        self,
        model: str,
        credentials: dict,
        prompt_messages: list[PromptMessage],
        model_parameters: dict,
        tools: list[PromptMessageTool] | None = None,
        stop: list[str] | None = None,
        stream: bool = True,
        user: str | None = None,
    ) -> LLMResult | Generator[LLMResultChunk, None, None]:
        text = prompt_messages[-1].get_text_content() if prompt_messages else ""
        message = AssistantPromptMessage(content=text)
        if not stream:
            return LLMResult(model=model, prompt_messages=[], message=message, usage=LLMUsage.empty_usage())
        return self._stream(model, message)

    def _stream(self, model: str, message: AssistantPromptMessage) -> Generator[LLMResultChunk, None, None]:
        yield LLMResultChunk(
            model=model,
            prompt_messages=[],
            delta=LLMResultChunkDelta(index=0, message=message, usage=LLMUsage.empty_usage(), finish_reason="stop"),
        )

    def get_num_tokens(
        self,
        model: str,
        credentials: dict,
        prompt_messages: list[PromptMessage],
        tools: list[PromptMessageTool] | None = None,
    ) -> int:
        return sum(len(message.get_text_content().split()) for message in prompt_messages)

    def validate_credentials(self, model: str, credentials: dict) -> None:
        pass

'''
    + _ERROR_MAPPING,
    "text-embedding": '''\
import time
from decimal import Decimal

from dify_plugin import TextEmbeddingModel
from dify_plugin.entities.model import EmbeddingInputType
from dify_plugin.entities.model.text_embedding import EmbeddingUsage, TextEmbeddingResult
'''
    + _ERROR_IMPORTS
    + '''

class ${class_prefix}TextEmbeddingModel(TextEmbeddingModel):
    """A model that embeds each text as [length, word count]; replace it with calls to your service."""

    def _invoke(
        self,
        model: str,
        credentials: dict,
        texts: list[str],
        user: str | None = None,
        input_type: EmbeddingInputType = EmbeddingInputType.DOCUMENT,
    ) -> TextEmbeddingResult:
        started = time.perf_counter()
        embeddings = [[float(len(text)), float(len(text.split()))] for text in texts]
        tokens = sum(self.get_num_tokens(model, credentials, texts))
        usage = EmbeddingUsage(
            tokens=tokens,
            total_tokens=tokens,
            unit_price=Decimal("0"),
            price_unit=Decimal("0"),
            total_price=Decimal("0"),
            currency="USD",
            latency=time.perf_counter() - started,
        )
        return TextEmbeddingResult(model=model, embeddings=embeddings, usage=usage)

    def get_num_tokens(self, model: str, credentials: dict, texts: list[str]) -> list[int]:
        return [len(text.split()) for text in texts]

    def validate_credentials(self, model: str, credentials: dict) -> None:
        pass

'''
    + _ERROR_MAPPING,
    "rerank": '''\
from dify_plugin import RerankModel
from dify_plugin.entities.model.rerank import RerankDocument, RerankResult
'''
    + _ERROR_IMPORTS
    + '''

class ${class_prefix}RerankModel(RerankModel):
    """A model that scores documents by shared words; replace it with calls to your service."""

    def _invoke(
        self,
        model: str,
        credentials: dict,
        query: str,
        docs: list[str],
        score_threshold: float | None = None,
        top_n: int | None = None,
        user: str | None = None,
    ) -> RerankResult:
        words = set(query.lower().split())
        scored = []
        for index, text in enumerate(docs):
            score = len(words & set(text.lower().split())) / max(len(words), 1)
            if score_threshold is None or score >= score_threshold:
                scored.append(RerankDocument(index=index, text=text, score=score))
        scored.sort(key=lambda document: document.score, reverse=True)
        return RerankResult(model=model, docs=scored[:top_n] if top_n else scored)

    def validate_credentials(self, model: str, credentials: dict) -> None:
        pass

'''
    + _ERROR_MAPPING,
    "tts": '''\
from collections.abc import Generator

from dify_plugin import TTSModel
'''
    + _ERROR_IMPORTS
    + '''

class ${class_prefix}TTSModel(TTSModel):
    """A placeholder speech model; replace it with calls to your service."""

    def _invoke(
        self,
        model: str,
        tenant_id: str,
        credentials: dict,
        content_text: str,
        voice: str,
        user: str | None = None,
    ) -> bytes | Generator[bytes, None, None]:
        yield content_text.encode("utf-8")

    def validate_credentials(self, model: str, credentials: dict) -> None:
        pass

'''
    + _ERROR_MAPPING,
    "speech2text": '''\
from typing import IO

from dify_plugin import Speech2TextModel
'''
    + _ERROR_IMPORTS
    + '''

class ${class_prefix}Speech2TextModel(Speech2TextModel):
    """A placeholder transcription model; replace it with calls to your service."""

    def _invoke(self, model: str, credentials: dict, file: IO[bytes], user: str | None = None) -> str:
        return f"{len(file.read())} bytes of audio"

    def validate_credentials(self, model: str, credentials: dict) -> None:
        pass

'''
    + _ERROR_MAPPING,
    "moderation": '''\
from dify_plugin import ModerationModel
'''
    + _ERROR_IMPORTS
    + '''

class ${class_prefix}ModerationModel(ModerationModel):
    """Flags text that contains a blocked word; replace it with calls to your service."""

    blocked_words = frozenset({"forbidden"})

    def _invoke(self, model: str, credentials: dict, text: str, user: str | None = None) -> bool:
        return any(word in self.blocked_words for word in text.lower().split())

    def validate_credentials(self, model: str, credentials: dict) -> None:
        pass

'''
    + _ERROR_MAPPING,
}

# -- agent strategy -----------------------------------------------------------

AGENT_PROVIDER_YAML = """\
identity:
  author: $author
  name: $name
  label:
    en_US: $label
  description:
    en_US: $description
  icon: icon.svg
  icon_dark: icon-dark.svg
strategies:
  - strategies/$name.yaml
extra:
  python:
    source: provider/$name.py
"""

AGENT_PROVIDER_PY = '''\
from dify_plugin.interfaces.agent import AgentProvider


class ${class_prefix}AgentProvider(AgentProvider):
    pass
'''

AGENT_STRATEGY_YAML = """\
identity:
  name: $name
  author: $author
  label:
    en_US: $label
description:
  en_US: $description
parameters:
  - name: model
    type: model-selector
    scope: tool-call&llm
    required: true
    label:
      en_US: Model
  - name: tools
    type: array[tools]
    required: false
    label:
      en_US: Tools
  - name: query
    type: string
    required: true
    label:
      en_US: Query
extra:
  python:
    source: strategies/$name.py
"""

AGENT_STRATEGY_PY = '''\
from collections.abc import Generator
from typing import Any

from dify_plugin.entities.agent import AgentInvokeMessage
from dify_plugin.interfaces.agent import AgentStrategy


class ${class_prefix}AgentStrategy(AgentStrategy):
    """Answers with the query it is given; call self.session.model.llm here to use the selected model."""

    def _invoke(self, parameters: dict[str, Any]) -> Generator[AgentInvokeMessage, None, None]:
        yield self.create_text_message(str(parameters.get("query", "")))
'''

# -- datasource ---------------------------------------------------------------

DATASOURCE_PROVIDER_YAML = """\
identity:
  author: $author
  name: $name
  label:
    en_US: $label
  description:
    en_US: $description
  icon: icon.svg
provider_type: website_crawl
credentials_schema: []
datasources:
  - datasources/$name.yaml
extra:
  python:
    source: provider/$name.py
"""

DATASOURCE_PROVIDER_PY = '''\
from collections.abc import Mapping
from typing import Any

from dify_plugin.interfaces.datasource import DatasourceProvider


class ${class_prefix}DatasourceProvider(DatasourceProvider):
    def _validate_credentials(self, credentials: Mapping[str, Any]) -> None:
        pass
'''

DATASOURCE_YAML = """\
identity:
  name: $name
  author: $author
  label:
    en_US: $label
description:
  en_US: $description
parameters:
  - name: url
    type: string
    required: true
    label:
      en_US: URL
    description:
      en_US: The page to crawl
extra:
  python:
    source: datasources/$name.py
"""

DATASOURCE_PY = '''\
from collections.abc import Generator, Mapping
from typing import Any

from dify_plugin.entities.datasource import WebsiteCrawlMessage, WebSiteInfo, WebSiteInfoDetail
from dify_plugin.interfaces.datasource.website import WebsiteCrawlDatasource


class ${class_prefix}Datasource(WebsiteCrawlDatasource):
    """Returns one placeholder page for the URL; fetch and convert the real page here."""

    def _get_website_crawl(
        self, datasource_parameters: Mapping[str, Any]
    ) -> Generator[WebsiteCrawlMessage, None, None]:
        url = str(datasource_parameters.get("url", ""))
        page = WebSiteInfoDetail(source_url=url, content="", title=url, description="")
        yield self.create_crawl_message(
            WebSiteInfo(status="completed", web_info_list=[page], total=1, completed=1)
        )
'''

# -- trigger ------------------------------------------------------------------

TRIGGER_PROVIDER_YAML = """\
identity:
  author: $author
  name: $name
  label:
    en_US: $label
  description:
    en_US: $description
  icon: icon.svg
subscription_schema: []
events:
  - events/$name.yaml
extra:
  python:
    source: provider/$name.py
"""

TRIGGER_PROVIDER_PY = '''\
from werkzeug import Request, Response

from dify_plugin.entities.trigger import EventDispatch, Subscription
from dify_plugin.interfaces.trigger import Trigger


class ${class_prefix}Trigger(Trigger):
    """Dispatches every webhook call to the one event; check signatures here."""

    def _dispatch_event(self, subscription: Subscription, request: Request) -> EventDispatch:
        payload = request.get_json(silent=True) or {}
        return EventDispatch(
            events=["$name"],
            response=Response("ok", status=200, content_type="text/plain"),
            payload=payload,
        )
'''

EVENT_YAML = """\
identity:
  name: $name
  author: $author
  label:
    en_US: $label
description:
  en_US: Fires on every webhook call
parameters: []
output_schema:
  type: object
  properties:
    payload:
      type: object
extra:
  python:
    source: events/$name.py
"""

EVENT_PY = '''\
from collections.abc import Mapping
from typing import Any

from werkzeug import Request

from dify_plugin.entities.trigger import Variables
from dify_plugin.interfaces.trigger import Event


class ${class_prefix}Event(Event):
    def _on_event(self, request: Request, parameters: Mapping[str, Any], payload: Mapping[str, Any]) -> Variables:
        return Variables(variables={"payload": dict(payload)})
'''
