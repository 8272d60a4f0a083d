"""
Builders of test packages: zips laid out as the ``dify`` CLI packager lays
them out, the minimal real echo plugin of ``runtimes.md`` §7, and plugin
source trees written out as files.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Mapping

DEFAULT_REQUIREMENTS = "dify_plugin>=0.10.0,<0.11.0"


def build_package(files: Mapping[str, bytes | str], comment: bytes = b"") -> bytes:
    """
    A ``.difypkg`` zip: entries sorted by path (byte order), deflated, no
    directory entries, fixed timestamps, ``comment`` as the archive comment.
    """
    output = io.BytesIO()
    with zipfile.ZipFile(output, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(files, key=lambda name: name.encode("utf-8")):
            content = files[name]
            if isinstance(content, str):
                content = content.encode("utf-8")
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, content)
        archive.comment = comment
    return output.getvalue()


_MANIFEST = """\
version: {version}
type: plugin
author: {author}
name: {name}
label:
  en_US: Echo
description:
  en_US: Echoes its input back
icon: icon.svg
created_at: "2025-01-01T00:00:00Z"
resource:
  memory: 268435456
  permission:
    storage:
      enabled: true
      size: 1048576
plugins:
  tools:
    - provider/echo.yaml
meta:
  version: 0.0.1
  arch: [amd64, arm64]
  runner:
    language: python
    version: "3.12"
    entrypoint: main
"""

_PROVIDER_YAML = """\
identity:
  author: {author}
  name: echo
  label: {{en_US: Echo}}
  description: {{en_US: Echo tools}}
  icon: icon.svg
tools:
  - tools/echo.yaml
extra:
  python:
    source: provider/echo.py
"""

_PROVIDER_PY = '''\
from typing import Any

from dify_plugin import ToolProvider


class EchoProvider(ToolProvider):
    def _validate_credentials(self, credentials: dict[str, Any]) -> None:
        # The echo tool needs no credentials, so any set is valid.
        return None
'''

_TOOL_YAML = """\
identity: {{name: echo, author: {author}, label: {{en_US: Echo}}}}
description:
  human: {{en_US: Returns the text it is given}}
  llm: Returns the text it is given
parameters:
  - name: text
    type: string
    required: true
    label: {{en_US: Text}}
    human_description: {{en_US: Text to echo}}
    llm_description: Text to echo
    form: llm
extra:
  python:
    source: tools/echo.py
"""

_TOOL_PY = '''\
from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


class EchoTool(Tool):
    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        text = tool_parameters["text"]
        yield self.create_text_message(text)
        yield self.create_json_message({"echo": text, "length": len(text)})
'''

_MAIN_PY = '''\
from dify_plugin import DifyPluginEnv, Plugin

plugin = Plugin(DifyPluginEnv(MAX_REQUEST_TIMEOUT=120))

if __name__ == "__main__":
    plugin.run()
'''

_ICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="24" height="24" viewBox="0 0 24 24">'
    '<circle cx="12" cy="12" r="10" fill="#1c64f2"/></svg>\n'
)

_README = """\
# Echo

A tool that returns the text it is given, as text and as JSON.
"""


def echo_plugin_files(
    author: str = "acme",
    name: str = "echo",
    version: str = "0.0.1",
    extra_requirements: tuple[str, ...] = (),
) -> dict[str, bytes]:
    """
    The files of the minimal real echo plugin (``runtimes.md`` §7), runnable
    on ``dify_plugin`` 0.10.x.

    :param extra_requirements: more lines for ``requirements.txt``.
    """
    requirements = "\n".join((DEFAULT_REQUIREMENTS, *extra_requirements)) + "\n"
    texts = {
        "manifest.yaml": _MANIFEST.format(author=author, name=name, version=version),
        "provider/echo.yaml": _PROVIDER_YAML.format(author=author),
        "provider/echo.py": _PROVIDER_PY,
        "tools/echo.yaml": _TOOL_YAML.format(author=author),
        "tools/echo.py": _TOOL_PY,
        "main.py": _MAIN_PY,
        "requirements.txt": requirements,
        "_assets/icon.svg": _ICON_SVG,
        "README.md": _README,
    }
    return {path: text.encode("utf-8") for path, text in texts.items()}


def write_files(directory: str, files: Mapping[str, bytes]) -> str:
    """Write ``files`` (relative path to content) under ``directory``, creating what is missing; return ``directory``."""
    for path, content in files.items():
        target = os.path.join(directory, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as f:
            f.write(content)
    return directory


def _object_schema(depth: int, width: int, prefix: str) -> dict:
    properties = {}
    for index in range(width):
        name = f"{prefix}_{index}"
        if depth > 0 and index == 0:
            properties[name] = {
                "type": "object",
                "description": f"Telegram-like object {name}.",
                "additionalProperties": True,
                "properties": _object_schema(depth - 1, width, name),
            }
        else:
            properties[name] = {"type": ("string", "integer", "boolean")[index % 3],
                                "description": f"Field {name} of the update."}
    return properties


def _event_yaml(name: str, author: str, size: int) -> bytes:
    import yaml

    def document(parts: int) -> dict:
        shared = {"type": "object", "description": "A document.", "properties": _object_schema(2, 4, "document")}
        properties = {f"part_{n}": {"type": "object", "description": f"Part {n}.",
                                    "properties": _object_schema(12, 6, f"part_{n}")} for n in range(parts)}
        # Two references to one object: PyYAML writes an anchor and an alias,
        # as in the official telegram_trigger files.
        properties["reply"] = {"type": "object", "properties": {"document": shared}}
        properties["original"] = {"type": "object", "properties": {"document": shared}}
        return {
            "identity": {"name": name, "author": author, "label": {"en_US": name.replace("_", " ").title()}},
            "description": {"en_US": f"Triggers when {name} happens."},
            "parameters": [{"name": "chat_type", "label": {"en_US": "Chat Type"}, "type": "select",
                            "required": False, "options": [{"value": "private", "label": {"en_US": "Private"}}]}],
            "output_schema": {"type": "object", "required": ["update_id"], "properties": properties},
        }

    one = len(yaml.safe_dump(document(1), sort_keys=False))
    text = yaml.safe_dump(document(max(1, round(size / one))), sort_keys=False, allow_unicode=True)
    return text.encode("utf-8")


def heavy_trigger_plugin_files(
    events: int = 7, event_bytes: int = 200_000, blob_bytes: int = 0, author: str = "acme", nonce: str = ""
) -> dict[str, bytes]:
    """
    A trigger plugin shaped like the heaviest official package
    (triggers/telegram_trigger): ``events`` event files of about
    ``event_bytes`` of YAML each, a deep ``output_schema`` with shared parts
    (anchors and aliases), and optionally ``blob_bytes`` of incompressible
    data to make the zip large.  It decodes; it is not meant to run.

    :param nonce: text that makes the package (and its identifier) differ.
    """
    import os as _os

    names = [f"event_{index}" for index in range(events)]
    manifest = _MANIFEST.format(version="0.0.1", author=author, name="heavy").replace(
        "  tools:\n    - provider/echo.yaml\n", "  triggers:\n    - provider/heavy.yaml\n"
    )
    provider = (
        f"identity:\n  author: {author}\n  name: heavy\n  label: {{en_US: Heavy}}\n  icon: icon.svg\n"
        "subscription_schema: []\nevents:\n" + "".join(f"  - events/{name}.yaml\n" for name in names)
    )
    files = {
        "manifest.yaml": manifest.encode("utf-8"),
        "provider/heavy.yaml": provider.encode("utf-8"),
        "_assets/icon.svg": _ICON_SVG.encode("utf-8"),
        "main.py": _MAIN_PY.encode("utf-8"),
        "requirements.txt": (DEFAULT_REQUIREMENTS + "\n").encode("utf-8"),
        "README.md": f"# Heavy\n\n{nonce}\n".encode("utf-8"),
    }
    # Dumping is slow; the files differ only by the event's name.
    template = _event_yaml("event_name", author, event_bytes)
    for name in names:
        files[f"events/{name}.yaml"] = template.replace(b"event_name", name.encode()).replace(
            b"Event Name", name.replace("_", " ").title().encode()
        )
    if blob_bytes:
        files["data/blob.bin"] = _os.urandom(blob_bytes)
    return files
