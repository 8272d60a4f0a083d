"""
Endpoint management (``http-api.md`` §2.5): setting up, changing, listing,
enabling, disabling and removing the endpoints of a tenant's plugins.

An endpoint is a public hook (``/e/<hook_id>/...``) bound to one plugin of
one tenant, with settings described by the ``endpoint.settings``
ProviderConfig list of the plugin's declaration.  Secret settings never
rest in clear: Dify encrypts them (``invoke/encrypt``, §8) with the
endpoint's id as identity before they are stored; lists decrypt and then
mask them, and an update that sends a secret back in its masked form keeps
the stored one.

The error texts and codes are the Go daemon's (``internal/service``), so
the console shows the same messages.
"""

from __future__ import annotations

from twisted.logger import Logger

from difydaemon.errors import (
    BadRequestError,
    DaemonError,
    InternalServerError,
    NotFoundError,
    PermissionDeniedError,
    PluginNotFoundError,
    UniqueIdentifierError,
)
from difydaemon.ids import new_id
from difydaemon.invocation.inner_api import InnerAPIError
from difydaemon.packaging.identifier import parse_identifier
from difydaemon.persistence.records import Endpoint

log = Logger()

#: the ``namespace`` of every ``invoke/encrypt`` call made for endpoints
ENCRYPT_NAMESPACE = "endpoint"
SECRET_INPUT = "secret-input"
#: ``settings`` with more fields than this are refused
MAX_SETTINGS = 64
PERMISSION_DENIED = "permission denied, you need to enable endpoint access in plugin manifest"
NO_ENDPOINT = "plugin does not have an endpoint"
#: What a listed endpoint of an uninstalled plugin carries as declaration.
#: (Go's struct has ``endpoint_files`` too, but never serializes it.)
EMPTY_DECLARATION = {"settings": [], "endpoints": []}

#: model-selector scopes and the keys each requires of the value
_MODEL_SCOPE_KEYS = {
    "all": (),
    "llm": (),
    "text-embedding": (),
    "rerank": ("score_threshold", "top_n"),
    "tts": ("voice",),
    "speech2text": (),
    "moderation": (),
    "vision": ("completion_params",),
}


class SettingsError(ValueError):
    """Settings break their ProviderConfig list; the text says how."""


def endpoint_group(declaration: dict | None) -> dict | None:
    """The ``endpoint`` part of a plugin declaration, or None."""
    if not isinstance(declaration, dict):
        return None
    group = declaration.get("endpoint")
    return group if isinstance(group, dict) else None


def setting_configs(group: dict) -> list:
    """The ProviderConfig dicts of an endpoint group's settings."""
    configs = group.get("settings")
    return [c for c in configs if isinstance(c, dict)] if isinstance(configs, list) else []


def allows_endpoints(declaration: dict) -> bool:
    """Whether the manifest grants ``resource.permission.endpoint.enabled``."""
    resource = declaration.get("resource")
    permission = resource.get("permission") if isinstance(resource, dict) else None
    endpoint = permission.get("endpoint") if isinstance(permission, dict) else None
    return isinstance(endpoint, dict) and endpoint.get("enabled") is True


def _secret_names(configs: list) -> set:
    return {c.get("name") for c in configs if c.get("type") == SECRET_INPUT}


def validate_settings(settings: dict, configs: list) -> None:
    """
    Check ``settings`` against ProviderConfigs as the Go daemon's
    ``ValidateProviderConfigs`` does: required fields present and not null,
    strings for text, secret and select fields (a select's value among its
    options), booleans for boolean fields, objects with their keys for app
    and model selectors.  Fields without a config pass.

    Configs are checked in declaration order (Go's map order is random, so
    which of several problems it names varies).

    :raises SettingsError: naming the first problem.
    """
    if len(settings) > MAX_SETTINGS:
        raise SettingsError("too many setting fields")
    by_name = {}
    for config in configs:
        by_name[config.get("name")] = config
    for name, config in by_name.items():
        value = settings.get(name)
        if value is None:
            if config.get("required") is True:
                raise SettingsError(f"missing required setting: {name}")
            continue
        kind = config.get("type")
        if kind in ("text-input", SECRET_INPUT, "select"):
            if not isinstance(value, str):
                raise SettingsError(f"setting {name} is not a string")
            if kind == "select":
                options = config.get("options") or []
                if not any(isinstance(o, dict) and o.get("value") == value for o in options):
                    raise SettingsError(f"setting {name} is not a valid option")
        elif kind == "boolean":
            if not isinstance(value, bool):
                raise SettingsError(f"setting {name} is not a boolean")
        elif kind == "app-selector":
            if not isinstance(value, dict):
                raise SettingsError(f"setting {name} is not a map")
            if "app_id" not in value:
                raise SettingsError(f"setting {name} is missing app_id")
        elif kind == "model-selector":
            if not isinstance(value, dict):
                raise SettingsError(f"setting {name} is not a map")
            for key in ("provider", "model", "model_type"):
                if key not in value:
                    raise SettingsError(f"setting {name} is missing {key}")
            scope = config.get("scope")
            if scope is not None:
                if scope not in _MODEL_SCOPE_KEYS:
                    raise SettingsError(f"setting {name} is not a valid model config scope")
                for key in _MODEL_SCOPE_KEYS[scope]:
                    if key not in value:
                        raise SettingsError(f"setting {name} is missing {key}")


def mask_secret(value: str) -> str:
    """
    The masked form of a secret: longer than 6 bytes -> first 2 bytes,
    ``*`` for each byte but 4, last 2 bytes; else all ``*``.  Counted in
    UTF-8 bytes, as Go slices strings (a split character becomes U+FFFD,
    as Go's JSON encoder writes it).
    """
    raw = value.encode("utf-8")
    if len(raw) > 6:
        return (raw[:2] + b"*" * (len(raw) - 4) + raw[-2:]).decode("utf-8", "replace")
    return "*" * len(raw)


def mask_settings(settings: dict, configs: list) -> dict:
    """A copy of ``settings`` with every secret-input string masked."""
    secrets = _secret_names(configs)
    return {
        name: mask_secret(value) if name in secrets and isinstance(value, str) else value
        for name, value in settings.items()
    }


def _same(a, b) -> bool:
    # Go compares interface values: the types must match too (True != 1)
    return type(a) is type(b) and a == b


def keep_masked_secrets(submitted: dict, original: dict, configs: list) -> dict:
    """
    ``submitted`` with every secret-input value that equals the masked form
    of the stored one replaced by the stored (decrypted) secret: the
    console sends back what it was shown when the user left it alone.
    """
    secrets = _secret_names(configs)
    masked = mask_settings(original, configs)
    merged = dict(submitted)
    for name, value in submitted.items():
        if name in secrets and name in masked and _same(masked[name], value):
            merged[name] = original[name]
    return merged


def endpoint_json(endpoint: Endpoint, settings: dict, declaration: dict) -> dict:
    """An endpoint as the list routes answer it (Go's ``models.Endpoint``)."""
    return {
        "id": endpoint.id,
        "created_at": endpoint.created_at,
        "updated_at": endpoint.updated_at,
        "name": endpoint.name,
        "hook_id": endpoint.hook_id,
        "tenant_id": endpoint.tenant_id,
        "user_id": endpoint.user_id,
        "plugin_id": endpoint.plugin_id,
        "expired_at": endpoint.expired_at,
        "enabled": endpoint.enabled,
        "settings": settings,
        "declaration": declaration,
    }


def declaration_json(group: dict) -> dict:
    """The EndpointProviderDeclaration fields Go serializes."""
    settings = group.get("settings")
    endpoints = group.get("endpoints")
    return {
        "settings": settings if isinstance(settings, list) else [],
        "endpoints": endpoints if isinstance(endpoints, list) else [],
    }


class Endpoints:
    """
    The operations behind ``/plugin/<tenant>/endpoint/...``.

    Each returns what the route answers (``True`` or a list) or raises a
    :class:`~difydaemon.errors.DaemonError` that becomes the envelope.

    :param reactor: for the clock (endpoint ids).
    :param persistence: an IPersistence.
    :param inner_api: has ``async encrypt(tenant_id, user_id, opt,
        namespace, identity, data, config) -> dict`` (a
        :class:`~difydaemon.invocation.inner_api.DifyInnerAPI`); it makes no
        call when ``config`` holds no secret-input field.
    :param declarations: the
        :class:`~difydaemon.management.declarations.DeclarationCache` that
        spares each public endpoint request a decode, if any.
    """

    def __init__(self, reactor, persistence, inner_api, declarations=None) -> None:
        self._reactor = reactor
        self._persistence = persistence
        self._inner_api = inner_api
        self._declarations = declarations

    async def declaration(self, plugin_unique_identifier: str) -> dict | None:
        """
        The declaration of an identifier: the stored one, else the one a
        debug plugin brought with it.
        """
        if self._declarations is not None:
            declaration = await self._declarations.value(plugin_unique_identifier)
        else:
            declaration = await self._persistence.get_declaration(plugin_unique_identifier)
        if declaration is None:
            plugin = await self._persistence.get_plugin(plugin_unique_identifier)
            declaration = plugin.remote_declaration if plugin is not None else None
        return declaration

    async def _crypt(self, what: str, tenant_id: str, user_id: str, opt: str, endpoint_id: str,
                     data: dict, configs: list) -> dict:
        try:
            return await self._inner_api.encrypt(
                tenant_id, user_id, opt, ENCRYPT_NAMESPACE, endpoint_id, data, configs
            )
        except (InnerAPIError, DaemonError) as exc:
            log.warn(
                "{what} of endpoint {endpoint_id} failed: {reason}",
                what=what, endpoint_id=endpoint_id, reason=exc.message,
            )
            raise InternalServerError(f"failed to {what}: {exc.message}") from None

    async def decrypt_settings(self, endpoint: Endpoint, configs: list, user_id: str = "") -> dict:
        """
        The endpoint's settings in clear.

        :raises InternalServerError: "failed to decrypt settings: ..."
        """
        return await self._crypt(
            "decrypt settings", endpoint.tenant_id, user_id, "decrypt", endpoint.id, endpoint.settings, configs
        )

    # -- setup, update, remove ------------------------------------------------

    async def setup(self, tenant_id: str, user_id: str, plugin_unique_identifier: str, name: str,
                    settings: dict) -> bool:
        """
        Create an endpoint of an installed plugin whose manifest allows
        endpoints, with validated and encrypted settings.

        Deviation: the Go daemon inserts the row first and encrypts after,
        so a failed encryption leaves an endpoint with empty settings; here
        the id is made first and the row is written only once the settings
        are encrypted.
        """
        identifier = parse_identifier(plugin_unique_identifier)
        installation = await self._persistence.get_installation(tenant_id, identifier.plugin_id)
        if installation is None or installation.plugin_unique_identifier != identifier.raw:
            raise PluginNotFoundError("plugin not found")
        declaration = await self.declaration(identifier.raw)
        if declaration is None:
            raise PluginNotFoundError("plugin not found")
        if not allows_endpoints(declaration):
            raise PermissionDeniedError(PERMISSION_DENIED)
        group = endpoint_group(declaration)
        if group is None:
            raise BadRequestError(NO_ENDPOINT)
        configs = setting_configs(group)
        try:
            validate_settings(settings, configs)
        except SettingsError as exc:
            raise BadRequestError(f"failed to validate settings: {exc}") from None
        endpoint_id = new_id(self._reactor.seconds())
        encrypted = await self._crypt(
            "encrypt settings", tenant_id, user_id, "encrypt", endpoint_id, settings, configs
        )
        await self._persistence.create_endpoint(
            endpoint_id, tenant_id, user_id, identifier.plugin_id, name, encrypted
        )
        return True

    async def _installed_declaration(self, installation) -> dict | None:
        """
        The declaration of an installation's package, or None when it is not
        stored (each caller answers that with Go's own text for its route).
        """
        try:
            identifier = parse_identifier(installation.plugin_unique_identifier)
        except UniqueIdentifierError as exc:
            raise UniqueIdentifierError(f"failed to parse plugin unique identifier: {exc.message}") from None
        return await self.declaration(identifier.raw)

    async def _installed_group(self, tenant_id: str, plugin_id: str) -> dict:
        installation = await self._persistence.get_installation(tenant_id, plugin_id)
        if installation is None:
            raise NotFoundError("failed to find plugin installation: record not found")
        declaration = await self._installed_declaration(installation)
        if declaration is None:
            raise PluginNotFoundError("plugin not found")
        group = endpoint_group(declaration)
        if group is None:
            raise BadRequestError(NO_ENDPOINT)
        return group

    async def update(self, tenant_id: str, user_id: str, endpoint_id: str, name: str, settings: dict) -> bool:
        """
        Rename an endpoint and replace its settings; secrets sent back
        masked keep their stored value.  Dify is asked afterwards to drop
        what it cached of the old settings.
        """
        endpoint = await self._persistence.get_endpoint(tenant_id, endpoint_id)
        if endpoint is None:
            raise NotFoundError("failed to find endpoint: record not found")
        group = await self._installed_group(tenant_id, endpoint.plugin_id)
        configs = setting_configs(group)
        original = await self.decrypt_settings(endpoint, configs, user_id)
        settings = keep_masked_secrets(settings, original, configs)
        try:
            validate_settings(settings, configs)
        except SettingsError as exc:
            raise BadRequestError(f"failed to validate settings: {exc}") from None
        encrypted = await self._crypt(
            "encrypt settings", tenant_id, user_id, "encrypt", endpoint.id, settings, configs
        )
        if await self._persistence.update_endpoint(tenant_id, endpoint.id, name, encrypted) is None:
            raise NotFoundError("failed to find endpoint: record not found")
        await self._crypt(
            "clear credentials cache", tenant_id, user_id, "clear", endpoint.id, settings, configs
        )
        return True

    async def remove(self, tenant_id: str, endpoint_id: str) -> bool:
        """
        Delete an endpoint.  (The Go daemon then asks Dify to clear its
        cache, but without the settings config, which makes that call a
        no-op; none is made here.)
        """
        if not await self._persistence.delete_endpoint(tenant_id, endpoint_id):
            raise InternalServerError("failed to remove endpoint: record not found")
        return True

    async def set_enabled(self, tenant_id: str, endpoint_id: str, enabled: bool) -> bool:
        """Enable or disable an endpoint (repeating is harmless)."""
        if await self._persistence.set_endpoint_enabled(tenant_id, endpoint_id, enabled) is None:
            raise NotFoundError("endpoint not found")
        return True

    # -- lists ------------------------------------------------------------------

    async def list_endpoints(self, tenant_id: str, offset: int, limit: int) -> list:
        """
        A page of the tenant's endpoints, newest first, settings decrypted
        then masked and the declaration's endpoint part attached; endpoints
        of plugins no longer installed get ``{}`` and an empty declaration.
        """
        endpoints = await self._persistence.list_endpoints(tenant_id, offset, limit)
        installations = await self._persistence.list_installations_by_plugin_ids(
            tenant_id, sorted({e.plugin_id for e in endpoints})
        )
        by_plugin = {i.plugin_id: i for i in installations}
        return [await self._listed(e, by_plugin.get(e.plugin_id)) for e in endpoints]

    async def list_plugin_endpoints(self, tenant_id: str, plugin_id: str, offset: int, limit: int) -> list:
        """
        :meth:`list_endpoints` of one plugin's endpoints; when there are any and the
        plugin is not installed, -404 (as the Go daemon, which looks the
        installation up once per endpoint).
        """
        endpoints = await self._persistence.list_plugin_endpoints(tenant_id, plugin_id, offset, limit)
        if not endpoints:
            return []
        installation = await self._persistence.get_installation(tenant_id, plugin_id)
        if installation is None:
            raise NotFoundError("failed to find plugin installation: record not found")
        return [await self._listed(e, installation) for e in endpoints]

    async def _listed(self, endpoint: Endpoint, installation) -> dict:
        if installation is None:
            return endpoint_json(endpoint, {}, dict(EMPTY_DECLARATION))
        declaration = await self._installed_declaration(installation)
        if declaration is None:
            raise InternalServerError("failed to get plugin declaration: record not found")
        group = endpoint_group(declaration)
        if group is None:
            raise NotFoundError(NO_ENDPOINT)
        configs = setting_configs(group)
        settings = await self.decrypt_settings(endpoint, configs)
        return endpoint_json(endpoint, mask_settings(settings, configs), declaration_json(group))
