"""
The ``{code, message, data}`` envelope and its JSON (``http-api.md`` §1.3).

Pure functions: they return bytes and never see a request.
"""

from __future__ import annotations

from datetime import datetime

import orjson

from difydaemon.errors import DaemonError
from difydaemon.ids import rfc3339

_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS


def _default(value):
    if isinstance(value, datetime):
        return rfc3339(value)
    if isinstance(value, (tuple, frozenset, set)):
        return list(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def dumps(value) -> bytes:
    """Compact JSON bytes; datetimes become RFC 3339 strings."""
    return orjson.dumps(value, default=_default, option=_OPTIONS)


def success(data) -> bytes:
    """A success envelope around ``data`` (which must not be None)."""
    return b'{"code":0,"message":"success","data":' + dumps(data) + b"}"


def error_message(message: str, error_type: str, args=None) -> str:
    """
    The JSON text Dify parses out of an error envelope's ``message``
    (keys in Go's order: message, error_type, args).
    """
    return dumps({"message": message, "error_type": error_type, "args": args}).decode()


def error(code: int, message: str, error_type: str, args=None) -> bytes:
    """An error envelope: ``message`` holds JSON in a string, ``data`` is null."""
    return dumps({"code": code, "message": error_message(message, error_type, args), "data": None})


def from_exception(exc: DaemonError) -> bytes:
    """The error envelope of a :class:`DaemonError`."""
    return error(exc.code, exc.message, exc.error_type, exc.error_args)


#: The body of an unknown route; ``code`` is a string here, as in Go.
ROUTE_NOT_FOUND = b'{"code":"not_found","message":"route not found"}'
