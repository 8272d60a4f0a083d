"""
A fake SRI connector (``serverless.md`` §2, §9.1), for the serverless
runtime's tests: a Klein app answering ``ping``, ``instances`` and
``launch`` like the enterprise connector (and, when told to, ``dify-sri``'s
``DELETE`` extension), usable through ``StubTreq`` and
servable on a real loopback port (:meth:`FakeSRIConnector.listen`).

How a launch builds a function is a *launcher*: ``launcher(request,
emit) -> Deferred[FunctionInfo]``, where ``emit(stage, state, message)``
writes one progress line.  The connector then writes the ``run``/``success``
and ``end`` lines and lists the function under its package name; a failed
Deferred becomes a ``failed`` line with the failure's text.  The default
launcher answers at once with a function at ``function_base/<name>``;
:func:`scripted` replays raw lines (for hanging, trickling or lying
connectors); :class:`difydaemon.testing.serverless.SDKFunctionLauncher`
runs the real SDK.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import orjson
from attrs import frozen
from klein import Klein
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger

from difydaemon.api.multipart import MultipartError, parse_form
from difydaemon.runtimes.serverless.connector import FunctionInfo
from difydaemon.testing.http import LoopbackServing

log = Logger()

_FILENAME = re.compile(rb'name="context"; filename="([^"]*)"')


@frozen
class LaunchRequest:
    """One ``POST /v1/launch`` the fake received."""

    filename: str
    package: bytes
    verified: str
    metadata: dict
    authorization: str


def instant_launcher(function_base: str) -> Callable:
    """A launcher whose functions are ready at once at ``function_base/<name>``."""

    def launch(request: LaunchRequest, emit) -> Deferred:
        emit("build", "running", "building " + request.filename)
        name = "fn-" + request.filename.split("@")[-1][:12].replace(".difypkg", "")
        return succeed(FunctionInfo(name, f"{function_base.rstrip('/')}/{name}"))

    return launch


def scripted(lines: list[bytes], pause: float | None = None, reactor=None, then_hang: bool = False) -> Callable:
    """
    A launcher that writes ``lines`` (raw, each followed by ``\\n``), one
    every ``pause`` seconds on ``reactor`` (all at once when None), then
    ends the stream -- or never does, with ``then_hang``.  It never
    reports a function itself: the lines say whatever the test wants.
    """

    def launch(request: LaunchRequest, emit) -> Deferred:
        done: Deferred = Deferred(lambda d: _cancel(calls))
        calls: list = []

        def write(index: int) -> None:
            if index < len(lines):
                emit.raw(lines[index] + b"\n")
                if pause is None:
                    write(index + 1)
                else:
                    calls.append(reactor.callLater(pause, write, index + 1))
            elif not then_hang:
                done.callback(None)

        write(0)
        return done

    return launch


def _cancel(calls: list) -> None:
    for call in calls:
        if call.active():
            call.cancel()


class _Emitter:
    """Writes launch lines on one response."""

    def __init__(self, request) -> None:
        self._request = request
        self.open = True

    def __call__(self, stage: str, state: str, message: str) -> None:
        self.raw(b"data: " + orjson.dumps({"Stage": stage, "State": state, "Obj": "", "Message": message}) + b"\n\n")

    def raw(self, data: bytes) -> None:
        if self.open:
            self._request.write(data)


class FakeSRIConnector(LoopbackServing):
    """
    The fake connector (see the module docstring).

    :param reactor: serves :meth:`listen`.
    :param api_key: the only ``Authorization`` value accepted (verbatim).
    :param launcher: how launches build functions.

    :ivar supports_remove: whether ``DELETE /v1/runner/instances`` (the
        ``dify-sri`` extension) removes a function; False answers 405, as a
        connector without the route.
    :ivar removals: the file names every ``DELETE`` asked for.
    :ivar functions: package file name -> deployed :class:`FunctionInfo`.
    :ivar launches: every :class:`LaunchRequest`, oldest first.
    :ivar calls: ``(method, path, authorization)`` of every request.
    :ivar traceparents: the ``traceparent`` header of every request (None
        when it had none), in the order of ``calls``.

    :meth:`listen` serves it on a real port; :meth:`stop` is the "connector
    is down" case.
    """

    app = Klein()

    def __init__(self, reactor, api_key: str, launcher: Callable | None = None) -> None:
        self.reactor = reactor
        self.api_key = api_key
        self.launcher = launcher if launcher is not None else instant_launcher("http://127.0.0.1:9")
        self.functions: dict[str, FunctionInfo] = {}
        self.launches: list[LaunchRequest] = []
        self.calls: list[tuple[str, str, str]] = []
        self.traceparents: list[str | None] = []
        self.supports_remove = False
        self.removals: list[str] = []
        #: launch streams the client left before they ended
        self.abandoned = 0

    def resource(self):
        """The twisted.web resource of the fake."""
        return self.app.resource()

    def _authorized(self, request) -> bool:
        authorization = (request.getHeader(b"authorization") or b"").decode("latin-1")
        self.calls.append((request.method.decode(), request.path.decode(), authorization))
        traceparent = request.getHeader(b"traceparent")
        self.traceparents.append(traceparent.decode("latin-1") if traceparent is not None else None)
        if authorization == self.api_key:
            return True
        request.setResponseCode(401)
        request.setHeader(b"content-type", b"application/json")
        return False

    @app.route("/ping", methods=["POST", "GET"])
    def ping(self, request):
        if not self._authorized(request):
            return b'{"error":"unauthorized"}'
        request.setHeader(b"content-type", b"application/json")
        return b'"pong"'

    @app.route("/v1/runner/instances", methods=["GET"])
    def instances(self, request):
        if not self._authorized(request):
            return b'{"error":"unauthorized","Items":[]}'
        request.setHeader(b"content-type", b"application/json")
        filename = (request.args.get(b"filename") or [b""])[0].decode("utf-8", "replace")
        function = self.functions.get(filename)
        items = []
        if function is not None:
            items.append(
                {
                    "ID": function.name,
                    "Name": function.name,
                    "Endpoint": function.url,
                    "ResourceName": function.resource_name,
                    "Status": {"State": "running"},
                }
            )
        return orjson.dumps({"error": "", "Items": items})

    @app.route("/v1/runner/instances", methods=["DELETE"])
    def remove(self, request):
        if not self._authorized(request):
            return b'{"error":"unauthorized"}'
        filename = (request.args.get(b"filename") or [b""])[0].decode("utf-8", "replace")
        self.removals.append(filename)
        if not self.supports_remove:
            request.setResponseCode(405)
            return b"method not allowed"
        request.setHeader(b"content-type", b"application/json")
        return orjson.dumps({"error": "", "removed": self.functions.pop(filename, None) is not None})

    @app.route("/v1/launch", methods=["POST"])
    def launch(self, request):
        if not self._authorized(request):
            return b'{"error":"unauthorized"}'
        body = request.content.read() if request.content is not None else b""
        content_type = request.getHeader(b"content-type")
        try:
            form = parse_form(content_type.decode("latin-1") if content_type else None, body)
        except MultipartError as exc:
            request.setResponseCode(400)
            return str(exc).encode()
        found = _FILENAME.search(body)
        try:
            metadata = orjson.loads(form.fields.get("metadata") or b"{}")
        except orjson.JSONDecodeError:
            metadata = {}
        launch = LaunchRequest(
            filename=found.group(1).decode("utf-8", "replace") if found else "",
            package=form.files.get("context", b""),
            verified=_text(form.fields.get("verified")),
            metadata=metadata,
            authorization=(request.getHeader(b"authorization") or b"").decode("latin-1"),
        )
        self.launches.append(launch)
        request.setHeader(b"content-type", b"text/event-stream")
        emit = _Emitter(request)
        running = maybeDeferred(self.launcher, launch, emit)

        def gone(_) -> None:
            if emit.open:
                emit.open = False
                self.abandoned += 1
                running.cancel()

        request.notifyFinish().addErrback(gone)

        def built(function) -> None:
            if function is not None:
                self.functions[launch.filename] = function
                emit("run", "success", f"endpoint={function.url},name={function.name},id={function.name}")
                emit("end", "success", "")

        def failed(failure) -> None:
            if emit.open:
                emit("build", "failed", failure.getErrorMessage())

        def finish(_) -> None:
            if emit.open:
                emit.open = False
                request.finish()

        running.addCallbacks(built, failed)
        running.addBoth(finish)
        running.addErrback(lambda f: log.failure("fake connector launch", f))
        # fires with None once finish() has finished the response: Klein
        # then writes nothing more; if the client leaves, Klein cancels it
        return running


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)
