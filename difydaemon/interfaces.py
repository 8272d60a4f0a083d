"""
Every zope Interface of the daemon.

Each has a real implementation and an in-memory one, and both pass the same
contract tests.  Methods documented as returning a Deferred are
asynchronous in every implementation, even the in-memory ones (which return
already-fired Deferreds).
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IObjectStorage(Interface):
    """
    A flat key -> bytes store ("OSS" in the Go daemon).

    Keys are ``/``-separated relative paths such as
    ``plugin_packages/acme/echo:0.0.1@<checksum>``; a key with an empty,
    ``.`` or ``..`` segment, a leading ``/`` or a backslash is refused with
    ``ValueError``.

    A store that cannot do what is asked (full, read-only, broken) fails
    with :class:`difydaemon.errors.ObjectStorageError` and leaves nothing
    of a failed ``save`` behind.
    """

    def save(key: str, data: bytes):
        """Store ``data`` under ``key``, replacing any value. Deferred[None]."""

    def load(key: str):
        """
        Deferred[bytes]; fails with
        :class:`difydaemon.errors.ObjectNotFoundError` if absent.
        """

    def exists(key: str):
        """Deferred[bool]."""

    def delete(key: str):
        """Remove ``key``; absent keys are not an error. Deferred[None]."""

    def list(prefix: str):
        """
        Deferred[list[str]]: every key below ``prefix`` (a directory-like
        prefix without trailing slash), sorted.
        """


class IPersistence(Interface):
    """
    The daemon's database (``http-api.md`` §5).

    Every method returns a Deferred.  Records are the frozen attrs classes of
    :mod:`difydaemon.persistence.records`.  Multi-row changes are atomic: a
    failure leaves nothing half-written.  A database server that cannot be
    reached fails a call with
    :class:`~difydaemon.errors.DatabaseUnavailableError`.
    """

    def migrate():
        """Apply every pending schema migration. Deferred[None]."""

    def close():
        """Release connections and threads. Deferred[None]."""

    # -- plugins, installations and provider projections -----------------

    def install_plugin(
        tenant_id: str,
        plugin_unique_identifier: str,
        plugin_id: str,
        runtime_type: str,
        source: str,
        meta: dict,
        providers: dict,
        remote_declaration: dict | None = None,
    ):
        """
        Install one plugin for one tenant, in one transaction (§5.4 step 5).

        Inserts the ``plugins`` row if absent (``install_type`` =
        ``runtime_type``), adds one to its ``refers``, inserts the
        ``plugin_installations`` row and one projection row per entry of
        ``providers`` (a mapping of provider kind -- ``tool``, ``model``,
        ``agent_strategy``, ``datasource``, ``trigger`` -- to provider
        name).

        Deferred[Installation]; fails with AlreadyInstalledError when the
        tenant already has an installation of ``plugin_id``.
        """

    def uninstall_plugin(tenant_id: str, installation_id: str):
        """
        Remove one installation (§5.5): ``refers`` minus one, the
        installation and the tenant's projection rows for its plugin_id go;
        when ``refers`` reaches zero the ``plugins`` row and its declaration
        go too.  Endpoints stay.

        Deferred[UninstallResult | None] (None if there was no such
        installation).
        """

    def upgrade_plugin(
        tenant_id: str,
        original_identifier: str,
        new_identifier: str,
        providers: dict,
        source: str,
        meta: dict,
    ):
        """
        Move a tenant's installation to another version (§5.6).

        Deferred[UpgradeResult]; fails with RecordNotFoundError when the
        tenant has no installation of ``original_identifier``.
        """

    def get_plugin(plugin_unique_identifier: str):
        """Deferred[PluginRecord | None]."""

    def list_plugins(install_type: str):
        """Deferred[list[PluginRecord]]: every plugin of that install type."""

    def get_installation(tenant_id: str, plugin_id: str):
        """Deferred[Installation | None]."""

    def get_installation_by_id(tenant_id: str, installation_id: str):
        """Deferred[Installation | None]."""

    def list_installations(tenant_id: str, offset: int, limit: int):
        """
        Deferred[tuple[list[Installation], int]]: a page, newest first, and
        the tenant's total count.
        """

    def list_installations_by_plugin_ids(tenant_id: str, plugin_ids: list):
        """Deferred[list[Installation]] for those plugin_ids (any order)."""

    def list_providers(kind: str, tenant_id: str, offset: int, limit: int):
        """
        Deferred[list[ProviderInstallation]]: a page of one projection
        table (``kind`` as in :meth:`install_plugin`), newest first.
        """

    def get_provider(kind: str, tenant_id: str, plugin_id: str):
        """Deferred[ProviderInstallation | None] of one plugin_id."""

    # -- declarations and readmes ---------------------------------------

    def save_declaration(plugin_unique_identifier: str, plugin_id: str, declaration: dict):
        """Insert the declaration if absent (duplicates ignored). Deferred[None]."""

    def get_declaration(plugin_unique_identifier: str):
        """Deferred[dict | None]."""

    def get_declarations(plugin_unique_identifiers: list):
        """Deferred[dict[str, dict]] of the ones that exist."""

    def delete_declaration(plugin_unique_identifier: str):
        """Deferred[None]."""

    def get_readmes(plugin_unique_identifier: str):
        """Deferred[dict[str, str]]: language -> content, maybe empty."""

    def save_readme(plugin_unique_identifier: str, language: str, content: str):
        """Deferred[None]."""

    # -- install tasks ------------------------------------------------------

    def create_task(task):
        """Insert an InstallTask (its id is set by the caller). Deferred[None]."""

    def update_task(task):
        """Replace the stored task with the same id. Deferred[None]."""

    def get_task(tenant_id: str, task_id: str):
        """Deferred[InstallTask | None]."""

    def list_tasks(tenant_id: str, offset: int, limit: int):
        """Deferred[list[InstallTask]], newest first."""

    def list_tasks_by_status(statuses: list):
        """Deferred[list[InstallTask]] of every tenant."""

    def delete_task(tenant_id: str, task_id: str):
        """Deferred[None]; absent tasks are not an error."""

    def delete_all_tasks(tenant_id: str):
        """Deferred[None]."""

    # -- remote debugging keys -------------------------------------------

    def get_or_create_debugging_key(tenant_id: str, new_key: str, ttl: float):
        """
        The tenant's debugging key, valid for ``ttl`` more seconds from now.

        A tenant has one key: an unexpired one is kept and its expiry moved
        to now + ``ttl``; when there is none, or it has expired, ``new_key``
        becomes the tenant's key.  Deferred[DebuggingKey].
        """

    def get_debugging_key(key: str):
        """
        Deferred[DebuggingKey | None]: the record of ``key`` if it exists
        and has not expired.
        """

    # -- endpoints (§2.5, §5.2) ---------------------------------------------
    #
    # ``settings`` are stored as given (already encrypted by Dify).  The
    # installation counters ``endpoints_setups`` / ``endpoints_active`` of
    # the endpoint's (tenant_id, plugin_id) move in the same transaction as
    # the endpoint row; a missing installation is not an error.

    def create_endpoint(endpoint_id: str, tenant_id: str, user_id: str, plugin_id: str, name: str, settings: dict):
        """
        Insert an enabled endpoint with a fresh random 16-character
        ``[a-z0-9]`` hook id, expiring 2050-01-01 UTC, and add one to both
        counters.  ``endpoint_id`` is the caller's (a UUIDv7): Dify encrypts
        the settings with it as identity before the row exists.
        Deferred[Endpoint].
        """

    def get_endpoint(tenant_id: str, endpoint_id: str):
        """Deferred[Endpoint | None]: one endpoint of a tenant."""

    def get_endpoint_by_hook_id(hook_id: str):
        """Deferred[Endpoint | None]: the endpoint a public hook id names."""

    def list_endpoints(tenant_id: str, offset: int, limit: int):
        """Deferred[list[Endpoint]]: a page of a tenant's endpoints, newest first."""

    def list_plugin_endpoints(tenant_id: str, plugin_id: str, offset: int, limit: int):
        """Deferred[list[Endpoint]]: a page of a tenant's endpoints of one plugin, newest first."""

    def update_endpoint(tenant_id: str, endpoint_id: str, name: str, settings: dict):
        """
        Replace an endpoint's name and settings.  Deferred[Endpoint | None]
        (the updated record; None when the tenant has no such endpoint).
        """

    def set_endpoint_enabled(tenant_id: str, endpoint_id: str, enabled: bool):
        """
        Enable or disable an endpoint; ``endpoints_active`` moves only when
        the state changes (so repeating is harmless).
        Deferred[Endpoint | None] (None when there is no such endpoint).
        """

    def delete_endpoint(tenant_id: str, endpoint_id: str):
        """
        Delete one endpoint of a tenant: ``endpoints_setups`` minus one,
        and ``endpoints_active`` minus one when it was enabled.
        Deferred[bool]: whether a row went.
        """

    # -- plugin key/value storage (§5.7) ------------------------------------
    #
    # Values are keyed by (tenant_id, plugin_id, key); ``key`` is stored as
    # given (the caller, difydaemon.invocation.storage, cleans and checks
    # it).  ``tenant_storages.size`` holds the byte total of a (tenant,
    # plugin).

    def storage_get(tenant_id: str, plugin_id: str, key: str):
        """Deferred[bytes | None]: the stored value, None if absent."""

    def storage_set(tenant_id: str, plugin_id: str, key: str, value: bytes, quota: int):
        """
        Store ``value`` under ``key``, replacing any value, in one
        transaction: the new total is the current total minus the old
        value's length plus ``len(value)``.  Over ``quota`` it fails with
        :class:`~difydaemon.errors.StorageQuotaExceededError` and nothing
        changes; otherwise the value and the total (its row created when
        absent) are written.  Deferred[None].
        """

    def storage_delete(tenant_id: str, plugin_id: str, key: str):
        """
        Remove ``key`` and take its length off the total.  Deferred[int]:
        how many values were deleted (0 or 1).
        """

    def storage_exists(tenant_id: str, plugin_id: str, key: str):
        """Deferred[bool]."""

    def storage_size(tenant_id: str, plugin_id: str):
        """Deferred[int]: the byte total of a (tenant, plugin), 0 if none."""


class IRuntimeLauncher(Interface):
    """
    The seam between install tasks and plugin runtimes.

    An install task calls :meth:`launch` after the package is stored and
    before the installation rows are written; the local runtime brings up a
    subprocess there, and the install succeeds only when it is ready.
    """

    runtime_type = Attribute("The runtime_type written on installations: local, serverless.")

    def launch(plugin_unique_identifier: str, declaration: dict, package: bytes, progress):
        """
        Make the plugin runnable.  ``progress(message)`` may be called with
        human-readable status lines while this runs.

        Deferred[None]; a failure's message names the step that failed.
        """

    def stop(plugin_unique_identifier: str):
        """
        Stop and forget the runtime of that identifier, draining sessions.
        Deferred[None]; unknown identifiers are not an error.
        """


class ISessionListener(Interface):
    """
    The receiver of one invocation session's messages (``runtimes.md`` §0.4).

    Exactly one of :meth:`end` or :meth:`error` is called, once, last; after
    it nothing else is delivered.
    """

    def stream(chunk: dict, raw: bytes):
        """
        One response chunk.  ``raw`` is the chunk's compact JSON bytes as the
        plugin sent them (so a relay can forward without re-encoding).
        """

    def invoke(request: dict):
        """A backwards invocation request (``{"type","backwards_request_id","request"}``)."""

    def end():
        """The plugin finished the session successfully."""

    def error(error_type: str, message: str, args: dict | None):
        """
        The session failed: the plugin's own ``error`` message, or a
        daemon-made one (``ConnectionClosedError`` when the instance died,
        ``PluginDaemonInternalServerError`` "killed by timeout", ...).
        """


class IPluginRuntime(Interface):
    """
    One runnable plugin identifier (local processes, a debug connection or
    a serverless function) that sessions can be opened on.
    """

    plugin_unique_identifier = Attribute("The identifier this runtime serves.")
    runtime_type = Attribute("local, remote or serverless.")
    declaration = Attribute(
        "The plugin's declaration (a dict): its resource.permission decides which backwards invocations it may make."
    )

    def is_ready():
        """True when a session can be opened now."""

    def open_session(session_id: str, request: dict, listener):
        """
        Write one request (the ``runtimes.md`` §0.2 object, as a dict with
        every key: session_id, conversation_id, message_id, app_id,
        endpoint_id, context, event, data) to the plugin and route its
        session messages to ``listener`` (an ISessionListener) until end or
        error.  Returns an object with ``close()`` that abandons the session
        (client went away).  Raises DaemonError if no instance can take it.
        """

    def send(session_id: str, message: dict):
        """
        Write one more daemon -> plugin message (a backwards_response) on
        the instance or connection that serves ``session_id``.
        """

    def stop(drain_timeout=None, reason=None):
        """
        Refuse new sessions, wait for open ones for at most
        ``drain_timeout`` seconds (None: the runtime's own limit), then
        stop everything. Deferred[None].  With a ``reason``, the sessions
        still open at the end of the wait fail with it (a -500 whose
        message is the reason) instead of being cut.  A stop while stopping
        may shorten the wait, never lengthen it.
        """
