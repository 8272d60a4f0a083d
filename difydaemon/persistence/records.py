"""
The rows of the daemon's tables as frozen value objects.

Timestamps are timezone-aware ``datetime`` objects in UTC; ids are UUIDv7
strings made by :func:`difydaemon.ids.new_id`.  JSON columns (``meta``,
``plugins`` of a task, declarations) come back as Python objects.
"""

from __future__ import annotations

from datetime import datetime

from attrs import field, frozen

#: provider kind -> projection table (``http-api.md`` §5.2)
PROVIDER_TABLES = {
    "tool": "tool_installations",
    "model": "ai_model_installations",
    "agent_strategy": "agent_strategy_installations",
    "datasource": "datasource_installations",
    "trigger": "trigger_installations",
}

TASK_PENDING = "pending"
TASK_RUNNING = "running"
TASK_SUCCESS = "success"
TASK_FAILED = "failed"


@frozen
class PluginRecord:
    """One installed identifier across all tenants (``plugins``)."""

    id: str
    created_at: datetime
    updated_at: datetime
    plugin_unique_identifier: str
    plugin_id: str
    refers: int
    install_type: str
    manifest_type: str
    remote_declaration: dict | None
    source: str


@frozen
class Installation:
    """A tenant's installation of one plugin_id (``plugin_installations``)."""

    id: str
    created_at: datetime
    updated_at: datetime
    tenant_id: str
    plugin_id: str
    plugin_unique_identifier: str
    runtime_type: str
    endpoints_setups: int
    endpoints_active: int
    source: str
    meta: dict


@frozen
class ProviderInstallation:
    """One row of a provider projection table (tools, models, ...)."""

    id: str
    created_at: datetime
    updated_at: datetime
    tenant_id: str
    provider: str
    plugin_unique_identifier: str
    plugin_id: str


@frozen
class InstallTaskPlugin:
    """The status of one plugin inside an install task."""

    plugin_unique_identifier: str
    plugin_id: str
    status: str
    message: str
    icon: str
    icon_dark: str
    labels: dict
    source: str


@frozen
class InstallTask:
    """An install or upgrade job of one tenant (``install_tasks``)."""

    id: str
    created_at: datetime
    updated_at: datetime
    status: str
    tenant_id: str
    total_plugins: int
    completed_plugins: int
    plugins: tuple = field(converter=tuple)


@frozen
class UninstallResult:
    """What an uninstall removed."""

    installation: Installation
    plugin_removed: bool


@frozen
class UpgradeResult:
    """What an upgrade changed."""

    installation: Installation
    original_plugin_removed: bool


@frozen
class DebuggingKey:
    """A tenant's remote debugging key (``debugging_keys``)."""

    tenant_id: str
    key: str
    expires_at: datetime


@frozen
class Endpoint:
    """
    A tenant's endpoint of one plugin (``endpoints``): the public hook
    ``/e/<hook_id>/...`` routes to.

    ``settings`` is stored as Dify encrypted it (secret-input values are
    ciphertext); it is only decrypted on the way to the plugin or to the
    masked listing.
    """

    id: str
    created_at: datetime
    updated_at: datetime
    name: str
    hook_id: str
    tenant_id: str
    user_id: str
    plugin_id: str
    expired_at: datetime
    enabled: bool
    settings: dict


@frozen
class ServerlessRuntimeRecord:
    """
    Where the serverless function of one identifier runs
    (``serverless_runtimes``, ``serverless.md`` §4).

    :ivar function_url: the base URL ``/invoke`` is joined onto.
    :ivar function_name: the connector's name of the function.
    :ivar type: always ``serverless``.
    :ivar checksum: the package checksum (the ``@...`` of the identifier).
    """

    id: str
    created_at: datetime
    updated_at: datetime
    plugin_unique_identifier: str
    function_url: str
    function_name: str
    type: str
    checksum: str
