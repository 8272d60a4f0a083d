"""
The management surface (``http-api.md`` §2.4, §2.8) as a Klein app.

Routes are thin: bind -> call the management classes -> encode.  They
answer HTTP 200 with the error inside the envelope, except binding failures
(HTTP 400), as the Go daemon does.
"""

from __future__ import annotations

import functools
import io

from klein import Klein
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from difydaemon.api import envelope
from difydaemon.api.binding import BindError, Field, bind, page_fields, page_offset, request_values
from difydaemon.api.multipart import FileTooLarge, MultipartError, read_form
from difydaemon.errors import BadRequestError, DaemonError, InternalServerError, PluginNotFoundError
from difydaemon.management import views
from difydaemon.packaging.declaration import category_of
from difydaemon.packaging.identifier import parse_identifier

log = Logger()

TAGS = frozenset(
    "search image videos weather finance design travel social news medical productivity "
    "education business entertainment utilities agent rag other trigger".split()
)
LANGUAGES = ("en_US", "zh_Hans", "ja_JP", "pt_BR")

# The widths of the columns that bound strings are stored in
# (persistence/migrations/0001_initial.sql): a longer value is refused as
# the validator's 'max' rather than failing in the database.
SOURCE_WIDTH = 63
USER_ID_WIDTH = 64
ENDPOINT_NAME_WIDTH = 127
TENANT_ID_WIDTH = 64
# the tenant_id path parameter: no NUL, no longer than its column
_TENANT_FIELDS = [Field("tenant_id", str, maximum=TENANT_ID_WIDTH)]


def _valid_identifier(value: str) -> bool:
    try:
        parse_identifier(value)
    except DaemonError:
        return False
    return True


def _identifier_list(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, str) and _valid_identifier(v) for v in values)


def _value(stored) -> dict:
    """The decoded declaration of a held :class:`Declaration`, else ``{}``."""
    return {} if stored is None else stored.value


def _json(request, body: bytes, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return body


def _needs_endpoints(route):
    """
    Answer gin's 404 for an endpoint route when the app was built without
    the endpoint service, before any binding.
    """

    @functools.wraps(route)
    def wrapper(self, request, *args, **kwargs):
        if self._endpoints is None:
            return _json(request, envelope.ROUTE_NOT_FOUND, 404)
        return route(self, request, *args, **kwargs)

    return wrapper


def _endpoint_page_fields() -> list[Field]:
    """
    ``page`` and ``page_size`` of the endpoint lists: Go only requires them
    non-zero, and ``page_size`` at most 100.
    """
    return [
        Field("page", int, required=True),
        Field("page_size", int, required=True, maximum=100),
    ]


def _endpoint_page(params: dict) -> tuple[int, int]:
    """
    (offset, limit) of an endpoint list page.  A negative page size means no
    limit and a negative offset none (as GORM builds the query).
    """
    size = params["page_size"]
    if size < 0:
        return 0, 1 << 31
    return page_offset(params["page"], size), size


def _raw_route_bug(request, route: str) -> bytes:
    """
    A route that answers raw bytes failed on a bug: the 500 envelope its
    other errors get, not Klein's HTML page.
    """
    log.failure("{route} route failed", route=route)
    return _json(request, envelope.from_exception(InternalServerError("internal server error")), 500)


def envelope_route(route_name: str, fields: list[Field] | None = None):
    """
    Wrap an ``async def handler(self, request, tenant_id, params, **kw)``:
    bind ``fields``, answer its result as a success envelope, a
    DaemonError as an HTTP 200 error envelope, a binding failure as 400.
    """

    def decorate(handler):
        @functools.wraps(handler)
        async def wrapper(self, request, tenant_id, **kwargs):
            try:
                bind(route_name, _TENANT_FIELDS, {"tenant_id": tenant_id})
                params = {}
                if fields is not None:
                    body = request.content.read() if request.content is not None else b""
                    values = request_values(
                        request.args,
                        request.getHeader(b"content-type") and request.getHeader(b"content-type").decode("latin-1"),
                        body,
                    )
                    params = bind(route_name, fields, values)
                result = await handler(self, request, tenant_id, params, **kwargs)
            except BindError as exc:
                return _json(request, envelope.from_exception(exc), 400)
            except DaemonError as exc:
                return _json(request, envelope.from_exception(exc))
            except CancelledError:
                # the client went away and Klein cancelled the handler: no bug, nobody to answer
                raise
            except Exception:
                log.failure("management route {route} failed", route=route_name)
                return _json(request, envelope.from_exception(InternalServerError("internal server error")))
            return _json(request, envelope.success(result))

        return wrapper

    return decorate


class TextURLResource(Resource):
    """
    The Klein app's resource, behind the one check Klein answers badly: a
    request whose percent-decoded path or whose host is not UTF-8 gets
    Klein's plain-text 400 and a logged traceback; here it gets the -400
    envelope of any other bad input, and a warning.

    :param app: the Klein resource.
    """

    isLeaf = True

    def __init__(self, app) -> None:
        super().__init__()
        self._app = app

    def render(self, request):
        try:
            b"/".join(request.prepath + request.postpath).decode("utf-8")
            request.getRequestHostname().decode("utf-8")
        except UnicodeDecodeError:
            log.warn("refused a request whose URL is not UTF-8: {uri!r}", uri=request.uri[:200])
            return _json(request, _URL_NOT_UTF8, 400)
        return self._app.render(request)


_URL_NOT_UTF8 = envelope.from_exception(BadRequestError("the request URL is not valid UTF-8"))


class ManagementAPI:
    """
    ``/plugin/<tenant_id>/management/...`` and the asset routes.

    :param packages: the PackageRegistry.
    :param installer: the Installer.
    :param persistence: an IPersistence (for the read-only queries).
    :param debugging: the DebuggingKeys, or None when remote debugging is
        disabled (the key route is then unknown, as in the Go daemon).
    :param endpoints: the :class:`~difydaemon.management.endpoints.Endpoints`
        behind ``/plugin/<tenant_id>/endpoint/...`` (those routes are
        unknown without it).
    :param runner: where an upload's multipart body is read (blocking work
        on tens of megabytes); the package registry's runner by default.
    """

    app = Klein()

    def __init__(self, packages, installer, persistence, debugging=None, endpoints=None, runner=None) -> None:
        self._packages = packages
        self._installer = installer
        self._persistence = persistence
        self._debugging = debugging
        self._endpoints = endpoints
        self._runner = runner if runner is not None or packages is None else packages.runner
        self._declarations = packages.declarations if packages is not None else None

    def resource(self):
        """The twisted.web resource of this app."""
        return TextURLResource(self.app.resource())

    # -- uploads and installs ---------------------------------------------

    @app.route("/plugin/<tenant_id>/management/install/upload/package", methods=["POST"])
    @envelope_route("UploadPluginRequest")
    async def upload_package(self, request, tenant_id, params):
        form = await self._form(request, "dify_pkg", self._packages.policy.max_size)
        data = form.files.get("dify_pkg")
        if data is None:
            raise BindError("Key: 'UploadPluginRequest.DifyPkg' Error:Field validation for 'DifyPkg' failed on the 'required' tag")
        verify = form.fields.get("verify_signature", "").lower() == "true"
        return await self._packages.upload(data, verify)

    @app.route("/plugin/<tenant_id>/management/install/upload/bundle", methods=["POST"])
    @envelope_route("UploadBundleRequest")
    async def upload_bundle(self, request, tenant_id, params):
        form = await self._form(request, "dify_bundle", self._packages.max_bundle_size)
        data = form.files.get("dify_bundle")
        if data is None:
            raise BindError("Key: 'UploadBundleRequest.DifyBundle' Error:Field validation for 'DifyBundle' failed on the 'required' tag")
        verify = form.fields.get("verify_signature", "").lower() == "true"
        return await self._packages.upload_bundle(data, verify)

    async def _form(self, request, file_field: str, max_file_size: int):
        """
        The upload's file and ``verify_signature``, read in a thread from
        the body twisted.web spooled as it arrived.
        """
        content_type = request.getHeader(b"content-type")
        content = request.content if request.content is not None else io.BytesIO()
        try:
            return await self._runner.run(
                read_form,
                content,
                content_type.decode("latin-1") if content_type else None,
                file_field,
                ("verify_signature",),
                max_file_size,
            )
        except FileTooLarge:
            raise BadRequestError("file size exceeds the maximum limit")
        except MultipartError as exc:
            raise BindError(str(exc))

    @app.route("/plugin/<tenant_id>/management/install/identifiers", methods=["POST"])
    @envelope_route(
        "InstallPluginFromIdentifiersRequest",
        [
            Field("plugin_unique_identifiers", list, required=True,
                  check=lambda v: len(v) <= 64 and _identifier_list(v), tag="max"),
            Field("source", str, required=True, maximum=SOURCE_WIDTH),
            Field("metas", list, default=None),
        ],
    )
    async def install_identifiers(self, request, tenant_id, params):
        identifiers = params["plugin_unique_identifiers"]
        metas = params["metas"]
        if metas is None:
            metas = [{} for _ in identifiers]
        metas = [m if isinstance(m, dict) else {} for m in metas] if len(metas) == len(identifiers) else metas
        return await self._installer.install_from_identifiers(tenant_id, identifiers, params["source"], metas)

    @app.route("/plugin/<tenant_id>/management/install/upgrade", methods=["POST"])
    @envelope_route(
        "UpgradePluginRequest",
        [
            Field("original_plugin_unique_identifier", str, required=True, check=_valid_identifier, tag="plugin_unique_identifier"),
            Field("new_plugin_unique_identifier", str, required=True, check=_valid_identifier, tag="plugin_unique_identifier"),
            Field("source", str, required=True, maximum=SOURCE_WIDTH),
            Field("meta", dict, default=None),
        ],
    )
    async def upgrade(self, request, tenant_id, params):
        return await self._installer.upgrade(
            tenant_id,
            params["original_plugin_unique_identifier"],
            params["new_plugin_unique_identifier"],
            params["source"],
            params["meta"] or {},
        )

    # -- tasks ------------------------------------------------------------

    @app.route("/plugin/<tenant_id>/management/install/tasks", methods=["GET"])
    @envelope_route("FetchPluginInstallationTasksRequest", page_fields())
    async def list_tasks(self, request, tenant_id, params):
        offset = page_offset(params["page"], params["page_size"])
        tasks = await self._persistence.list_tasks(tenant_id, offset, params["page_size"])
        return [views.task_json(t) for t in tasks]

    @app.route("/plugin/<tenant_id>/management/install/tasks/delete_all", methods=["POST"])
    @envelope_route("DeleteAllPluginInstallationTasks")
    async def delete_all_tasks(self, request, tenant_id, params):
        await self._persistence.delete_all_tasks(tenant_id)
        return True

    @app.route("/plugin/<tenant_id>/management/install/tasks/<task_id>", methods=["GET"])
    @envelope_route("FetchPluginInstallationTask")
    async def get_task(self, request, tenant_id, params, task_id):
        return views.task_json(await self._installer.get_task(tenant_id, task_id))

    @app.route("/plugin/<tenant_id>/management/install/tasks/<task_id>/delete", methods=["POST"])
    @envelope_route("DeletePluginInstallationTask")
    async def delete_task(self, request, tenant_id, params, task_id):
        await self._persistence.delete_task(tenant_id, task_id)
        return True

    @app.route(
        "/plugin/<tenant_id>/management/install/tasks/<task_id>/delete/<path:identifier>",
        methods=["POST"],
    )
    @envelope_route("DeletePluginInstallationItemFromTask")
    async def delete_task_item(self, request, tenant_id, params, task_id, identifier):
        return await self._installer.delete_task_item(tenant_id, task_id, identifier)

    # -- decode and fetch -------------------------------------------------

    @app.route("/plugin/<tenant_id>/management/decode/from_identifier", methods=["GET"])
    @envelope_route(
        "DecodePluginFromIdentifierRequest",
        [Field("plugin_unique_identifier", str, required=True, check=_valid_identifier, tag="plugin_unique_identifier")],
    )
    async def decode_from_identifier(self, request, tenant_id, params):
        return await self._packages.decode_stored(params["plugin_unique_identifier"])

    @app.route("/plugin/<tenant_id>/management/fetch/manifest", methods=["GET"])
    @envelope_route(
        "FetchPluginManifestRequest",
        [Field("plugin_unique_identifier", str, required=True, check=_valid_identifier, tag="plugin_unique_identifier")],
    )
    async def fetch_manifest(self, request, tenant_id, params):
        identifier = params["plugin_unique_identifier"]
        stored = await self._declarations.get(identifier)
        if stored is not None:
            return stored.fragment()
        plugin = await self._persistence.get_plugin(identifier)
        declaration = plugin.remote_declaration if plugin is not None else None
        if declaration is None:
            raise BadRequestError("plugin not found")
        return declaration

    @app.route("/plugin/<tenant_id>/management/fetch/identifier", methods=["GET"])
    @envelope_route(
        "FetchPluginIdentifierRequest",
        [Field("plugin_unique_identifier", str, required=True, check=_valid_identifier, tag="plugin_unique_identifier")],
    )
    async def fetch_identifier(self, request, tenant_id, params):
        return await self._persistence.get_plugin(params["plugin_unique_identifier"]) is not None

    @app.route("/plugin/<tenant_id>/management/fetch/readme", methods=["GET"])
    @envelope_route(
        "FetchPluginReadmeRequest",
        [
            Field("plugin_unique_identifier", str, required=True, check=_valid_identifier, tag="plugin_unique_identifier"),
            Field("language", str, default="en_US"),
        ],
    )
    async def fetch_readme(self, request, tenant_id, params):
        return await self._packages.readme(params["plugin_unique_identifier"], params["language"] or "en_US")

    # -- installations ----------------------------------------------------

    @app.route("/plugin/<tenant_id>/management/uninstall", methods=["POST"])
    @envelope_route("UninstallPluginRequest", [Field("plugin_installation_id", str, required=True)])
    async def uninstall(self, request, tenant_id, params):
        return await self._installer.uninstall(tenant_id, params["plugin_installation_id"])

    @app.route("/plugin/<tenant_id>/management/list", methods=["GET"])
    @envelope_route("ListPluginsRequest", page_fields())
    async def list_plugins(self, request, tenant_id, params):
        offset = page_offset(params["page"], params["page_size"])
        rows, total = await self._persistence.list_installations(tenant_id, offset, params["page_size"])
        declarations = await self._declarations.many([r.plugin_unique_identifier for r in rows])
        return {
            "list": [views.plugin_entity(r, declarations.get(r.plugin_unique_identifier)) for r in rows],
            "total": total,
        }

    async def _all_installations(self, tenant_id):
        rows, total = await self._persistence.list_installations(tenant_id, 0, 1 << 30)
        declarations = await self._declarations.many([r.plugin_unique_identifier for r in rows])
        return rows, declarations

    @app.route("/plugin/<tenant_id>/management/installation/ids", methods=["GET"])
    @envelope_route(
        "ListPluginInstallationIdsRequest",
        [Field("category", str, required=True, check=lambda v: v in views.CATEGORIES, tag="oneof")],
    )
    async def installation_ids(self, request, tenant_id, params):
        rows, declarations = await self._all_installations(tenant_id)
        ids = []
        for row in rows:
            declaration = _value(declarations.get(row.plugin_unique_identifier))
            if category_of(declaration) == params["category"] and row.plugin_id not in ids:
                ids.append(row.plugin_id)
        return {"plugin_ids": ids}

    @app.route("/plugin/<tenant_id>/management/installation/fetch/batch", methods=["POST"])
    @envelope_route(
        "BatchFetchPluginInstallationByIDsRequest",
        [Field("plugin_ids", list, required=True, check=lambda v: len(v) <= 256 and all(isinstance(x, str) for x in v), tag="max")],
    )
    async def installation_batch(self, request, tenant_id, params):
        rows = await self._persistence.list_installations_by_plugin_ids(tenant_id, params["plugin_ids"])
        rows = rows[:256]
        declarations = await self._declarations.many([r.plugin_unique_identifier for r in rows])
        return [views.installation_with_declaration(r, declarations.get(r.plugin_unique_identifier)) for r in rows]

    @app.route("/plugin/<tenant_id>/management/installation/missing", methods=["POST"])
    @envelope_route(
        "FetchMissingPluginInstallationsRequest",
        [Field("plugin_unique_identifiers", list, required=True, check=lambda v: len(v) <= 256 and _identifier_list(v), tag="max")],
    )
    async def installation_missing(self, request, tenant_id, params):
        wanted = [parse_identifier(v) for v in params["plugin_unique_identifiers"]]
        rows = await self._persistence.list_installations_by_plugin_ids(tenant_id, [w.plugin_id for w in wanted])
        by_plugin = {r.plugin_id: r.plugin_unique_identifier for r in rows}
        missing = []
        for ident in wanted:
            current = by_plugin.get(ident.plugin_id)
            if current is None:
                missing.append({"plugin_unique_identifier": ident.raw})
            elif current != ident.raw:
                missing.append({"plugin_unique_identifier": ident.raw, "current_identifier": current})
        return missing

    @app.route("/plugin/<tenant_id>/management/<category>/list", methods=["GET"])
    @envelope_route(
        "ListPluginsByCategoryRequest",
        page_fields()
        + [
            Field("query", str, default="", check=lambda v: len(v) <= 256, tag="max"),
            Field("tags", list, default=None),
            Field("language", str, default="en_US", check=lambda v: v in LANGUAGES, tag="oneof"),
        ],
    )
    async def list_by_category(self, request, tenant_id, params, category):
        if category not in views.CATEGORIES:
            raise BindError("invalid plugin category")
        tags = params["tags"]
        if tags is None:
            tags = [t.decode() for t in request.args.get(b"tags", [])]
        if len(tags) > 128 or any(t not in TAGS for t in tags):
            raise BindError("Key: 'ListPluginsByCategoryRequest.Tags' Error:Field validation for 'Tags' failed on the 'plugin_tag' tag")
        rows, declarations = await self._all_installations(tenant_id)
        matched = []
        for row in rows:
            stored = declarations.get(row.plugin_unique_identifier)
            declaration = _value(stored)
            if category_of(declaration) != category:
                continue
            if not views.matches_query(declaration, row.plugin_id, params["query"], params["language"]):
                continue
            if tags and not set(tags) & set(declaration.get("tags") or []):
                continue
            matched.append(views.plugin_entity(row, stored))
        start = (params["page"] - 1) * params["page_size"]
        page = matched[start : start + params["page_size"]]
        return {"list": page, "has_more": start + params["page_size"] < len(matched)}

    # -- providers --------------------------------------------------------

    async def _providers(self, kind, tenant_id, params):
        offset = page_offset(params["page"], params["page_size"])
        rows = await self._persistence.list_providers(kind, tenant_id, offset, params["page_size"])
        declarations = await self._declarations.many([r.plugin_unique_identifier for r in rows])
        return [views.provider_json(kind, r, declarations.get(r.plugin_unique_identifier)) for r in rows]

    async def _provider(self, kind, tenant_id, params):
        row = await self._persistence.get_provider(kind, tenant_id, params["plugin_id"])
        if row is None or row.provider != params["provider"]:
            raise PluginNotFoundError("plugin not found")
        declaration = await self._declarations.get(row.plugin_unique_identifier)
        return views.provider_json(kind, row, declaration)

    @app.route("/plugin/<tenant_id>/management/tools", methods=["GET"])
    @envelope_route("ListToolsRequest", page_fields())
    async def list_tools(self, request, tenant_id, params):
        return await self._providers("tool", tenant_id, params)

    @app.route("/plugin/<tenant_id>/management/tool", methods=["GET"])
    @envelope_route("GetToolRequest", [Field("plugin_id", str, required=True), Field("provider", str, required=True)])
    async def get_tool(self, request, tenant_id, params):
        return await self._provider("tool", tenant_id, params)

    @app.route("/plugin/<tenant_id>/management/tools/check_existence", methods=["POST"])
    @envelope_route(
        "CheckToolExistenceRequest",
        [Field("provider_ids", list, required=True, check=lambda v: all(isinstance(x, dict) and x.get("plugin_id") and x.get("provider_name") for x in v), tag="required")],
    )
    async def check_tools(self, request, tenant_id, params):
        answer = []
        for item in params["provider_ids"]:
            row = await self._persistence.get_provider("tool", tenant_id, item["plugin_id"])
            answer.append(row is not None and row.provider == item["provider_name"])
        return answer

    @app.route("/plugin/<tenant_id>/management/models", methods=["GET"])
    @envelope_route("ListModelsRequest", page_fields())
    async def list_models(self, request, tenant_id, params):
        return await self._providers("model", tenant_id, params)

    @app.route("/plugin/<tenant_id>/management/models/bindings", methods=["GET"])
    @envelope_route("ListModelBindingsRequest")
    async def model_bindings(self, request, tenant_id, params):
        rows = await self._persistence.list_providers("model", tenant_id, 0, 1 << 30)
        installations = await self._persistence.list_installations_by_plugin_ids(
            tenant_id, list({r.plugin_id for r in rows})
        )
        by_plugin = {i.plugin_id: i for i in installations}
        declarations = await self._declarations.many([r.plugin_unique_identifier for r in rows])
        seen = set()
        answer = []
        for row in rows:
            key = (row.plugin_id, row.provider)
            inst = by_plugin.get(row.plugin_id)
            if key in seen or inst is None:
                continue
            seen.add(key)
            declaration = _value(declarations.get(row.plugin_unique_identifier))
            answer.append(
                {
                    "provider": row.provider,
                    "installation_id": inst.id,
                    "plugin_id": row.plugin_id,
                    "plugin_unique_identifier": row.plugin_unique_identifier,
                    "runtime_type": inst.runtime_type,
                    "source": inst.source,
                    "version": parse_identifier(row.plugin_unique_identifier).version,
                    "verified": bool(declaration.get("verified")),
                }
            )
        return answer

    @app.route("/plugin/<tenant_id>/management/agent_strategies", methods=["GET"])
    @envelope_route("ListAgentStrategiesRequest", page_fields())
    async def list_agent_strategies(self, request, tenant_id, params):
        return await self._providers("agent_strategy", tenant_id, params)

    @app.route("/plugin/<tenant_id>/management/agent_strategy", methods=["GET"])
    @envelope_route("GetAgentStrategyRequest", [Field("plugin_id", str, required=True), Field("provider", str, required=True)])
    async def get_agent_strategy(self, request, tenant_id, params):
        return await self._provider("agent_strategy", tenant_id, params)

    @app.route("/plugin/<tenant_id>/management/datasources", methods=["GET"])
    @envelope_route("ListDatasourcesRequest", page_fields())
    async def list_datasources(self, request, tenant_id, params):
        return await self._providers("datasource", tenant_id, params)

    @app.route("/plugin/<tenant_id>/management/datasource", methods=["GET"])
    @envelope_route("GetDatasourceRequest", [Field("plugin_id", str, required=True), Field("provider", str, required=True)])
    async def get_datasource(self, request, tenant_id, params):
        return await self._provider("datasource", tenant_id, params)

    @app.route("/plugin/<tenant_id>/management/triggers", methods=["GET"])
    @envelope_route("ListTriggersRequest", page_fields())
    async def list_triggers(self, request, tenant_id, params):
        return await self._providers("trigger", tenant_id, params)

    @app.route("/plugin/<tenant_id>/management/trigger", methods=["GET"])
    @envelope_route("GetTriggerRequest", [Field("plugin_id", str, required=True), Field("provider", str, required=True)])
    async def get_trigger(self, request, tenant_id, params):
        return await self._provider("trigger", tenant_id, params)

    # -- assets -------------------------------------------------------------

    @app.route("/plugin/<tenant_id>/asset/<asset_id>", methods=["GET"])
    async def asset(self, request, tenant_id, asset_id):
        try:
            data = await self._packages.asset(asset_id)
        except DaemonError as exc:
            return _json(request, envelope.from_exception(exc), 500)
        except CancelledError:
            raise
        except Exception:
            return _raw_route_bug(request, "asset")
        request.setHeader(b"content-type", b"application/octet-stream")
        return data or b""

    @app.route("/plugin/<tenant_id>/extract-asset/", methods=["GET"])
    async def extract_asset(self, request, tenant_id):
        try:
            values = request_values(request.args, None, b"")
            params = bind(
                "ExtractPluginAssetRequest",
                [
                    Field("plugin_unique_identifier", str, required=True, check=_valid_identifier, tag="plugin_unique_identifier"),
                    Field("file_path", str, required=True),
                ],
                values,
            )
        except BindError as exc:
            return _json(request, envelope.from_exception(exc), 400)
        try:
            data = await self._packages.extract_asset(params["plugin_unique_identifier"], params["file_path"])
        except DaemonError as exc:
            return _json(request, envelope.from_exception(exc), 500)
        except CancelledError:
            raise
        except Exception:
            return _raw_route_bug(request, "extract-asset")
        request.setHeader(b"content-type", b"application/octet-stream")
        return data or b""

    # -- endpoints (§2.5) -------------------------------------------------------

    @app.route("/plugin/<tenant_id>/endpoint/setup", methods=["POST"])
    @_needs_endpoints
    @envelope_route(
        "SetupEndpointRequest",
        [
            Field("plugin_unique_identifier", str, required=True, check=_valid_identifier, tag="plugin_unique_identifier"),
            Field("user_id", str, required=True, maximum=USER_ID_WIDTH),
            Field("settings", dict, default=None),
            Field("name", str, required=True, maximum=ENDPOINT_NAME_WIDTH),
        ],
    )
    async def setup_endpoint(self, request, tenant_id, params):
        return await self._endpoints.setup(
            tenant_id, params["user_id"], params["plugin_unique_identifier"], params["name"], params["settings"] or {}
        )

    @app.route("/plugin/<tenant_id>/endpoint/list", methods=["GET"])
    @_needs_endpoints
    @envelope_route("ListEndpointsRequest", _endpoint_page_fields())
    async def list_endpoints(self, request, tenant_id, params):
        offset, limit = _endpoint_page(params)
        return await self._endpoints.list_endpoints(tenant_id, offset, limit)

    @app.route("/plugin/<tenant_id>/endpoint/list/plugin", methods=["GET"])
    @_needs_endpoints
    @envelope_route("ListPluginEndpointsRequest", [Field("plugin_id", str, required=True)] + _endpoint_page_fields())
    async def list_plugin_endpoints(self, request, tenant_id, params):
        offset, limit = _endpoint_page(params)
        return await self._endpoints.list_plugin_endpoints(tenant_id, params["plugin_id"], offset, limit)

    @app.route("/plugin/<tenant_id>/endpoint/update", methods=["POST"])
    @_needs_endpoints
    @envelope_route(
        "UpdateEndpointRequest",
        [
            Field("endpoint_id", str, required=True),
            Field("user_id", str, required=True, maximum=USER_ID_WIDTH),
            Field("settings", dict, default=None),
            Field("name", str, required=True, maximum=ENDPOINT_NAME_WIDTH),
        ],
    )
    async def update_endpoint(self, request, tenant_id, params):
        return await self._endpoints.update(
            tenant_id, params["user_id"], params["endpoint_id"], params["name"], params["settings"] or {}
        )

    @app.route("/plugin/<tenant_id>/endpoint/remove", methods=["POST"])
    @_needs_endpoints
    @envelope_route("RemoveEndpointRequest", [Field("endpoint_id", str, required=True)])
    async def remove_endpoint(self, request, tenant_id, params):
        return await self._endpoints.remove(tenant_id, params["endpoint_id"])

    @app.route("/plugin/<tenant_id>/endpoint/enable", methods=["POST"])
    @_needs_endpoints
    @envelope_route("EnableEndpointRequest", [Field("endpoint_id", str, required=True)])
    async def enable_endpoint(self, request, tenant_id, params):
        return await self._endpoints.set_enabled(tenant_id, params["endpoint_id"], True)

    @app.route("/plugin/<tenant_id>/endpoint/disable", methods=["POST"])
    @_needs_endpoints
    @envelope_route("DisableEndpointRequest", [Field("endpoint_id", str, required=True)])
    async def disable_endpoint(self, request, tenant_id, params):
        return await self._endpoints.set_enabled(tenant_id, params["endpoint_id"], False)

    # -- remote debugging -----------------------------------------------------

    @app.route("/plugin/<tenant_id>/debugging/key", methods=["POST"])
    async def debugging_key(self, request, tenant_id):
        if self._debugging is None:
            return _json(request, envelope.ROUTE_NOT_FOUND, 404)
        return await self._debugging_key(request, tenant_id)

    @envelope_route("GetDebuggingKeyRequest")
    async def _debugging_key(self, request, tenant_id, params):
        return {"key": await self._debugging.key_for(tenant_id)}


@ManagementAPI.app.handle_errors(NotFound, MethodNotAllowed)
def _route_not_found(self, request, failure):
    return _json(request, envelope.ROUTE_NOT_FOUND, 404)
