"""
What the real SDK (``dify_plugin`` 0.10.2) sends when the echo plugin of
``runtimes.md`` §7 dials into a debug port, rebuilt message by message, for
the debug runtime's tests.
"""

from __future__ import annotations

import base64

import orjson

ICON = b'<svg xmlns="http://www.w3.org/2000/svg" width="24" height="24"><circle r="10"/></svg>\n'


def _i18n(text: str) -> dict:
    return {"zh_Hans": text, "pt_BR": text, "ja_JP": text, "en_US": text}


def echo_manifest(author: str = "acme", name: str = "echo", version: str = "0.0.1") -> dict:
    """The SDK's manifest model of the echo plugin, as it dumps it."""
    return {
        "version": version,
        "type": "plugin",
        "author": author,
        "name": name,
        "repo": None,
        "description": _i18n("Echoes its input back"),
        "icon": "icon.svg",
        "icon_dark": None,
        "label": _i18n("Echo"),
        "created_at": "2025-01-01T00:00:00Z",
        "resource": {
            "memory": 268435456,
            "permission": {
                "tool": None, "model": None, "node": None, "endpoint": None, "app": None,
                "storage": {"enabled": True, "size": 1048576},
            },
        },
        "plugins": {
            "tools": ["provider/echo.yaml"], "models": [], "endpoints": [],
            "agent_strategies": [], "datasources": [], "triggers": [],
        },
        "meta": {
            "version": "0.0.1",
            "arch": ["amd64", "arm64"],
            "runner": {"language": "python", "version": "3.12", "entrypoint": "main"},
            "minimum_dify_version": None,
        },
    }


def echo_tool_provider(author: str = "acme") -> dict:
    """The SDK's tool provider model of the echo plugin, tools inline."""
    return {
        "identity": {
            "author": author, "name": "echo", "description": _i18n("Echo tools"), "icon": "icon.svg",
            "icon_dark": None, "label": _i18n("Echo"), "tags": [],
        },
        "credentials_schema": [],
        "oauth_schema": None,
        "tools": [
            {
                "identity": {"author": author, "name": "echo", "label": _i18n("Echo")},
                "parameters": [
                    {
                        "name": "text", "label": _i18n("Text"), "human_description": _i18n("Text to echo"),
                        "type": "string", "auto_generate": None, "template": None, "scope": None, "form": "llm",
                        "llm_description": "Text to echo", "required": True, "multiple": False, "default": None,
                        "min": None, "max": None, "precision": None, "options": None, "input_schema": None,
                        "show_on": [],
                    }
                ],
                "description": {"human": _i18n("Returns the text it is given"), "llm": "Returns the text it is given"},
                "extra": {"python": {"source": "tools/echo.py"}},
                "has_runtime_parameters": False,
                "output_schema": None,
            }
        ],
        "extra": {"python": {"source": "provider/echo.py"}},
    }


def message(kind: str, data) -> bytes:
    """One registration message as the SDK writes it (``\\n\\n`` after it)."""
    return orjson.dumps({"type": kind, "data": data}) + b"\n\n"


def handshake(key: str) -> bytes:
    """The handshake line (a single ``\\n``)."""
    return orjson.dumps({"type": "handshake", "data": {"key": key}}) + b"\n"


def asset_chunks(filename: str, content: bytes, size: int = 8192) -> bytes:
    """The asset_chunk messages of one file."""
    pieces = [content[i : i + size] for i in range(0, len(content), size)]
    return b"".join(
        message(
            "asset_chunk",
            {"filename": filename, "data": base64.b64encode(piece).decode(), "end": index == len(pieces) - 1},
        )
        for index, piece in enumerate(pieces)
    )


END = message("end", {})
HEARTBEAT = b'{"event":"heartbeat","session_id":null,"data":{}}\n\n'


def registration(key: str, manifest: dict | None = None, tool: dict | None = None, icon: bytes = ICON) -> bytes:
    """The whole registration of the echo plugin, ``end`` and first heartbeat included."""
    return (
        handshake(key)
        + message("manifest_declaration", manifest if manifest is not None else echo_manifest())
        + message("tool_declaration", [tool if tool is not None else echo_tool_provider()])
        + asset_chunks("icon.svg", icon)
        + END
        + HEARTBEAT
    )
