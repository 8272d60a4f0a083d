"""
What the daemon decides about a request as soon as its head is read, before
a byte of its body: the front door both HTTP stacks share (the dispatch
channel for the dispatch calls it serves, twisted.web for the rest).

:meth:`FrontDoor.admit` reads the target in its canonical form
(:mod:`difydaemon.api.paths`, the same form every router then sees),
checks ``X-Api-Key`` on ``/plugin/**`` and bounds the body by its route
(one table, :data:`ROUTES`: its size, and its pace,
:mod:`difydaemon.api.pace`).  A refusal is answered at once and the
connection closed, its body unread:

- a path the daemon does not route: 404 (or 400 when malformed), before the
  key check, which is moot then;
- a missing or wrong key: the 401 envelope (``http-api.md`` §1.2);
- a declared ``Content-Length`` over the route's bound: 413 with a -400
  envelope, except on the upload routes, which answer HTTP 200 with -400
  "file size exceeds the maximum limit" as Go does (``http-api.md`` §9).
  A chunked body is counted as it arrives against the same bound.  A route
  that takes no body (``/health/check``) has a bound of 0.

The head itself is bounded too (:data:`MAX_REQUEST_LINE`,
:data:`MAX_HEAD_SIZE`, :data:`MAX_HEADERS`, :data:`HEAD_TIMEOUT`), with the
answers of :data:`URI_TOO_LONG`, :data:`HEADERS_TOO_LARGE` and
:data:`HEAD_TIMED_OUT`; a body too slow for its pace is
:data:`BODY_TIMED_OUT`, and a head that could be framed two ways (request
smuggling) is :data:`BAD_REQUEST`.

Pure: values in, values out; :func:`refusal_response` gives the bytes both
stacks write.
"""

from __future__ import annotations

import hmac
from functools import lru_cache

from attrs import define, field, frozen
from twisted.web.http import RESPONSES
from twisted.web.server import version as SERVER_VERSION

from difydaemon.api import envelope
from difydaemon.api.pace import KEYED_PACE, PUBLIC_PACE, BodyPace
from difydaemon.api.paths import ENDPOINT_PREFIX, PathRefusal, RequestTarget, canonical_target
from difydaemon.errors import BadRequestError, UnauthorizedError

#: The request line's bound: Dify's paths are at most 4096 characters.
MAX_REQUEST_LINE = 8192
#: The whole head's bound (request line, headers, line ends): twisted.web's.
MAX_HEAD_SIZE = 16384
#: At most this many header lines: twisted.web's.
MAX_HEADERS = 500
#: Seconds from a request's first byte to the end of its head.  Dify sends
#: a head in one write; only a client trickling it (to hold connections
#: open) comes near.
HEAD_TIMEOUT = 10.0

#: What multipart framing and the small form fields may add to an upload.
MULTIPART_OVERHEAD = 1024 * 1024
#: A dispatch body's bound: the largest Dify sends are hex-encoded files
#: (``speech2text``: audio of at most 30 MB, so about 60 MB), and
#: base64 images for multimodal embeddings.
DISPATCH_BODY_LIMIT = 128 * 1024 * 1024
#: Any other request's body: management JSON is a few kilobytes.
OTHER_BODY_LIMIT = 1024 * 1024
#: ``/e/`` bodies read at most (``ENDPOINT_READ_LIMIT``); the plugin is
#: handed the first 10 MiB of them, as Go does.
ENDPOINT_READ_LIMIT = 16 * 1024 * 1024
#: A serverless plugin's backwards-invocation transaction: what the Go
#: daemon reads of one (it cuts the rest; here a longer one is a 413).
TRANSACTION_BODY_LIMIT = 6 * 1024 * 1024

_JSON = b"application/json; charset=utf-8"
_TEXT = b"text/plain; charset=utf-8"
_UPLOAD_ROUTES = {b"package", b"bundle"}
#: reason phrases twisted.web does not know (RFC 6585)
_REASONS = {431: b"Request Header Fields Too Large"}


@frozen
class Refused:
    """
    A request answered at its head, and its connection closed.

    :ivar status: the HTTP status.
    :ivar content_type: of the body.
    :ivar body: the answer.
    :ivar reason: why, for the log.
    """

    status: int
    content_type: bytes
    body: bytes
    reason: str


@define(slots=True)
class Admitted:
    """
    A request whose body may be read.

    Not frozen: one is built for every request, and nobody mutates it.

    :ivar target: its canonical target, what every router sees.
    :ivar body_limit: bytes of body it may have.
    :ivar oversize: the answer when a body of unannounced length goes over.
    :ivar pace: how slowly its body may arrive.
    """

    target: RequestTarget
    body_limit: int
    oversize: Refused
    pace: BodyPace


@lru_cache(maxsize=16)
def _too_large(limit: int) -> Refused:
    return Refused(
        413,
        _JSON,
        envelope.from_exception(BadRequestError(f"request body is larger than {limit} bytes")),
        "request body too large",
    )


#: A missing or wrong ``X-Api-Key``.
UNAUTHORIZED = Refused(401, _JSON, envelope.from_exception(UnauthorizedError("unauthorized")), "unauthorized")
#: An upload over its bound: Go's answer (HTTP 200, -400).
UPLOAD_TOO_LARGE = Refused(
    200, _JSON, envelope.from_exception(BadRequestError("file size exceeds the maximum limit")), "upload too large"
)
#: A request line over :data:`MAX_REQUEST_LINE`.
URI_TOO_LONG = Refused(414, _TEXT, b"request line too long\n", "request line too long")
#: A head over :data:`MAX_HEAD_SIZE` or :data:`MAX_HEADERS`.
HEADERS_TOO_LARGE = Refused(431, _TEXT, b"request header fields too large\n", "request head too large")
#: A head not complete within :data:`HEAD_TIMEOUT`.
HEAD_TIMED_OUT = Refused(408, _TEXT, b"request head not received in time\n", "request head timed out")
#: A body slower than its route's :class:`~difydaemon.api.pace.BodyPace`.
BODY_TIMED_OUT = Refused(408, _TEXT, b"request body not received in time\n", "request body too slow")
#: A head HTTP/1.1 does not allow, or one that two readers could frame
#: differently (a bare LF, a folded line, two lengths, a length and a
#: transfer coding), or a malformed chunked body.
BAD_REQUEST = Refused(
    400, _JSON, envelope.from_exception(BadRequestError("malformed HTTP request")), "malformed request"
)


def path_refused(refusal: PathRefusal) -> Refused:
    """The answer to a target :func:`~difydaemon.api.paths.canonical_target` refused."""
    if refusal.status == 404:
        return Refused(404, _JSON, envelope.ROUTE_NOT_FOUND, refusal.reason)
    body = envelope.from_exception(BadRequestError(f"bad request target: {refusal.reason}"))
    return Refused(refusal.status, _JSON, body, refusal.reason)


@frozen
class BodyLimits:
    """
    The bytes of body each kind of route may have (:data:`ROUTES` names them).

    :ivar package: ``/management/install/upload/package``.
    :ivar bundle: ``/management/install/upload/bundle``.
    :ivar dispatch: ``/plugin/<tenant>/dispatch/...``.
    :ivar endpoint: ``/e/...`` (``ENDPOINT_READ_LIMIT``).
    :ivar transaction: ``/backwards-invocation/transaction`` (serverless).
    :ivar other: everything else that takes a body.
    """

    package: int = 52428800 + MULTIPART_OVERHEAD
    bundle: int = 629145600 + MULTIPART_OVERHEAD
    dispatch: int = DISPATCH_BODY_LIMIT
    endpoint: int = ENDPOINT_READ_LIMIT
    transaction: int = TRANSACTION_BODY_LIMIT
    other: int = OTHER_BODY_LIMIT

    @classmethod
    def for_packages(cls, max_package_size: int, max_bundle_size: int, endpoint: int = ENDPOINT_READ_LIMIT) -> BodyLimits:
        """The limits for ``MAX_PLUGIN_PACKAGE_SIZE``, ``MAX_BUNDLE_PACKAGE_SIZE`` and ``ENDPOINT_READ_LIMIT``."""
        return cls(
            package=max_package_size + MULTIPART_OVERHEAD,
            bundle=max_bundle_size + MULTIPART_OVERHEAD,
            endpoint=endpoint,
        )


#: In a :class:`Route`'s segments: any one segment (a tenant id, say).
ANY = None


@frozen
class Route:
    """
    One line of :data:`ROUTES`: which requests it covers and how much body
    they may have.

    :ivar segments: the canonical path's first segments (:data:`ANY`
        matches any one).
    :ivar limit: a :class:`BodyLimits` field's name (configurable), or bytes.
    :ivar methods: the methods it covers; empty for every method.
    :ivar exact: the path is exactly ``segments``, not just starting with them.
    :ivar upload: an upload route: over its bound it answers Go's HTTP 200
        with -400 "file size exceeds the maximum limit" (``http-api.md`` §9).
    """

    segments: tuple
    limit: str | int
    methods: frozenset = frozenset()
    exact: bool = False
    upload: bool = False

    def covers(self, method: bytes, segments: tuple) -> bool:
        """Whether a request for ``segments`` with ``method`` falls under this line."""
        mine = self.segments
        if len(segments) < len(mine) or self.exact and len(segments) != len(mine):
            return False
        if self.methods and method not in self.methods:
            return False
        for wanted, segment in zip(mine, segments):
            if wanted is not ANY and wanted != segment:
                return False
        return True


_POST = frozenset({b"POST"})

#: Every route's body bound: the first line covering a request applies.
#: A route with its own bound joins with one line, above the catch-alls.
#: Requests under ``/plugin`` need ``X-Api-Key`` and their bodies get
#: :data:`~difydaemon.api.pace.KEYED_PACE`; the others are public and get
#: :data:`~difydaemon.api.pace.PUBLIC_PACE`.
ROUTES = (
    Route((b"plugin", ANY, b"dispatch"), "dispatch"),
    Route((b"plugin", ANY, b"management", b"install", b"upload", b"package"), "package", _POST, True, True),
    Route((b"plugin", ANY, b"management", b"install", b"upload", b"bundle"), "bundle", _POST, True, True),
    Route((ENDPOINT_PREFIX, ANY), "endpoint"),
    Route((b"backwards-invocation", b"transaction"), "transaction", _POST, True),
    # a route that takes no body: one would only be a way to make the daemon read
    # (GETs under /plugin may have one: an older Dify sends decode/from_identifier so)
    Route((b"health", b"check"), 0, exact=True),
    Route((), "other"),
)


@define(slots=True)
class _Policy:
    """What a :class:`Route` means under given :class:`BodyLimits`."""

    route: Route
    limit: int
    oversize: Refused


@frozen
class FrontDoor:
    """
    The checks every request passes once its head is read.

    :ivar server_key: the expected ``X-Api-Key`` (``SERVER_KEY``).
    :ivar limits: the body bounds.
    :ivar routes: the route table (:data:`ROUTES`).
    """

    server_key: bytes = field(repr=False)
    limits: BodyLimits = BodyLimits()
    routes: tuple = field(default=ROUTES, repr=False)
    _policies: tuple = field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        policies = []
        for route in self.routes:
            limit = getattr(self.limits, route.limit) if isinstance(route.limit, str) else route.limit
            oversize = UPLOAD_TOO_LARGE if route.upload else _too_large(limit)
            policies.append(_Policy(route, limit, oversize))
        object.__setattr__(self, "_policies", tuple(policies))

    def admit(self, method: bytes, target: bytes, api_key: bytes | None, content_length: int | None):
        """
        :param method: the request's method.
        :param target: the raw request target.
        :param api_key: the first ``X-Api-Key`` value, None without one.
        :param content_length: the declared body length; None when the body
            is chunked (counted as it arrives).
        :return: :class:`Admitted` or :class:`Refused`.
        """
        canonical = canonical_target(target)
        if type(canonical) is PathRefusal:
            return path_refused(canonical)
        return self.admit_target(method, canonical, api_key, content_length)

    def admit_target(self, method: bytes, target: RequestTarget, api_key: bytes | None, content_length: int | None):
        """:meth:`admit` for a target already in canonical form."""
        segments = target.segments
        if segments[0] == b"plugin":
            if not hmac.compare_digest(api_key or b"", self.server_key):
                return UNAUTHORIZED
            pace = KEYED_PACE
        else:
            pace = PUBLIC_PACE
        for policy in self._policies:
            if policy.route.covers(method, segments):
                break
        else:  # pragma: no cover - ROUTES ends with a catch-all
            raise AssertionError("no route covers " + repr(segments))
        if content_length is not None and content_length > policy.limit:
            return policy.oversize
        return Admitted(target, policy.limit, policy.oversize, pace)


def refusal_response(version: bytes, refused: Refused, date: bytes) -> bytes:
    """
    The bytes of a refusal: what twisted.web writes for such an answer,
    plus ``Connection: close`` (the body is left unread).

    :param version: the request's HTTP version (``HTTP/1.1`` when unknown).
    :param date: the ``Date`` header's value.
    """
    if version != b"HTTP/1.0":
        version = b"HTTP/1.1"
    return b"%s %d %s\r\nConnection: close\r\nServer: %s\r\nDate: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        version,
        refused.status,
        _REASONS.get(refused.status) or RESPONSES.get(refused.status, b"Unknown Status"),
        SERVER_VERSION,
        date,
        refused.content_type,
        len(refused.body),
        refused.body,
    )
