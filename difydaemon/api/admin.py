"""
The admin routes of the serverless platform (``serverless.md`` §6), under
``/admin`` when ``ADMIN_API_ENABLED`` is true, each behind
``X-Admin-Api-Key``.

- ``POST /admin/plugin/serverless/reinstall``: rebuild an identifier's
  function with a fresh launch (no reuse), as Server-Sent Events of
  ``info``/``error``/``done`` items, and point its runtime at the result;
- ``POST /admin/plugin/serverless/switch-endpoint``: point an identifier
  at another function (roll back to an earlier build).

On the local platform both answer an error envelope.
"""

from __future__ import annotations

import hmac

import orjson
from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger

from difydaemon.api import envelope
from difydaemon.errors import BadRequestError, DaemonError, InternalServerError, NotFoundError, UnauthorizedError
from difydaemon.packaging.identifier import parse_identifier
from difydaemon.runtimes.serverless.connector import FunctionInfo

log = Logger()

REINSTALL_FAILED_MESSAGE = "failed to reinstall plugin to serverless"
REINSTALLED_MESSAGE = "successfully reinstalled"
NOT_SERVERLESS_MESSAGE = "the serverless admin routes need PLATFORM=serverless"
_JSON = b"application/json; charset=utf-8"


def sse_item(event: str, text: str) -> bytes:
    """One reinstall progress item, in the success envelope Go wraps it in."""
    body = envelope.success({"event": event, "data": text})
    return b"data: " + body + b"\n\n"


def _params(request, *names: str) -> dict:
    try:
        body = orjson.loads(request.content.read() if request.content is not None else b"")
    except orjson.JSONDecodeError:
        raise BadRequestError("invalid JSON body") from None
    if not isinstance(body, dict):
        raise BadRequestError("invalid JSON body")
    values = {}
    for name in names:
        value = body.get(name)
        if not isinstance(value, str) or not value:
            raise BadRequestError(f"{name} is required")
        values[name] = value
    parse_identifier(values["plugin_unique_identifier"])
    return values


class AdminAPI:
    """
    :param admin_key: ``ADMIN_API_KEY``.
    :param persistence: an IPersistence.
    :param packages: the PackageRegistry (package bytes and declarations).
    :param registry: the RuntimeRegistry (its serverless runtimes are repointed).
    :param factory: the ServerlessRuntimeFactory, None on the local platform.
    """

    app = Klein()

    def __init__(self, admin_key: str, persistence, packages, registry, factory=None) -> None:
        self._key = admin_key.encode("utf-8")
        self._persistence = persistence
        self._packages = packages
        self._registry = registry
        self._factory = factory

    def resource(self):
        """The twisted.web resource of the routes (mounted at ``/admin``)."""
        return self.app.resource()

    def _check(self, request) -> None:
        given = request.getHeader(b"x-admin-api-key") or b""
        if not hmac.compare_digest(given, self._key):
            raise UnauthorizedError("unauthorized")
        if self._factory is None:
            raise BadRequestError(NOT_SERVERLESS_MESSAGE)

    def _repoint(self, identifier: str, function: FunctionInfo) -> None:
        runtime = self._registry.get(identifier)
        if runtime is not None and hasattr(runtime, "repoint"):
            runtime.repoint(function)

    @app.route("/admin/plugin/serverless/switch-endpoint", methods=["POST"])
    async def switch_endpoint(self, request):
        request.setHeader(b"content-type", _JSON)
        try:
            self._check(request)
            params = _params(request, "plugin_unique_identifier", "function_name", "function_url")
            identifier = params["plugin_unique_identifier"]
            row = await self._persistence.get_serverless_runtime(identifier)
            if row is None:
                raise NotFoundError(f"no serverless runtime for {identifier}")
            function = FunctionInfo(params["function_name"], params["function_url"])
            await self._persistence.upsert_serverless_runtime(identifier, function.url, function.name, row.checksum)
            self._repoint(identifier, function)
        except UnauthorizedError as exc:
            request.setResponseCode(401)
            return envelope.from_exception(exc)
        except DaemonError as exc:
            return envelope.from_exception(exc)
        log.info("serverless plugin {identifier} switched to {url}", identifier=identifier, url=function.url)
        return envelope.success(True)

    @app.route("/admin/plugin/serverless/reinstall", methods=["POST"])
    async def reinstall(self, request):
        try:
            self._check(request)
            identifier = _params(request, "plugin_unique_identifier")["plugin_unique_identifier"]
            declaration = await self._packages.declaration(identifier)
            if declaration is None:
                raise NotFoundError(f"plugin declaration of {identifier} not found")
            package = await self._packages.package_bytes(identifier)
        except UnauthorizedError as exc:
            request.setResponseCode(401)
            request.setHeader(b"content-type", _JSON)
            return envelope.from_exception(exc)
        except DaemonError as exc:
            request.setHeader(b"content-type", _JSON)
            return envelope.from_exception(exc)
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")

        def progress(text: str) -> None:
            if not request.finished:
                request.write(sse_item("info", text))

        try:
            function = await self._factory.deploy(identifier, declaration, package, progress, reuse=False)
        except CancelledError:
            raise
        except InternalServerError as exc:
            log.warn("reinstalling {identifier} failed: {why}", identifier=identifier, why=exc.message)
            return sse_item("error", f"{REINSTALL_FAILED_MESSAGE}: {exc.message}")
        except Exception:
            log.failure("reinstalling {identifier} failed", identifier=identifier)
            return sse_item("error", REINSTALL_FAILED_MESSAGE)
        self._repoint(identifier, function)
        return sse_item("done", REINSTALLED_MESSAGE)
