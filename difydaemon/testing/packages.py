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
