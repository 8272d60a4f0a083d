"""
Request binding and validation (``http-api.md`` §1.4).

Parameters come from the query string, from a form body, or from a JSON body
when ``Content-Type`` is JSON -- merged, so a route reads a field from
whichever place the caller used (Dify sends a JSON body on a GET for
``decode/from_identifier``).  JSON decode errors are ignored as gin ignores
them; only validation decides.  A failure is a :class:`BindError`, answered
with HTTP 400 and a ``PluginDaemonBadRequestError`` envelope.
"""

from __future__ import annotations

from typing import Any, Callable

import orjson
from attrs import frozen

from difydaemon.errors import BadRequestError

_MISSING = object()


class BindError(BadRequestError):
    """A request failed binding or validation (HTTP 400)."""


@frozen
class Field:
    """
    One bound parameter.

    :param name: the wire name (query/form/JSON key).
    :param kind: ``str``, ``int``, ``bool``, ``list`` or ``dict``.
    :param required: gin's ``required``: present and non-zero.
    :param check: an extra predicate on the converted value; its failure
        is reported with ``tag``.
    """

    name: str
    kind: type = str
    required: bool = False
    default: Any = None
    check: Callable[[Any], bool] | None = None
    tag: str = "invalid"


def _struct_name(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_"))


def _fail(route: str, field: Field, tag: str):
    raise BindError(
        f"Key: '{route}.{_struct_name(field.name)}' Error:Field validation for "
        f"'{_struct_name(field.name)}' failed on the '{tag}' tag"
    )


def request_values(query: dict, content_type: str | None, body: bytes) -> dict:
    """
    Merge the query arguments (first value of each, decoded) with a JSON
    object body; the body wins.
    """
    values: dict = {}
    for key, items in query.items():
        if items:
            k = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
            v = items[0]
            values[k] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    if content_type and content_type.split(";", 1)[0].strip().lower() == "application/json" and body:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            values.update(parsed)
    return values


def _convert(route: str, field: Field, raw):
    kind = field.kind
    if kind is int:
        if isinstance(raw, bool):
            _fail(route, field, "number")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        _fail(route, field, "number")
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "t", "true"):
            return True
        if isinstance(raw, str) and raw.lower() in ("0", "f", "false", ""):
            return False
        _fail(route, field, "boolean")
    if kind is str:
        if isinstance(raw, str):
            return raw
        _fail(route, field, "string")
    if kind is list:
        if isinstance(raw, list):
            return raw
        _fail(route, field, "array")
    if kind is dict:
        if isinstance(raw, dict):
            return raw
        _fail(route, field, "object")
    raise TypeError(kind)


def bind(route: str, fields: list[Field], values: dict) -> dict:
    """
    Validate ``values`` against ``fields``; return name -> converted value
    (absent optional fields get their default).  Raises :class:`BindError`.
    """
    out = {}
    for field in fields:
        raw = values.get(field.name, _MISSING)
        if raw is _MISSING or raw is None:
            if field.required:
                _fail(route, field, "required")
            out[field.name] = field.default
            continue
        value = _convert(route, field, raw)
        if field.required and (value == 0 or value == "" or value == [] or value == {}) and value is not False:
            _fail(route, field, "required")
        if field.check is not None and not field.check(value):
            _fail(route, field, field.tag)
        out[field.name] = value
    return out


def page_fields(max_page_size: int = 256) -> list[Field]:
    """``page`` (>= 1) and ``page_size`` (1..max) as every list route binds them."""
    return [
        Field("page", int, required=True, check=lambda v: v >= 1, tag="min"),
        Field("page_size", int, required=True, check=lambda v: 1 <= v <= max_page_size, tag="max"),
    ]
