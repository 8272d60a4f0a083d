"""
The one canonical form of a request target, which the key check and every
router of the daemon see.

Before this module the daemon had three readings of a path and the key
check used a different one from the routers: twisted.web split the raw path
on ``/`` and decoded each segment (so ``plugin%2F<t>`` was one segment
``plugin/<t>``, which Klein joined back into two), werkzeug merged repeated
slashes (so ``//plugin/<t>/...`` had an empty first segment for the key
check and a route for Klein), and the dispatch channel decoded segments on
its own.  Each was a way to reach a ``/plugin/**`` route without
``X-Api-Key``.

The Go daemon (gin with its default settings) routes on ``URL.Path``: the
path percent-decoded once and never cleaned.  :func:`canonical_target`
reads a target the same way, and decides per trick:

- **Percent-encoding is normalised**, exactly once, as gin does: ``%70lugin``
  is ``plugin``, ``%2F`` and ``%2f`` are ``/`` (so ``/plugin%2F<t>/...`` is
  ``/plugin/<t>/...``, which needs the key like any other spelling).  What
  decoding produces is never decoded again: ``%252F`` stays the three bytes
  ``%2F`` inside one segment, which names no route.  A ``%`` not followed by
  two hex digits is refused with 400, as Go's URL parser refuses it.
- **Empty and dot segments are refused** with the daemon's 404 (``//``,
  ``///``, ``.``, ``..``, encoded or not, anywhere in the routed part): gin
  neither merges slashes nor resolves dot segments, so none of these names a
  route in Go either, and refusing keeps a single spelling per route, so no
  second spelling can be judged differently by two readers.  A final empty
  segment (a trailing slash) is kept: ``/plugin/<t>/extract-asset/`` needs it.
- **The tail of ``/e/<hook_id>/<path>`` is the plugin's business**: Go's
  catch-all ``*path`` hands it over decoded and uncleaned, and so does this
  module; only ``e`` and the hook id are the daemon's route.
- A decoded control byte (below 0x20, or DEL) in the routed part is
  refused with 400: no route has one, and a tenant or hook id with one
  would reach logs and the database.
- Only origin-form targets of printable ASCII are read (``/...``); ``*``,
  absolute URLs and raw bytes outside 0x21-0x7E are refused with 400.

Pure: bytes in, a value out.
"""

from __future__ import annotations

import re
from urllib.parse import quote_from_bytes

from attrs import define, frozen

#: Raw targets this module reads: origin-form, printable ASCII.
_ORIGIN_FORM = re.compile(rb"/[\x21-\x7e]*")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
#: A path twisted.web reads as it is: printable ASCII but ``%``, ``?`` and ``#``.
_PLAIN_PATH = re.compile(rb"/[\x21\x22\x24\x26-\x3e\x40-\x7e]*")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
#: Kept as they are when a segment is re-encoded for twisted.web (which
#: decodes ``%XX`` and nothing else): printable ASCII but ``%``, ``?``, ``#``.
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~[]{}|\\^`\"<>"

#: The first segment of the public endpoint route, whose tail is not ours.
ENDPOINT_PREFIX = b"e"


@define(slots=True)
class RequestTarget:
    """
    A request target in canonical form.

    Not frozen: one is built for every request (a frozen attrs class costs
    twice as much to build), and nobody mutates it.

    :ivar segments: the path, decoded once and split on ``/`` (``/`` alone
        is ``(b"",)``; ``/plugin/t/`` is ``(b"plugin", b"t", b"")``).
    :ivar query: the raw query string after the first ``?`` (empty if none).
    """

    segments: tuple
    query: bytes

    @property
    def path(self) -> bytes:
        """The decoded path, ``/`` and the segments."""
        return b"/" + b"/".join(self.segments)

    def encoded_path(self) -> bytes:
        """
        The path re-encoded so that splitting it on ``/`` and decoding each
        segment (as twisted.web does) gives :attr:`segments` back exactly.
        """
        path = self.path
        if _PLAIN_PATH.fullmatch(path) is not None:
            return path
        return b"/" + b"/".join(_encode_segment(segment) for segment in self.segments)


@frozen
class PathRefusal:
    """
    A target the daemon does not route.

    :ivar status: 400 (malformed) or 404 (names no route).
    :ivar reason: why, for the log.
    """

    status: int
    reason: str


#: A target that is not origin-form printable ASCII.
NOT_ORIGIN_FORM = PathRefusal(400, "not an origin-form target of printable ASCII")
#: A ``%`` not followed by two hex digits.
BAD_ESCAPE = PathRefusal(400, "malformed percent-encoding")
#: A control byte, once decoded, in the routed part.
CONTROL_BYTE = PathRefusal(400, "control byte in the path")
#: An empty, ``.`` or ``..`` segment in the routed part.
NO_ROUTE = PathRefusal(404, "empty or dot segment in the path")


def _encode_segment(segment: bytes) -> bytes:
    if b"%" not in segment and _ORIGIN_FORM.fullmatch(b"/" + segment) and b"?" not in segment and b"#" not in segment:
        return segment
    return quote_from_bytes(segment, safe=_SEGMENT_SAFE).encode("ascii")


def _decode(path: bytes) -> bytes | None:
    """``path`` with every ``%XX`` decoded once; None if a ``%`` is malformed."""
    if path.count(b"%") != len(_ESCAPE.findall(path)):
        return None
    return _ESCAPE.sub(lambda match: bytes((int(match.group(1), 16),)), path)


def canonical_target(target: bytes, *, checked: bool = False) -> RequestTarget | PathRefusal:
    """
    The canonical form of a raw request target (the second word of the
    request line), or why the daemon does not route it.

    :param checked: the caller has already matched ``target`` against
        ``/[\x21-\x7e]*`` (origin-form printable ASCII).
    """
    if not checked and _ORIGIN_FORM.fullmatch(target) is None:
        return NOT_ORIGIN_FORM
    path, _, query = target.partition(b"?")
    # the raw target is printable: only decoding can bring a control byte in
    decoded = b"%" in path
    if decoded:
        path = _decode(path)
        if path is None:
            return BAD_ESCAPE
    segments = path[1:].split(b"/")
    if not decoded and b"//" not in path and b"/." not in path:
        # no empty or dot segment, no control byte: the common case, at once
        return RequestTarget(tuple(segments), query)
    routed = segments
    if segments[0] == ENDPOINT_PREFIX:
        # /e/<hook_id>/<tail>: the tail is the endpoint plugin's own path
        routed = segments[:2]
    last = len(segments) - 1
    for index, segment in enumerate(routed):
        if segment == b"" and index != last or segment == b"." or segment == b"..":
            return NO_ROUTE
        if decoded and _CONTROL.search(segment) is not None:
            return CONTROL_BYTE
    return RequestTarget(tuple(segments), query)
