"""
The daemon's root web resource: health, and the split between the lean
dispatch path, the public endpoints and the Klein management app, on the
canonical target the front door admitted.
"""

from __future__ import annotations

from attrs import frozen
from twisted.web.resource import Resource

from difydaemon.api import envelope
from difydaemon.api.admission import FrontDoor, Refused


class StaticJSONResource(Resource):
    """A leaf that answers one fixed JSON body with one status."""

    isLeaf = True

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__()
        self._status = status
        self._body = body

    def render(self, request):
        request.setResponseCode(self._status)
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        return self._body


@frozen
class BuildInfo:
    """What ``/health/check`` reports about this daemon."""

    version: str
    build_time: str
    platform: str


class RequestCounter:
    """Counts requests in flight, in all and on dispatch routes."""

    def __init__(self) -> None:
        self.active = 0
        self.active_dispatch = 0

    def enter(self, dispatch: bool) -> None:
        """One more request in flight."""
        self.active += 1
        if dispatch:
            self.active_dispatch += 1

    def leave(self, dispatch: bool) -> None:
        """One request fewer in flight (finished, or its client has gone)."""
        self.active -= 1
        if dispatch:
            self.active_dispatch -= 1

    def track(self, request, dispatch: bool) -> None:
        """Count a twisted.web ``request`` until it finishes."""
        self.enter(dispatch)
        request.notifyFinish().addBoth(lambda _: self.leave(dispatch))


class HealthResource(Resource):
    """
    ``GET /health/check``: raw JSON, no envelope (``http-api.md`` §2.1).

    ``status`` is ``ok`` (HTTP 200) only while the daemon serves; before
    (``starting``), after a failed start (``failed``) and during shutdown
    (``stopping``) the same body comes with HTTP 503.  A database outage
    does not change it: the daemon recovers by itself, answers what it
    can (dispatch to cached installations), and a restart would not help.

    :param status: ``() -> str``, the daemon's status.
    """

    isLeaf = True

    def __init__(self, info: BuildInfo, counter: RequestCounter, pool_status, status=lambda: "ok") -> None:
        super().__init__()
        self._info = info
        self._counter = counter
        self._pool_status = pool_status
        self._status = status

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json; charset=utf-8")
        status = self._status()
        if status != "ok":
            request.setResponseCode(503)
        return envelope.dumps(
            {
                "status": status,
                "pool_status": self._pool_status(),
                "version": self._info.version,
                "build_time": self._info.build_time,
                "platform": self._info.platform,
                "active_requests": self._counter.active,
                "active_dispatch_requests": self._counter.active_dispatch,
            }
        )


class RootResource(Resource):
    """
    Routes ``/health/check``, sends dispatch requests to the lean dispatch
    resource and public endpoint calls to the endpoint resource, and
    everything else to the Klein app (which answers unknown routes, and
    known routes called with another method, with the 404 body of §1.1).

    The daemon's site has admitted each request at its head (canonical
    target, ``X-Api-Key`` on ``/plugin/**``; see
    :mod:`difydaemon.api.admission`), and routes on that target.  A request
    that did not come through that front door (a plain twisted.web Site, as
    in tests) passes the same checks here, on the same canonical target.

    A wrong method answers the 404 body as Go does: ``/health/check`` is
    GET only, and HEAD is no GET here (werkzeug would answer it) -- only
    the public endpoints take HEAD.

    :param server_key: the expected ``X-Api-Key``.
    :param app: the Klein resource of the management surface.
    :param health: the health resource.
    :param counter: the in-flight request counter.
    :param dispatch: the resource under ``/plugin/<tenant>/dispatch/``.
    :param endpoint: the resource under ``/e/``.
    :param transaction: the resource under ``/backwards-invocation/``
        (serverless only).
    :param admin: the resource under ``/admin/`` (when the admin API is enabled).
    :param metrics: the resource of ``GET /metrics`` and ``/metrics/``
        (no key, as in Go); None answers them 404 (``PROMETHEUS_ENABLED=false``).
    """

    def __init__(
        self, server_key: str, app, health, counter: RequestCounter, dispatch=None, endpoint=None,
        transaction=None, admin=None, metrics=None,
    ):
        super().__init__()
        self._transaction = transaction
        self._admin = admin
        self._front_door = FrontDoor(server_key.encode("utf-8"))
        self._app = app
        self._health = health
        self._counter = counter
        self._dispatch = dispatch
        self._endpoint = endpoint
        self._metrics = metrics
        self._not_found = StaticJSONResource(404, envelope.ROUTE_NOT_FOUND)

    def getChildWithDefault(self, name, request):
        if getattr(request, "admission", None) is None:
            keys = request.requestHeaders.getRawHeaders(b"x-api-key")
            verdict = self._front_door.admit(request.method, request.uri, keys[0] if keys else None, None)
            if type(verdict) is Refused:
                return StaticJSONResource(verdict.status, verdict.body)
            segments = verdict.target.segments
            name = segments[0]
            request.prepath[-1:] = [name]
            request.postpath = list(segments[1:])
        postpath = request.postpath
        method = request.method
        if name == b"health" and postpath == [b"check"]:
            return self._health if method == b"GET" else self._not_found
        if name == b"metrics" and (not postpath or postpath == [b""]):
            # served on both: Go redirects /metrics to /metrics/, a scraper may name either
            if self._metrics is not None and method == b"GET":
                return self._metrics
            return self._not_found
        is_dispatch = name == b"plugin" and len(postpath) >= 2 and postpath[1] == b"dispatch"
        self._counter.track(request, is_dispatch)
        if name == b"e" and self._endpoint is not None:
            return self._endpoint
        if name == b"backwards-invocation" and self._transaction is not None:
            return self._transaction
        if name == b"admin" and self._admin is not None:
            # Klein routes from the top, as for the management app
            request.postpath.insert(0, request.prepath.pop())
            return self._admin
        if method == b"HEAD":
            return self._not_found
        if is_dispatch and self._dispatch is not None:
            return self._dispatch
        # give the whole path to Klein, which routes from the top
        request.postpath.insert(0, request.prepath.pop())
        return self._app

    def render(self, request):
        request.postpath.insert(0, b"")
        return self._app.render(request)
