"""
What the daemon decides about a request as soon as its head is read, before
a byte of its body: the front door both HTTP stacks share (the dispatch
channel for the dispatch calls it serves, twisted.web for the rest).

:meth:`FrontDoor.admit` reads the target in its canonical form
(:mod:`difydaemon.api.paths`, the same form every router then sees),
checks ``X-Api-Key`` on ``/plugin/**`` and bounds the body by its route.
A refusal is answered at once and the connection closed, its body unread:

- a path the daemon does not route: 404 (or 400 when malformed), before the
  key check, which is moot then;
- a missing or wrong key: the 401 envelope (``http-api.md`` §1.2);
- a declared ``Content-Length`` over the route's bound: 413 with a -400
  envelope, except on the upload routes, which answer HTTP 200 with -400
  "file size exceeds the maximum limit" as Go does (``http-api.md`` §9).
  A chunked body is counted as it arrives against the same bound; on
  ``/e/`` the first 10 MiB are kept and the rest dropped, as Go does.

The head itself is bounded too (:data:`MAX_REQUEST_LINE`,
:data:`MAX_HEAD_SIZE`, :data:`MAX_HEADERS`, :data:`HEAD_TIMEOUT`), with the
answers of :data:`URI_TOO_LONG`, :data:`HEADERS_TOO_LARGE` and
:data:`HEAD_TIMED_OUT`.

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
from difydaemon.api.endpoint_http import MAX_BODY as ENDPOINT_BODY_LIMIT
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
    :ivar truncate: keep the first ``body_limit`` bytes and drop the rest
        (``/e/``) rather than refuse the request.
    :ivar oversize: the answer when a body of unannounced length goes over.
    """

    target: RequestTarget
    body_limit: int
    truncate: bool
    oversize: Refused


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


def path_refused(refusal: PathRefusal) -> Refused:
    """The answer to a target :func:`~difydaemon.api.paths.canonical_target` refused."""
    if refusal.status == 404:
        return Refused(404, _JSON, envelope.ROUTE_NOT_FOUND, refusal.reason)
    body = envelope.from_exception(BadRequestError(f"bad request target: {refusal.reason}"))
    return Refused(refusal.status, _JSON, body, refusal.reason)


@frozen
class BodyLimits:
    """
    The bytes of body each kind of route may have.

    :ivar package: ``/management/install/upload/package``.
    :ivar bundle: ``/management/install/upload/bundle``.
    :ivar dispatch: ``/plugin/<tenant>/dispatch/...``.
    :ivar endpoint: ``/e/...``: kept, the rest dropped.
    :ivar transaction: ``/backwards-invocation/transaction`` (serverless).
    :ivar other: everything else.
    """

    package: int = 52428800 + MULTIPART_OVERHEAD
    bundle: int = 629145600 + MULTIPART_OVERHEAD
    dispatch: int = DISPATCH_BODY_LIMIT
    endpoint: int = ENDPOINT_BODY_LIMIT
    transaction: int = TRANSACTION_BODY_LIMIT
    other: int = OTHER_BODY_LIMIT

    @classmethod
    def for_packages(cls, max_package_size: int, max_bundle_size: int) -> BodyLimits:
        """The limits for ``MAX_PLUGIN_PACKAGE_SIZE`` and ``MAX_BUNDLE_PACKAGE_SIZE``."""
        return cls(package=max_package_size + MULTIPART_OVERHEAD, bundle=max_bundle_size + MULTIPART_OVERHEAD)


@frozen
class FrontDoor:
    """
    The checks every request passes once its head is read.

    :ivar server_key: the expected ``X-Api-Key`` (``SERVER_KEY``).
    :ivar limits: the body bounds.
    """

    server_key: bytes = field(repr=False)
    limits: BodyLimits = BodyLimits()

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
        limits = self.limits
        truncate = False
        if segments[0] == b"plugin":
            if not hmac.compare_digest(api_key or b"", self.server_key):
                return UNAUTHORIZED
            route = segments[2:]
            if route[:1] == (b"dispatch",):
                limit, oversize = limits.dispatch, _too_large(limits.dispatch)
            elif (
                method == b"POST"
                and len(route) == 4
                and route[:3] == (b"management", b"install", b"upload")
                and route[3] in _UPLOAD_ROUTES
            ):
                limit = limits.package if route[3] == b"package" else limits.bundle
                oversize = UPLOAD_TOO_LARGE
            else:
                limit, oversize = limits.other, _too_large(limits.other)
        elif segments[0] == ENDPOINT_PREFIX:
            limit, oversize, truncate = limits.endpoint, _too_large(limits.endpoint), True
        elif segments[:2] == (b"backwards-invocation", b"transaction"):
            limit, oversize = limits.transaction, _too_large(limits.transaction)
        else:
            limit, oversize = limits.other, _too_large(limits.other)
        if content_length is not None and content_length > limit and not truncate:
            return oversize
        return Admitted(target, limit, truncate, oversize)


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
