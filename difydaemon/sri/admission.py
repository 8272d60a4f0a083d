"""
What the connector decides about a request once its head is read, before a
byte of its body (the daemon's front door, :mod:`difydaemon.api.admission`,
with the connector's rules):

- the ``Authorization`` header must equal ``SRI_API_KEY`` exactly (the
  daemon sends the key verbatim, no ``Bearer``), compared in constant
  time; otherwise 401, whatever the path, so nothing is learnt without it;
- the target is read in the daemon's canonical form
  (:func:`~difydaemon.api.paths.canonical_target`): encoded slashes, dot and
  empty segments cannot spell a route twice;
- a path that is no route answers 404, a method the route does not take 405;
- a launch body may hold a package of the configured size plus the
  multipart framing; any other body at most :data:`SMALL_BODY_LIMIT`.
  A declared ``Content-Length`` over the bound answers 413 at once; a
  chunked body (the daemon sends launches chunked) is counted as it arrives.

Pure: values in, a verdict out.
"""

from __future__ import annotations

import hmac

from attrs import field, frozen

from difydaemon.api.admission import MULTIPART_OVERHEAD, Admitted, Refused
from difydaemon.api.pace import KEYED_PACE
from difydaemon.api.paths import PathRefusal, canonical_target
from difydaemon.sri.wire import error_body

#: Bytes of body any request but a launch may have (they have none).
SMALL_BODY_LIMIT = 65536

_JSON = b"application/json; charset=utf-8"

PING = (b"ping",)
INSTANCES = (b"v1", b"runner", b"instances")
LAUNCH = (b"v1", b"launch")

#: The routes and the methods each takes.
ROUTES: dict[tuple[bytes, ...], frozenset[bytes]] = {
    PING: frozenset({b"GET", b"POST"}),
    INSTANCES: frozenset({b"GET", b"DELETE"}),
    LAUNCH: frozenset({b"POST"}),
}

#: A missing or wrong ``Authorization``.
UNAUTHORIZED = Refused(401, _JSON, error_body("unauthorized"), "unauthorized")
#: A path that names no route.
NOT_FOUND = Refused(404, _JSON, error_body("not found"), "no such route")
#: A route asked with a method it does not take.
METHOD_NOT_ALLOWED = Refused(405, _JSON, error_body("method not allowed"), "method not allowed")


def _too_large(limit: int) -> Refused:
    return Refused(413, _JSON, error_body(f"request body is larger than {limit} bytes"), "request body too large")


@frozen
class ConnectorFrontDoor:
    """
    The checks every connector request passes once its head is read.

    :ivar api_key: ``SRI_API_KEY``, encoded.
    :ivar max_package_size: the largest package a launch may carry.
    """

    api_key: bytes = field(repr=False)
    max_package_size: int

    def admit(self, method: bytes, target: bytes, api_key: bytes | None, content_length: int | None):
        """
        :param api_key: the first ``Authorization`` value, None without one.
        :param content_length: the declared body length; None when chunked.
        :return: :class:`~difydaemon.api.admission.Admitted` or
            :class:`~difydaemon.api.admission.Refused`.
        """
        if not hmac.compare_digest(api_key or b"", self.api_key):
            return UNAUTHORIZED
        canonical = canonical_target(target)
        if type(canonical) is PathRefusal:
            return Refused(canonical.status, _JSON, error_body(canonical.reason), canonical.reason)
        methods = ROUTES.get(canonical.segments)
        if methods is None:
            return NOT_FOUND
        if method not in methods:
            return METHOD_NOT_ALLOWED
        limit = self.max_package_size + MULTIPART_OVERHEAD if canonical.segments == LAUNCH else SMALL_BODY_LIMIT
        oversize = _too_large(limit)
        if content_length is not None and content_length > limit:
            return oversize
        return Admitted(target=canonical, body_limit=limit, oversize=oversize, pace=KEYED_PACE)
