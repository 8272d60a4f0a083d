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

    def list_installations_by_runtime_type(runtime_type: str):
        """Deferred[list[Installation]]: every tenant's installations of that runtime type, oldest first."""

    def list_providers(kind: str, tenant_id: str, offset: int, limit: int):
        """
        Deferred[list[ProviderInstallation]]: a page of one projection
        table (``kind`` as in :meth:`install_plugin`), newest first.
        """

    def get_provider(kind: str, tenant_id: str, plugin_id: str):
        """Deferred[ProviderInstallation | None] of one plugin_id."""

    # -- declarations and readmes ---------------------------------------

    def save_declaration(plugin_unique_identifier: str, plugin_id: str, declaration):
        """
        Insert the declaration (a dict, or an ``orjson.Fragment`` of its
        JSON encoded already) if absent (duplicates ignored). Deferred[None].
        """

    def get_declaration(plugin_unique_identifier: str):
        """Deferred[dict | None]."""

    def get_declarations(plugin_unique_identifiers: list):
        """Deferred[dict[str, dict]] of the ones that exist."""

    def get_declarations_json(plugin_unique_identifiers: list, known=()):
        """
        Deferred[dict[str, bytes | None]] of the ones that exist: the stored
        JSON of each, or None for those in ``known`` (the caller holds them
        decoded already and only asks whether they are still stored).
        """

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

    # -- serverless functions (``serverless.md`` §4) --------------------------
    #
    # The row of an identifier goes with its ``plugins`` row (uninstall or
    # upgrade away when ``refers`` reaches zero), in the same transaction.

    def upsert_serverless_runtime(plugin_unique_identifier: str, function_url: str, function_name: str, checksum: str):
        """
        Record where the function of an identifier runs, replacing URL,
        name and checksum of an existing row (its id and created_at stay).
        Deferred[ServerlessRuntimeRecord].
        """

    def get_serverless_runtime(plugin_unique_identifier: str):
        """Deferred[ServerlessRuntimeRecord | None]."""

    def list_serverless_runtimes():
        """Deferred[list[ServerlessRuntimeRecord]], oldest first."""


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

    # Optional: ``invocation_session()`` -> the InvocationSession the
    # session serves (tenant, user, permissions), which a serverless runtime
    # records for the session's backwards transactions.

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



class IServerlessSessions(Interface):
    """
    The live sessions of serverless plugins, which a backwards-invocation
    transaction (``POST /backwards-invocation/transaction``) must name.

    A session is registered before its ``/invoke`` request is sent and
    forgotten when it ends; a registration also expires after its ttl (a
    replica that died cannot forget).  An implementation shared by
    replicas lets a transaction reach any of them.  Values are
    :class:`~difydaemon.runtimes.serverless.sessions.ServerlessSession`.
    """

    def register(session, ttl: float):
        """Record ``session`` as live for ``ttl`` seconds. Deferred[None]."""

    def lookup(session_id: str):
        """Deferred[ServerlessSession | None]: the live session of that id."""

    def forget(session_id: str):
        """Drop a session at once; unknown ids are not an error. Deferred[None]."""

# -- coordination between replicas (difydaemon.coordination) ------------------
#
# A single daemon uses the in-memory implementations; replicas sharing Redis
# use the Redis ones.  Names (keys, channels, lock names) are non-empty
# strings; values and messages are JSON (what comes back is what decoding
# the JSON text gives: a tuple comes back as a list).  ``ttl`` arguments are
# seconds (floats, > 0).  Every method returns a Deferred; while Redis is
# down the Redis implementations fail it at once with
# :class:`~difydaemon.errors.CoordinationUnavailableError`.  A value that
# is not JSON, an empty name or a bad ttl is refused with ``ValueError``
# before anything is written.


class IKeyValueStore(Interface):
    """
    Shared key -> JSON value store with expiry (session info, caches,
    debugging keys).
    """

    def get(key: str):
        """Deferred[object | None]: the value, None if absent or expired."""

    def set(key: str, value, ttl: float | None = None):
        """Store ``value``, replacing any; expires after ``ttl`` seconds (None: never). Deferred[None]."""

    def set_if_absent(key: str, value, ttl: float | None = None):
        """Store ``value`` only if ``key`` is absent. Deferred[bool]: whether it was stored."""

    def delete(key: str):
        """Deferred[bool]: whether a value went."""

    def touch(key: str, ttl: float):
        """Make ``key`` expire ``ttl`` seconds from now. Deferred[bool]: False if absent."""


class ISubscription(Interface):
    """One subscription made through :meth:`IPubSub.subscribe`."""

    channel = Attribute("The channel name, as given to subscribe.")

    def unsubscribe():
        """Stop delivering to this subscription. Deferred[None]; repeating is harmless."""


class IPubSub(Interface):
    """
    Broadcast of small JSON messages to every replica (cache invalidation).

    Delivery is at most once: a subscriber cut off from Redis loses what is
    published meanwhile.  It resubscribes by itself when Redis is back and
    then calls the subscription's ``on_missed()``, so that its user can
    throw away whatever the missed messages would have invalidated.
    Messages are delivered from the reactor, never inside ``publish``.
    """

    def publish(channel: str, message):
        """Send ``message`` to every subscriber of ``channel``. Deferred[None]."""

    def subscribe(channel: str, on_message, on_missed=None):
        """
        Call ``on_message(message)`` for every message published on
        ``channel`` from now on, and ``on_missed()`` (when given) each time
        the subscription is back after messages may have been lost.
        Deferred[ISubscription], fired once the subscription is active.
        """


class ILeaseService(Interface):
    """
    Fenced, owned leases (locks with an expiry).

    :meth:`acquire` returns a fencing token: an integer that grows with
    every acquisition of the same name, also across expiries, so whoever
    receives writes from lease holders can refuse one carrying a smaller
    token than it has already seen.  Only the current token renews or
    releases a lease; a lease not renewed within its ttl expires.
    :class:`difydaemon.coordination.leases.HeldLease` renews one in the
    background and tells its holder when it is lost.
    """

    def acquire(name: str, ttl: float):
        """Deferred[int | None]: the new lease's fencing token, None if the lease is held."""

    def renew(name: str, token: int, ttl: float):
        """Make the lease expire ``ttl`` seconds from now if ``token`` still holds it. Deferred[bool]."""

    def release(name: str, token: int):
        """Drop the lease if ``token`` still holds it. Deferred[bool]."""

    def holder(name: str):
        """Deferred[int | None]: the token holding the lease now, None if free."""


class IMembership(Interface):
    """
    The live replicas of a cluster, and which of them hold which plugin
    (debug plugins are connected to one replica).

    Entries expire by themselves after their ttl; readers only skip expired
    entries, they never delete them.  A node's
    :class:`~difydaemon.coordination.nodes.NodeInfo` is JSON-encoded.
    """

    def announce(node, ttl: float):
        """Record ``node`` (a NodeInfo) as live for ``ttl`` seconds. Deferred[None]."""

    def withdraw(node_id: str):
        """Forget a node at once. Deferred[None]."""

    def live_nodes():
        """Deferred[list[NodeInfo]]: nodes whose announcement has not expired, by node_id."""

    def claim_plugin(plugin_unique_identifier: str, node_id: str, ttl: float):
        """Record that ``node_id`` holds the plugin for ``ttl`` seconds. Deferred[None]."""

    def release_plugin(plugin_unique_identifier: str, node_id: str):
        """Drop that claim at once. Deferred[None]."""

    def plugin_holders(plugin_unique_identifier: str):
        """
        Deferred[list[NodeInfo]]: the live nodes with an unexpired claim on
        the plugin, by node_id.
        """


class IProcessTable(Interface):
    """
    What the kernel says about processes, and signals to whole process
    groups: what a plugin supervisor needs beyond its own child's pid.

    A plugin process leads a process group of its own (its id is the
    plugin's pid), so the group holds what the plugin spawned as well.
    """

    def state(pid: int):
        """
        The one-letter scheduler state of ``pid`` (``R`` running, ``S``
        sleeping, ``D`` disk wait, ``T`` stopped, ``t`` stopped by a
        tracer, ``Z`` zombie...), or None when there is no such process.
        """

    def signal_group(pgid: int, name: str) -> bool:
        """
        Send the signal ``name`` (``TERM``, ``KILL``, ``CONT``...) to every
        process of the group ``pgid``; False when the group has no process
        left.
        """
