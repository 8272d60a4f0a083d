"""
The raw HTTP/1.1 request an endpoint plugin receives (``http-api.md`` §2.6).

A call to ``/e/<hook_id>/<path>`` is rewritten into the request the plugin
would have seen had it been called directly: the path after the hook id,
the query re-encoded with its keys sorted, forwarding headers removed,
``Host`` set to the original host, ``Dify-Hook-Id`` and ``Dify-Hook-Url``
added, and at most 10 MiB of body.  The SDK hex-decodes these bytes and
parses them with h11 into a werkzeug ``Request``.

Pure functions: bytes in, bytes out.  The layout follows Go's
``http.Request.Write``, which the Go daemon uses: request line, ``Host``,
``User-Agent``, ``Content-Length``, then the other headers sorted by their
canonical name.
"""

from __future__ import annotations

from urllib.parse import quote_from_bytes, quote_plus

from attrs import frozen

#: Bytes of body forwarded at most; the rest is dropped without a word.
MAX_BODY = 10 * 1024 * 1024

#: Headers that would tell the plugin about the proxies in front of Dify.
REMOVED_HEADERS = frozenset(
    {
        b"x-forwarded-for",
        b"x-real-ip",
        b"x-forwarded",
        b"x-original-forwarded-for",
        b"x-original-url",
        b"x-original-host",
    }
)

#: Headers written apart from the sorted rest (or, for framing, recomputed).
_WRITTEN_APART = frozenset({b"host", b"user-agent", b"content-length", b"transfer-encoding", b"trailer"})

#: Methods whose empty body is still announced with ``Content-Length: 0``.
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})

_HOOK_ID = b"dify-hook-id"
_HOOK_URL = b"dify-hook-url"

#: What Go leaves unescaped in a path besides letters and digits.
_PATH_SAFE = "/-_.~$&+,:;=@"


@frozen
class IncomingRequest:
    """
    What the raw request is built from, taken from the public call.

    :ivar method: e.g. ``b"POST"``.
    :ivar path: the decoded path after ``/e/<hook_id>``, starting with ``/``.
    :ivar query: the raw query string (without ``?``).
    :ivar headers: ``(name, value)`` pairs in arrival order; names in any case.
    :ivar host: the ``Host`` the client sent (empty if none).
    :ivar secure: whether the call came over TLS.
    :ivar body: the body (it is cut at :data:`MAX_BODY` here).
    """

    method: bytes
    path: bytes
    query: bytes
    headers: tuple
    host: bytes
    secure: bool
    body: bytes


def canonical_header_name(name: bytes) -> bytes:
    """
    Go's ``CanonicalMIMEHeaderKey``: each ``-``-separated word capitalized
    (``x-api-key`` -> ``X-Api-Key``); a name with a byte that is not a
    token character is left as it is.
    """
    for byte in name:
        if byte <= 0x20 or byte >= 0x7F or byte in b'"(),/:;<=>?@[\\]{}':
            return name
    return b"-".join(part[:1].upper() + part[1:].lower() for part in name.split(b"-"))


def escape_path(path: bytes) -> bytes:
    """Percent-encode a decoded path as Go's ``URL.EscapedPath`` does."""
    return quote_from_bytes(path, safe=_PATH_SAFE).encode("ascii")


_HEX = frozenset(b"0123456789abcdefABCDEF")


def query_unescape(text: bytes) -> bytes | None:
    """
    Go's ``url.QueryUnescape``: ``+`` is a space and ``%XY`` a byte; None
    for a malformed escape (Go drops such a pair).
    """
    out = bytearray()
    index = 0
    while index < len(text):
        byte = text[index]
        if byte == 0x25:  # %
            escape = text[index + 1 : index + 3]
            if len(escape) != 2 or escape[0] not in _HEX or escape[1] not in _HEX:
                return None
            out.append(int(escape, 16))
            index += 3
            continue
        out.append(0x20 if byte == 0x2B else byte)
        index += 1
    return bytes(out)


def parse_query(raw_query: bytes) -> dict[bytes, list[bytes]]:
    """
    Go's ``url.ParseQuery``: ``&``-separated pairs, a missing ``=`` meaning
    an empty value; empty pairs, pairs with a ``;`` and pairs with a bad
    escape are dropped.  Key -> values in arrival order.
    """
    values: dict[bytes, list[bytes]] = {}
    for pair in raw_query.split(b"&"):
        if not pair or b";" in pair:
            continue
        key, _, value = pair.partition(b"=")
        key = query_unescape(key)
        value = query_unescape(value)
        if key is None or value is None:
            continue
        values.setdefault(key, []).append(value)
    return values


def encode_query(raw_query: bytes) -> bytes:
    """
    Re-encode a query string as Go's ``url.Values.Encode`` of
    ``URL.Query()``: keys sorted (values of one key keep their order),
    every key and value query-escaped (space as ``+``).
    """
    values = parse_query(raw_query)
    pairs = []
    for key in sorted(values):
        escaped = quote_plus(key, safe="")
        for value in values[key]:
            pairs.append(f"{escaped}={quote_plus(value, safe='')}")
    return "&".join(pairs).encode("ascii")


def _first(headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _clean(value: bytes) -> bytes:
    # Go writes header values with line breaks turned into spaces, trimmed
    return value.replace(b"\r", b" ").replace(b"\n", b" ").strip(b" \t")


def raw_http_request(incoming: IncomingRequest, hook_id: str) -> bytes:
    """
    The bytes of the request the plugin receives (hex-encoded by the
    caller into ``raw_http_request``).
    """
    headers = incoming.headers
    body = incoming.body[:MAX_BODY]
    # A proxy in front (Dify's nginx) names the host the client used.
    host = _first(headers, b"x-original-host") or incoming.host
    path = incoming.path or b"/"
    target = escape_path(path)
    query = encode_query(incoming.query)
    if query:
        target += b"?" + query
    lines = [incoming.method + b" " + target + b" HTTP/1.1", b"Host: " + _clean(host)]
    user_agent = _first(headers, b"user-agent")
    if user_agent is not None and _clean(user_agent):
        lines.append(b"User-Agent: " + _clean(user_agent))
    if body or incoming.method in _BODY_METHODS:
        lines.append(b"Content-Length: " + str(len(body)).encode("ascii"))
    kept: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in _WRITTEN_APART or lower in REMOVED_HEADERS or lower == _HOOK_ID:
            continue
        kept.setdefault(canonical_header_name(lower), []).append(value)
    kept[canonical_header_name(_HOOK_ID)] = [hook_id.encode("utf-8")]
    if not _first(headers, _HOOK_URL):
        forwarded_proto = _first(headers, b"x-forwarded-proto")
        scheme = b"https" if incoming.secure or forwarded_proto == b"https" else b"http"
        kept[canonical_header_name(_HOOK_URL)] = [
            scheme + b"://" + host + b"/e/" + hook_id.encode("utf-8") + path
        ]
    for name in sorted(kept):
        for value in kept[name]:
            lines.append(name + b": " + _clean(value))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body
