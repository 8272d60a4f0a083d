"""
Real SDK plugins with misbehaviours, for the end-to-end tests of runtimes.

:func:`behaviour_plugin_files` extends the echo plugin of
:mod:`difydaemon.testing.packages` with more tools of the same provider:

- ``stream``: yields ``count`` text chunks (``"chunk-<i>"``);
- ``fail``: raises ``ValueError("planned failure")``;
- ``crash``: yields one chunk, then kills its own process;
- ``flood``: writes one stdout line longer than ``size`` bytes;
- ``sleep``: yields one chunk, then sleeps ``seconds``;
- ``blob``: yields one blob of ``size`` bytes (``b"0123456789"`` repeated),
  which the SDK sends as 8192-byte ``blob_chunk`` pieces;
- ``gate``: creates the file ``started`` in the directory ``dir``, waits
  for a file ``first`` there before its first chunk (``"first"``) and for
  a file ``second`` before its second (``"second"``): the test decides
  when each chunk comes;
- ``paced``: sleeps ``delay`` seconds, then yields ``count`` chunks
  ``gap`` seconds apart, each the ``time.time()`` of its yield;
- ``requests``: yields, as one JSON message ``{"requests": [...]}``, the
  ``data`` of every request the plugin received so far (with the
  ``"recording"`` main only);
- ``environ``: yields one JSON message ``{"pid", "environ"}``: its process
  id and its whole ``os.environ``;
- ``ignore_term``: makes its process ignore SIGTERM, and yields its process
  id as text;
- ``allocate``: allocates ``mb`` MiB, yields ``"allocated"``, and keeps
  them until the next call (past the manifest's 256 MiB ``resource.memory``
  it runs out of memory);
- ``orphan``: starts ``sleep 600`` by a double fork (re-parented away from
  the plugin, in its process group, ignoring TERM) and yields its pid as
  text;
- ``print``: prints ``text`` as a line of plain text on stdout, then
  prints ``"glued "`` with no newline (the SDK's next message follows it on
  the same line), and yields ``"printed"``;
- ``stdin``: yields, as one JSON message ``{"lines": [...]}``, every line
  the plugin read on stdin so far, as sent (with the ``"recording"`` main
  only).

``main`` variants: ``"normal"`` (the SDK's), ``"silent"`` (never
heartbeats: sleeps forever), ``"broken"`` (raises at import) and
``"recording"`` (the SDK's, keeping the ``data`` of every request it
receives, whatever its route, for the ``requests`` tool, and the raw bytes
it reads on stdin, for the ``stdin`` tool).

:func:`callback_plugin_files` is the echo plugin with tools that call back
into Dify through the daemon (``runtimes.md`` §4), each answering what it
got back as text (an error as ``"error: <message>"``):

- ``call_tool``: invokes the builtin tool ``provider``/``tool`` with
  ``{"text": text}`` and repeats the texts it returns;
- ``call_llm``: streams an LLM call with ``text`` as the user message and
  repeats each chunk's content, then ``"done"``;
- ``kv``: ``op`` (``set``, ``get``, ``exist``, ``del``) on ``key``, with
  ``text`` as the value to set.
"""

from __future__ import annotations

import orjson

from difydaemon.testing.packages import echo_plugin_files

_TOOLS = {
    "stream": '''\
        count = int(tool_parameters.get("count") or 100)
        for i in range(count):
            yield self.create_text_message(f"chunk-{i}")
''',
    "allocate": '''\
        import builtins

        builtins.ALLOCATED = bytearray(int(tool_parameters.get("mb") or 1) * 1048576)
        yield self.create_text_message("allocated")
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
    "blob": '''\
        size = int(tool_parameters.get("size") or 20000)
        yield self.create_blob_message((b"0123456789" * (size // 10 + 1))[:size], meta={"mime_type": "text/plain"})
''',
    "gate": '''\
        import os
        import time

        directory = tool_parameters["dir"]

        def wait_for(name):
            deadline = time.monotonic() + 120
            while not os.path.exists(os.path.join(directory, name)):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no {name} file in {directory}")
                time.sleep(0.01)

        open(os.path.join(directory, "started"), "w").close()
        wait_for("first")
        yield self.create_text_message("first")
        wait_for("second")
        yield self.create_text_message("second")
''',
    "paced": '''\
        import time

        time.sleep(float(tool_parameters.get("delay") or 0))
        gap = float(tool_parameters.get("gap") or 0.01)
        for i in range(int(tool_parameters.get("count") or 10)):
            if i:
                time.sleep(gap)
            yield self.create_text_message(repr(time.time()))
''',
    "requests": '''\
        import recorded

        yield self.create_json_message({"requests": list(recorded.REQUESTS)})
''',
    "environ": '''\
        import os

        yield self.create_json_message({"pid": os.getpid(), "environ": dict(os.environ)})
''',
    "ignore_term": '''\
        import os
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        yield self.create_text_message(str(os.getpid()))
''',
    "orphan": '''\
        import os
        import signal

        read, write = os.pipe()
        child = os.fork()
        if child == 0:
            if os.fork() == 0:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                os.write(write, str(os.getpid()).encode())
                os.execv("/bin/sleep", ["sleep", "600"])
            os._exit(0)
        os.close(write)
        os.waitpid(child, 0)
        pid = os.read(read, 64).decode()
        os.close(read)
        yield self.create_text_message(pid)
''',
    "print": '''\
        print(tool_parameters.get("text") or "plain text", flush=True)
        print("glued ", end="", flush=True)
        yield self.create_text_message("printed")
''',
    "stdin": '''\
        import recorded

        raw = b"".join(recorded.STDIN).decode("utf-8", "replace")
        yield self.create_json_message({"lines": [line for line in raw.split("\\n") if line.strip()]})
''',
}

_CALLBACK_TOOLS = {
    "call_tool": '''\
        try:
            for message in self.session.tool.invoke_builtin_tool(
                tool_parameters["provider"], tool_parameters["tool"], {"text": tool_parameters.get("text", "")}
            ):
                if message.type == ToolInvokeMessage.MessageType.TEXT:
                    yield self.create_text_message(message.message.text)
        except Exception as exc:
            yield self.create_text_message(f"error: {exc}")
''',
    "call_llm": '''\
        from dify_plugin.entities.model.llm import LLMModelConfig
        from dify_plugin.entities.model.message import UserPromptMessage

        try:
            config = LLMModelConfig(provider="langgenius/openai/openai", model="gpt-3.5-turbo", mode="chat",
                                    completion_params={"temperature": 0})
            for chunk in self.session.model.llm.invoke(
                model_config=config,
                prompt_messages=[UserPromptMessage(content=tool_parameters.get("text", ""))],
                stream=True,
            ):
                yield self.create_text_message(chunk.delta.message.content)
            yield self.create_text_message("done")
        except Exception as exc:
            yield self.create_text_message(f"error: {exc}")
''',
    "kv": '''\
        storage = self.session.storage
        op, key = tool_parameters["op"], tool_parameters["key"]
        try:
            if op == "set":
                storage.set(key, tool_parameters.get("text", "").encode())
                yield self.create_text_message("set")
            elif op == "get":
                yield self.create_text_message(storage.get(key).decode())
            elif op == "exist":
                yield self.create_text_message(str(storage.exist(key)))
            else:
                storage.delete(key)
                yield self.create_text_message("deleted")
        except Exception as exc:
            yield self.create_text_message(f"error: {exc}")
''',
}

#: the manifest's permission block of the echo plugin, replaced by
#: :func:`callback_plugin_files`
_ECHO_PERMISSION = """\
  permission:
    storage:
      enabled: true
      size: 1048576
"""

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
    # wraps the SDK's request executor (dify_plugin 0.10.x) to keep each
    # request's data as it came off stdin, before any request model reads it,
    # and its stdin reader to keep the lines as sent (keys the SDK ignores too)
    "recording": '''\
from dify_plugin import DifyPluginEnv, Plugin
from dify_plugin.core.server.stdio.request_reader import StdioRequestReader

import recorded

_read_async = StdioRequestReader._read_async


def _recording_read(self):
    data = _read_async(self)
    recorded.STDIN.append(data)
    return data


StdioRequestReader._read_async = _recording_read

plugin = Plugin(DifyPluginEnv(MAX_REQUEST_TIMEOUT=120))
_execute_request = plugin._execute_request


def _recording(session_id, data, *args, **kwargs):
    recorded.REQUESTS.append(data)
    return _execute_request(session_id, data, *args, **kwargs)


plugin._execute_request = _recording

if __name__ == "__main__":
    plugin.run()
''',
}

_RECORDED_PY = '''\
"""The data of every request this plugin received, and its raw stdin, in order (see main.py)."""

REQUESTS = []
#: every read from stdin, as read
STDIN = []
'''


def behaviour_plugin_files(
    author: str = "acme",
    name: str = "echo",
    version: str = "0.0.1",
    main: str = "normal",
    extra_requirements: tuple[str, ...] = (),
) -> dict[str, bytes]:
    """The echo plugin plus the misbehaving tools, as package files."""
    files = echo_plugin_files(author=author, name=name, version=version, extra_requirements=extra_requirements)
    files = _with_tools(files, _TOOLS, author)
    if main != "normal":
        files["main.py"] = _MAINS[main].encode()
    if main == "recording":
        files["recorded.py"] = _RECORDED_PY.encode()
    return files


def large_declaration_plugin_files(fields: int = 20_000) -> dict[str, bytes]:
    """
    The behaviour plugin whose echo tool declares an output schema of
    ``fields`` string fields: a declaration of about 60 bytes of JSON and
    six YAML nodes per field (20,000 fields: 1.2 MB, 120,000 nodes).  It
    installs and runs like the behaviour plugin.
    """
    files = behaviour_plugin_files()
    properties = {f"field_{n}": {"type": "string", "description": f"Field number {n}."} for n in range(fields)}
    # JSON is YAML (a flow mapping), and much faster to write than YAML
    schema = orjson.dumps({"type": "object", "properties": properties}).decode()
    files["tools/echo.yaml"] += f"output_schema: {schema}\n".encode()
    return files


def callback_plugin_files(permission: str, name: str = "echo") -> dict[str, bytes]:
    """
    The echo plugin plus the tools that call back into Dify.

    :param permission: the manifest's ``resource.permission`` block as YAML
        lines indented by four spaces (``"    tool:\\n      enabled: true\\n"``);
        empty for none at all.
    """
    files = _with_tools(echo_plugin_files(name=name), _CALLBACK_TOOLS, "acme")
    manifest = files["manifest.yaml"].decode()
    assert _ECHO_PERMISSION in manifest
    block = "  permission:\n" + permission if permission else ""
    files["manifest.yaml"] = manifest.replace(_ECHO_PERMISSION, block).encode()
    return files


def serverless_plugin_files(permission: str) -> dict[str, bytes]:
    """
    One package with both the misbehaving and the calling-back tools (a
    serverless function is built once and serves them all).
    """
    return _with_tools(callback_plugin_files(permission), _TOOLS, "acme")


def _with_tools(files: dict[str, bytes], tools: dict[str, str], author: str) -> dict[str, bytes]:
    """``files`` with ``tools`` (name -> body of ``_invoke``) added to the echo provider."""
    provider = files["provider/echo.yaml"].decode()
    listed = "".join(f"  - tools/{tool}.yaml\n" for tool in tools)
    provider = provider.replace("  - tools/echo.yaml\n", "  - tools/echo.yaml\n" + listed)
    files["provider/echo.yaml"] = provider.encode()
    for tool, body in tools.items():
        files[f"tools/{tool}.yaml"] = _TOOL_YAML.format(name=tool, author=author).encode()
        files[f"tools/{tool}.py"] = _TOOL_PY.format(cls=_class_name(tool), body=body).encode()
    return files


def _class_name(tool: str) -> str:
    return "".join(part.capitalize() for part in tool.split("_"))
