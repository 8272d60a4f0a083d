"""
Real SDK plugins with misbehaviours, for the end-to-end tests of runtimes.

:func:`behaviour_plugin_files` extends the echo plugin of
:mod:`difydaemon.testing.packages` with more tools of the same provider:

- ``stream``: yields ``count`` text chunks (``"chunk-<i>"``);
- ``fail``: raises ``ValueError("planned failure")``;
- ``crash``: yields one chunk, then kills its own process;
- ``flood``: writes one stdout line longer than ``size`` bytes;
- ``sleep``: yields one chunk, then sleeps ``seconds``.

``main`` variants: ``"normal"`` (the SDK's), ``"silent"`` (never
heartbeats: sleeps forever) and ``"broken"`` (raises at import).
"""

from __future__ import annotations

from difydaemon.testing.packages import echo_plugin_files

_TOOLS = {
    "stream": '''\
        count = int(tool_parameters.get("count") or 100)
        for i in range(count):
            yield self.create_text_message(f"chunk-{i}")
''',
    "fail": '''\
        raise ValueError("planned failure")
        yield  # a generator all the same
''',
    "crash": '''\
        import os
        import sys
        import time

        yield self.create_text_message("before the crash")
        sys.stdout.flush()
        time.sleep(0.2)
        os._exit(3)
''',
    "flood": '''\
        import sys

        size = int(tool_parameters.get("size") or 6 * 1024 * 1024)
        sys.stdout.write("x" * size + "\\n")
        sys.stdout.flush()
        yield self.create_text_message("flooded")
''',
    "sleep": '''\
        import time

        yield self.create_text_message("sleeping")
        time.sleep(float(tool_parameters.get("seconds") or 30))
        yield self.create_text_message("woke up")
''',
}

_TOOL_YAML = """\
identity: {{name: {name}, author: {author}, label: {{en_US: {name}}}}}
description:
  human: {{en_US: test tool {name}}}
  llm: test tool {name}
parameters:
  - name: text
    type: string
    required: false
    label: {{en_US: Text}}
    human_description: {{en_US: Text}}
    llm_description: Text
    form: llm
extra:
  python:
    source: tools/{name}.py
"""

_TOOL_PY = '''\
from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


class {cls}Tool(Tool):
    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
{body}'''

_MAINS = {
    "silent": "import time\n\nif __name__ == '__main__':\n    time.sleep(3600)\n",
    "broken": "raise RuntimeError('this plugin cannot start')\n",
}


def behaviour_plugin_files(
    author: str = "acme",
    name: str = "echo",
    version: str = "0.0.1",
    main: str = "normal",
    extra_requirements: tuple[str, ...] = (),
) -> dict[str, bytes]:
    """The echo plugin plus the misbehaving tools, as package files."""
    files = echo_plugin_files(author=author, name=name, version=version, extra_requirements=extra_requirements)
    provider = files["provider/echo.yaml"].decode()
    listed = "".join(f"  - tools/{tool}.yaml\n" for tool in _TOOLS)
    provider = provider.replace("  - tools/echo.yaml\n", "  - tools/echo.yaml\n" + listed)
    files["provider/echo.yaml"] = provider.encode()
    for tool, body in _TOOLS.items():
        files[f"tools/{tool}.yaml"] = _TOOL_YAML.format(name=tool, author=author).encode()
        files[f"tools/{tool}.py"] = _TOOL_PY.format(cls=tool.capitalize(), body=body).encode()
    if main != "normal":
        files["main.py"] = _MAINS[main].encode()
    return files
