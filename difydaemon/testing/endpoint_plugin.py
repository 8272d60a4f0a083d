"""
A real ``dify_plugin`` (0.10.x) endpoint plugin, for tests of the endpoint
routes and of the public ``/e/`` entrypoint.

One endpoint group with three settings (``api_key``, a secret-input that is
required; ``greeting``, a text-input; ``mode``, a select of ``plain`` or
``loud``) and these endpoints:

- ``GET /echo/<path:rest>``: JSON of what the plugin received: method,
  path, ``rest``, the query (every value of each key), the ``Host``,
  ``Dify-Hook-Id`` and ``Dify-Hook-Url`` headers and the (decrypted)
  settings;
- ``POST /json``: JSON ``{"received": <the JSON body>, "greeting": ...}``;
- ``POST /hash``: JSON ``{"sha256": ..., "length": ...}`` of the raw body;
- ``GET /stream``: ``count`` lines (``line-<i>\\n``) from a generator, so
  the SDK sends them as separate chunks;
- ``GET /custom``: status 418, header ``X-Custom: yes``, body ``teapot``.
"""

from __future__ import annotations

from difydaemon.testing.packages import DEFAULT_REQUIREMENTS

_MANIFEST = """\
version: {version}
type: plugin
author: {author}
name: {name}
label:
  en_US: Endpoint test
description:
  en_US: Answers HTTP calls through endpoints
icon: icon.svg
created_at: "2025-01-01T00:00:00Z"
resource:
  memory: 268435456
  permission:
    endpoint:
      enabled: {allow_endpoint}
plugins:
  endpoints:
    - group/{name}.yaml
meta:
  version: 0.0.1
  arch: [amd64, arm64]
  runner:
    language: python
    version: "3.12"
    entrypoint: main
"""

_GROUP = """\
settings:
  - name: api_key
    type: secret-input
    required: true
    label:
      en_US: API key
  - name: greeting
    type: text-input
    required: false
    label:
      en_US: Greeting
  - name: mode
    type: select
    required: false
    label:
      en_US: Mode
    options:
      - value: plain
        label:
          en_US: Plain
      - value: loud
        label:
          en_US: Loud
endpoints:
  - endpoints/echo.yaml
  - endpoints/json.yaml
  - endpoints/hash.yaml
  - endpoints/stream.yaml
  - endpoints/custom.yaml
"""

_ENDPOINT_YAML = """\
path: "{path}"
method: "{method}"
extra:
  python:
    source: "endpoints/{name}.py"
"""

_HEAD = """\
import hashlib
import json
from collections.abc import Mapping

from werkzeug import Request, Response

from dify_plugin import Endpoint


"""

_ENDPOINTS = {
    "echo": ("/echo/<path:rest>", "GET", '''\
class EchoEndpoint(Endpoint):
    def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
        body = {
            "method": r.method,
            "path": r.path,
            "rest": values.get("rest"),
            "query": r.args.to_dict(flat=False),
            "host": r.headers.get("Host"),
            "hook_id": r.headers.get("Dify-Hook-Id"),
            "hook_url": r.headers.get("Dify-Hook-Url"),
            "forwarded_for": r.headers.get("X-Forwarded-For"),
            "settings": dict(settings),
        }
        return Response(json.dumps(body), status=200, content_type="application/json")
'''),
    "json": ("/json", "POST", '''\
class JsonEndpoint(Endpoint):
    def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
        received = json.loads(r.get_data())
        body = {"received": received, "greeting": settings.get("greeting")}
        return Response(json.dumps(body), status=201, content_type="application/json")
'''),
    "hash": ("/hash", "POST", '''\
class HashEndpoint(Endpoint):
    def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
        data = r.get_data()
        body = {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}
        return Response(json.dumps(body), status=200, content_type="application/json")
'''),
    "stream": ("/stream", "GET", '''\
class StreamEndpoint(Endpoint):
    def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
        count = int(r.args.get("count", "5"))

        def lines():
            for i in range(count):
                yield f"line-{i}\\n"

        return Response(lines(), status=200, content_type="text/plain")
'''),
    "custom": ("/custom", "GET", '''\
class CustomEndpoint(Endpoint):
    def _invoke(self, r: Request, values: Mapping, settings: Mapping) -> Response:
        return Response("teapot", status=418, headers={"X-Custom": "yes"}, content_type="text/plain")
'''),
}

_MAIN_PY = '''\
from dify_plugin import DifyPluginEnv, Plugin

plugin = Plugin(DifyPluginEnv(MAX_REQUEST_TIMEOUT=120))

if __name__ == "__main__":
    plugin.run()
'''

_ICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="24" height="24" viewBox="0 0 24 24">'
    '<rect width="20" height="20" x="2" y="2" fill="#16a34a"/></svg>\n'
)


def endpoint_plugin_files(
    author: str = "acme",
    name: str = "hooks",
    version: str = "0.0.1",
    allow_endpoint: bool = True,
) -> dict[str, bytes]:
    """
    The files of the endpoint plugin, as package files.

    :param allow_endpoint: what ``resource.permission.endpoint.enabled``
        says (False makes a plugin that may not set endpoints up).
    """
    texts = {
        "manifest.yaml": _MANIFEST.format(
            author=author, name=name, version=version, allow_endpoint="true" if allow_endpoint else "false"
        ),
        f"group/{name}.yaml": _GROUP,
        "main.py": _MAIN_PY,
        "requirements.txt": DEFAULT_REQUIREMENTS + "\n",
        "_assets/icon.svg": _ICON_SVG,
        "README.md": "# Endpoint test\n\nAnswers HTTP calls through endpoints.\n",
    }
    for endpoint, (path, method, code) in _ENDPOINTS.items():
        texts[f"endpoints/{endpoint}.yaml"] = _ENDPOINT_YAML.format(path=path, method=method, name=endpoint)
        texts[f"endpoints/{endpoint}.py"] = _HEAD + code
    return {path: text.encode("utf-8") for path, text in texts.items()}
