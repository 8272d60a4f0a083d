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

import re
from typing import Any, Callable

import orjson
from attrs import frozen

from difydaemon.errors import BadRequestError

_MISSING = object()

#: The range of Go's ``int`` on the daemon's platforms, and of SQL ``bigint``:
#: every integer a route binds fits a query parameter on SQLite and PostgreSQL.
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

# what strconv.ParseInt(s, 10, 64) reads: ASCII digits with an optional sign
# (int() would also take spaces, underscores and non-ASCII digits); 20
# characters hold every int64, longer strings are not parsed at all
_DECIMAL = re.compile(r"[+-]?[0-9]{1,19}")


class BindError(BadRequestError):
    """A request failed binding or validation (HTTP 400)."""


@frozen
class Field:
    """
    One bound parameter.

    :param name: the wire name (query/form/JSON key).
    :param kind: ``str``, ``int``, ``bool``, ``list`` or ``dict``.
    :param required: gin's ``required``: present and non-zero.
    :param minimum: the validator's ``min``: the least value of an
        ``int``, the least length of a ``str`` or ``list``.
    :param maximum: the validator's ``max``, likewise; for strings that
        are stored, the width of their column.
    :param check: an extra predicate on the converted value; its failure
        is reported with ``tag``.

    Strings, and the strings of a list (or of the objects in it), never
    hold a NUL: no identifier does, and PostgreSQL refuses one in a query.
    """

    name: str
    kind: type = str
    required: bool = False
    default: Any = None
    check: Callable[[Any], bool] | None = None
    tag: str = "invalid"
    minimum: int | None = None
    maximum: int | None = None


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


def _integer(route: str, field: Field, raw) -> int:
    """
    An ``int`` as Go binds one: a JSON integer (not a boolean, not a
    number with a fraction or an exponent: Go's decoder refuses those for
    an ``int``) or a decimal query value (empty is 0, as gin binds it); in
    both cases within int64.
    """
    if type(raw) is int:
        value = raw
    elif isinstance(raw, str):
        if raw == "":
            return 0
        if _DECIMAL.fullmatch(raw) is None:
            _fail(route, field, "number")
        value = int(raw)
    else:
        _fail(route, field, "number")
    if not INT64_MIN <= value <= INT64_MAX:
        _fail(route, field, "number")
    return value


def _holds_nul(value) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_holds_nul(item) for item in value if isinstance(item, (str, dict)))
    if isinstance(value, dict):
        return any("\x00" in item for item in value.values() if isinstance(item, str))
    return False


def _convert(route: str, field: Field, raw):
    kind = field.kind
    if kind is int:
        return _integer(route, field, raw)
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


def _check_bounds(route: str, field: Field, value) -> None:
    if field.kind is int:
        size = value
    elif field.kind is str or field.kind is list:
        size = len(value)
    else:
        return
    if field.minimum is not None and size < field.minimum:
        _fail(route, field, "min")
    if field.maximum is not None and size > field.maximum:
        _fail(route, field, "max")


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
        if field.kind is not dict and _holds_nul(value):
            _fail(route, field, "excludesrune")
        _check_bounds(route, field, value)
        if field.check is not None and not field.check(value):
            _fail(route, field, field.tag)
        out[field.name] = value
    return out


def page_fields(max_page_size: int = 256) -> list[Field]:
    """``page`` (>= 1) and ``page_size`` (1..max) as every list route binds them."""
    return [
        Field("page", int, required=True, minimum=1),
        Field("page_size", int, required=True, minimum=1, maximum=max_page_size),
    ]


def page_offset(page: int, page_size: int) -> int:
    """
    The rows before a page: ``(page - 1) * page_size``, at least 0 and at
    most int64's largest (a page that far out is simply empty), so that it
    fits an ``OFFSET`` parameter whatever the bound page is.
    """
    return min(max(0, (page - 1) * page_size), INT64_MAX)
