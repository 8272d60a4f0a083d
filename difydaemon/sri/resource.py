"""
The connector's HTTP routes (``serverless.md`` §2, §9.1), behind
:class:`~difydaemon.sri.admission.ConnectorFrontDoor`, which has already
checked the key, the route, the method and the body's bound:

- ``POST|GET /ping``: ``"pong"``;
- ``GET /v1/runner/instances?filename=F``: the function of package ``F``, if any;
- ``POST /v1/launch``: the launch stream (always 200; a failure is a
  ``failed`` event, the stream's last);
- ``DELETE /v1/runner/instances?filename=F`` (our extension): stop and
  remove ``F``'s function: ``{"error": "", "removed": true|false}``.

Thin: parse, call the launcher, encode.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from difydaemon.api.multipart import MultipartError, read_form
from difydaemon.sri import wire
from difydaemon.sri.admission import INSTANCES, LAUNCH, PING
from difydaemon.sri.functions import STATE_STOPPED
from difydaemon.sri.launcher import FunctionLauncher, LaunchFailed

log = Logger()

_JSON = b"application/json; charset=utf-8"


def _filename(request) -> str | None:
    values = request.args.get(b"filename")
    if not values:
        return None
    return values[0].decode("utf-8", "replace")


class ConnectorResource(Resource):
    """
    Every route of the connector.

    :param launcher: the :class:`~difydaemon.sri.launcher.FunctionLauncher`.
    :param run_blocking: ``run_blocking(f, *args) -> Deferred``: reading a
        multipart body (tens of megabytes) runs off the reactor thread.
    :param max_package_size: the package bound.
    """

    isLeaf = True

    def __init__(self, launcher: FunctionLauncher, run_blocking: Callable[..., Deferred], max_package_size: int) -> None:
        super().__init__()
        self._launcher = launcher
        self._run_blocking = run_blocking
        self._max_package_size = max_package_size

    def render(self, request):
        admission = getattr(request, "admission", None)
        segments = admission.target.segments if admission is not None else None
        if segments == PING:
            request.setHeader(b"content-type", _JSON)
            return wire.PONG
        if segments == INSTANCES and request.method == b"GET":
            return self._instances(request)
        if segments == INSTANCES and request.method == b"DELETE":
            return self._remove(request)
        if segments == LAUNCH:
            return self._launch(request)
        # the front door admits nothing else
        request.setResponseCode(404)
        request.setHeader(b"content-type", _JSON)
        return wire.error_body("not found")

    def _instances(self, request) -> bytes:
        request.setHeader(b"content-type", _JSON)
        filename = _filename(request)
        if filename is None:
            request.setResponseCode(400)
            return wire.error_body("the filename query parameter is required")
        function = self._launcher.table.get(filename)
        if function is None or function.state == STATE_STOPPED:
            return wire.instances_body(())
        return wire.instances_body((function.item(),))

    def _remove(self, request):
        request.setHeader(b"content-type", _JSON)
        filename = _filename(request)
        if filename is None:
            request.setResponseCode(400)
            return wire.error_body("the filename query parameter is required")
        response = _Response(request)

        def removed(found: bool) -> None:
            log.info("function of {filename} removed on request: {found}", filename=filename, found=found)
            response.finish(json.dumps({"error": "", "removed": found}).encode("utf-8"))

        def failed(failure) -> None:
            log.failure("removing the function of {filename} failed", failure, filename=filename)
            request.setResponseCode(500)
            response.finish(wire.error_body("removing the function failed"))

        self._launcher.remove(filename).addCallbacks(removed, failed)
        return NOT_DONE_YET

    def _launch(self, request):
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        response = _Response(request)
        Deferred.fromCoroutine(self._stream_launch(request, response)).addErrback(
            lambda failure: (
                log.failure("the launch stream failed", failure),
                response.finish(wire.failed(wire.STAGE_END, "internal error").encode()),
            )
        )
        return NOT_DONE_YET

    async def _stream_launch(self, request, response: _Response) -> None:
        content_type = request.getHeader(b"content-type")
        try:
            form_data = await self._run_blocking(
                read_form,
                request.content,
                content_type.decode("latin-1") if content_type else None,
                "context",
                ("verified", "metadata"),
                self._max_package_size,
            )
            form = wire.launch_form(
                form_data.filenames.get("context"),
                form_data.files.get("context"),
                form_data.fields.get("verified"),
                form_data.fields.get("metadata"),
            )
        except (MultipartError, wire.LaunchRefused) as error:
            log.warn("refused a launch: {error}", error=str(error))
            response.finish(wire.failed(wire.STAGE_START, f"bad launch request: {error}").encode())
            return
        log.info("launching {filename}", filename=form.filename)
        try:
            function = await self._launcher.launch(form, lambda event: response.write(event.encode()))
        except LaunchFailed as error:
            log.warn("launch of {filename} failed at {stage}: {error}", filename=form.filename, stage=error.stage, error=error.message)
            response.finish(wire.failed(error.stage, error.message).encode())
            return
        spec = function.spec
        response.write(wire.launched(spec.endpoint, spec.name, spec.function_id).encode())
        response.finish(wire.finished().encode())


class _Response:
    """A response that may outlive its client: writes after a disconnect are dropped, and it is finished once."""

    def __init__(self, request) -> None:
        self._request = request
        self._gone = False
        self._finished = False
        request.notifyFinish().addErrback(self._lost)

    def _lost(self, _failure) -> None:
        self._gone = True

    def write(self, data: bytes) -> None:
        """Send ``data`` now, if the client is still there."""
        if not self._gone and not self._finished:
            self._request.write(data)

    def finish(self, data: bytes = b"") -> None:
        """Send ``data`` and end the response (once)."""
        if self._finished:
            return
        if data:
            self.write(data)
        self._finished = True
        if not self._gone:
            self._request.finish()
