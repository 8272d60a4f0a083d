"""
The items of a dispatch response stream (``http-api.md`` §3.1, §3.2).

Pure functions returning bytes: each item is ``data: `` + a compact JSON
envelope + a blank line.  A success item wraps the plugin chunk's own
bytes, so relaying a chunk costs two concatenations and no JSON encoding.
"""

from __future__ import annotations

import orjson

from difydaemon.api import envelope
from difydaemon.errors import PluginInvokeError

CONTENT_TYPE = b"text/event-stream"
SUCCESS_HEAD = b'data: {"code":0,"message":"success","data":'
ITEM_TAIL = b"}\n\n"


def success_item(chunk_json: bytes) -> bytes:
    """The item relaying one chunk, given as compact JSON bytes."""
    return SUCCESS_HEAD + chunk_json + ITEM_TAIL


def error_item(code: int, message: str, error_type: str, args=None) -> bytes:
    """An error item: the error envelope of §1.3 as one SSE item."""
    return b"data: " + envelope.error(code, message, error_type, args) + b"\n\n"


def plugin_error_text(error_type: str, message: str, args) -> str:
    """
    The JSON text of an error the plugin reported, as the Go daemon writes
    it (a Go map, so the keys are sorted, nested ones too).
    """
    return orjson.dumps(
        {"args": args, "error_type": error_type, "message": message}, option=orjson.OPT_SORT_KEYS
    ).decode()


def protocol_error_text(error_type: str, message: str) -> str:
    """
    The JSON text of a daemon-detected session failure (``unmarshal_error``,
    ``invoke_dify_error``, ...): the Go daemon's map has no ``args`` key.
    """
    return orjson.dumps({"error_type": error_type, "message": message}).decode()


def invoke_error_envelope(inner: str) -> bytes:
    """
    The ``PluginInvokeError`` envelope around an inner error's JSON text
    (which Dify parses again: §1.3, three levels of JSON).
    """
    return envelope.error(PluginInvokeError.code, inner, PluginInvokeError.error_type)


def invoke_error_item(inner: str) -> bytes:
    """:func:`invoke_error_envelope` as one SSE item."""
    return b"data: " + invoke_error_envelope(inner) + b"\n\n"
