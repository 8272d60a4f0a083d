"""
:class:`MemoryPersistence`: IPersistence in dictionaries, for unit tests of
the code above the database.  It passes the same contract tests as the SQL
implementations; every method returns an already-fired Deferred.
"""

from __future__ import annotations

import attrs
import orjson
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from difydaemon.errors import (
    AlreadyInstalledError,
    RecordNotFoundError,
    StorageQuotaExceededError,
)
from difydaemon.ids import new_id, utc_from_timestamp
from difydaemon.interfaces import IPersistence
from difydaemon.persistence.records import (
    PROVIDER_TABLES,
    DebuggingKey,
    Endpoint,
    Installation,
    InstallTask,
    PluginRecord,
    ProviderInstallation,
    ServerlessRuntimeRecord,
    UninstallResult,
    UpgradeResult,
)
from difydaemon.persistence.sql import (
    ENDPOINT_EXPIRES_AT,
    decode_task_plugins,
    encode_task_plugins,
    new_hook_id,
    provider_table,
)


def _copy_json(value):
    # what goes through a database comes back as a fresh object
    return None if value is None else orjson.loads(orjson.dumps(value))


def _newest_first(records):
    return sorted(records, key=lambda r: (r.created_at, r.id), reverse=True)


def _oldest_first(records):
    return sorted(records, key=lambda r: (r.created_at, r.id))


def _synchronously(method):
    def wrapper(*args, **kwargs) -> Deferred:
        try:
            return succeed(method(*args, **kwargs))
        except BaseException:
            return fail()

    wrapper.__name__ = method.__name__
    wrapper.__doc__ = method.__doc__
    return wrapper


@implementer(IPersistence)
class MemoryPersistence:
    """
    IPersistence in memory.

    :param reactor: anything with ``seconds()`` (a ``Clock`` or
        ``MemoryReactorClock`` in tests); stamps rows and ids.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._plugins = {}  # identifier -> PluginRecord
        self._installations = {}  # id -> Installation
        self._projections = {kind: {} for kind in PROVIDER_TABLES}  # kind -> id -> row
        self._declarations = {}  # identifier -> (plugin_id, JSON bytes)
        self._readmes = {}  # (identifier, language) -> content
        self._tasks = {}  # id -> InstallTask
        self._debugging_keys = {}  # tenant_id -> DebuggingKey
        self._storage_values = {}  # (tenant_id, plugin_id, key) -> bytes
        self._storage_totals = {}  # (tenant_id, plugin_id) -> bytes used
        self._endpoints = {}  # id -> Endpoint
        self._serverless = {}  # identifier -> ServerlessRuntimeRecord

    def _now(self) -> float:
        return self._reactor.seconds()

    @_synchronously
    def migrate(self):
        return None

    @_synchronously
    def close(self):
        return None

    # -- plugins and installations -------------------------------------

    def _find_installation(self, tenant_id, plugin_id):
        for installation in self._installations.values():
            if installation.tenant_id == tenant_id and installation.plugin_id == plugin_id:
                return installation
        return None

    def _add_refers(self, identifier, delta, moment):
        plugin = self._plugins[identifier]
        self._plugins[identifier] = attrs.evolve(
            plugin, refers=plugin.refers + delta, updated_at=moment
        )

    def _remove_plugin(self, identifier):
        self._plugins.pop(identifier, None)
        self._declarations.pop(identifier, None)
        self._serverless.pop(identifier, None)

    def _ensure_plugin(self, now, identifier, plugin_id, install_type, manifest_type, source,
                       remote_declaration):
        if identifier not in self._plugins:
            moment = utc_from_timestamp(now)
            self._plugins[identifier] = PluginRecord(
                id=new_id(now),
                created_at=moment,
                updated_at=moment,
                plugin_unique_identifier=identifier,
                plugin_id=plugin_id,
                refers=0,
                install_type=install_type,
                manifest_type=manifest_type,
                remote_declaration=_copy_json(remote_declaration),
                source=source,
            )

    def _set_projections(self, now, tenant_id, identifier, plugin_id, providers):
        for rows in self._projections.values():
            for row_id in [
                row_id for row_id, row in rows.items()
                if row.tenant_id == tenant_id and row.plugin_id == plugin_id
            ]:
                del rows[row_id]
        moment = utc_from_timestamp(now)
        for kind, provider in providers.items():
            row = ProviderInstallation(
                id=new_id(now),
                created_at=moment,
                updated_at=moment,
                tenant_id=tenant_id,
                provider=provider,
                plugin_unique_identifier=identifier,
                plugin_id=plugin_id,
            )
            self._projections[kind][row.id] = row

    @_synchronously
    def install_plugin(self, tenant_id, plugin_unique_identifier, plugin_id, runtime_type,
                       source, meta, providers, remote_declaration=None):
        # check everything before writing anything: that is the transaction
        for kind in providers:
            provider_table(kind)
        if self._find_installation(tenant_id, plugin_id) is not None:
            raise AlreadyInstalledError("plugin already installed")
        now = self._now()
        moment = utc_from_timestamp(now)
        identifier = plugin_unique_identifier
        self._ensure_plugin(now, identifier, plugin_id, runtime_type, "", source, None)
        if remote_declaration is not None:
            self._plugins[identifier] = attrs.evolve(
                self._plugins[identifier], remote_declaration=_copy_json(remote_declaration)
            )
        self._add_refers(identifier, 1, moment)
        installation = Installation(
            id=new_id(now),
            created_at=moment,
            updated_at=moment,
            tenant_id=tenant_id,
            plugin_id=plugin_id,
            plugin_unique_identifier=identifier,
            runtime_type=runtime_type,
            endpoints_setups=0,
            endpoints_active=0,
            source=source,
            meta=_copy_json(meta),
        )
        self._installations[installation.id] = installation
        self._set_projections(now, tenant_id, identifier, plugin_id, providers)
        return attrs.evolve(installation, meta=_copy_json(meta))

    @_synchronously
    def uninstall_plugin(self, tenant_id, installation_id):
        installation = self._installations.get(installation_id)
        if installation is None or installation.tenant_id != tenant_id:
            return None
        del self._installations[installation_id]
        self._set_projections(self._now(), tenant_id, None, installation.plugin_id, {})
        identifier = installation.plugin_unique_identifier
        removed = False
        plugin = self._plugins.get(identifier)
        if plugin is not None:
            if plugin.refers - 1 <= 0:
                self._remove_plugin(identifier)
                removed = True
            else:
                self._add_refers(identifier, -1, utc_from_timestamp(self._now()))
        return UninstallResult(installation=installation, plugin_removed=removed)

    @_synchronously
    def upgrade_plugin(self, tenant_id, original_identifier, new_identifier, providers,
                       source, meta):
        for kind in providers:
            provider_table(kind)
        old = next(
            (
                i for i in self._installations.values()
                if i.tenant_id == tenant_id and i.plugin_unique_identifier == original_identifier
            ),
            None,
        )
        if old is None:
            raise RecordNotFoundError()
        now = self._now()
        moment = utc_from_timestamp(now)
        self._ensure_plugin(
            now, new_identifier, old.plugin_id, old.runtime_type, "plugin", source, None
        )
        self._add_refers(new_identifier, 1, moment)
        removed = False
        if original_identifier in self._plugins:
            self._add_refers(original_identifier, -1, moment)
            if (original_identifier != new_identifier
                    and self._plugins[original_identifier].refers <= 0):
                self._remove_plugin(original_identifier)
                removed = True
        installation = attrs.evolve(
            old, plugin_unique_identifier=new_identifier, source=source,
            meta=_copy_json(meta), updated_at=moment,
        )
        self._installations[old.id] = installation
        self._set_projections(now, tenant_id, new_identifier, old.plugin_id, providers)
        return UpgradeResult(installation=installation, original_plugin_removed=removed)

    @_synchronously
    def get_plugin(self, plugin_unique_identifier):
        return self._plugins.get(plugin_unique_identifier)

    @_synchronously
    def list_plugins(self, install_type):
        return _oldest_first(p for p in self._plugins.values() if p.install_type == install_type)

    @_synchronously
    def get_installation(self, tenant_id, plugin_id):
        return self._find_installation(tenant_id, plugin_id)

    @_synchronously
    def get_installation_by_id(self, tenant_id, installation_id):
        installation = self._installations.get(installation_id)
        if installation is None or installation.tenant_id != tenant_id:
            return None
        return installation

    @_synchronously
    def list_installations(self, tenant_id, offset, limit):
        mine = _newest_first(i for i in self._installations.values() if i.tenant_id == tenant_id)
        return mine[offset:offset + limit], len(mine)

    @_synchronously
    def list_installations_by_plugin_ids(self, tenant_id, plugin_ids):
        wanted = set(plugin_ids)
        return [
            i for i in self._installations.values()
            if i.tenant_id == tenant_id and i.plugin_id in wanted
        ]

    @_synchronously
    def list_installations_by_runtime_type(self, runtime_type):
        return _oldest_first(i for i in self._installations.values() if i.runtime_type == runtime_type)

    @_synchronously
    def list_providers(self, kind, tenant_id, offset, limit):
        provider_table(kind)
        mine = _newest_first(
            row for row in self._projections[kind].values() if row.tenant_id == tenant_id
        )
        return mine[offset:offset + limit]

    @_synchronously
    def get_provider(self, kind, tenant_id, plugin_id):
        provider_table(kind)
        mine = _newest_first(
            row for row in self._projections[kind].values()
            if row.tenant_id == tenant_id and row.plugin_id == plugin_id
        )
        return mine[0] if mine else None

    # -- declarations and readmes ---------------------------------------

    @_synchronously
    def save_declaration(self, plugin_unique_identifier, plugin_id, declaration):
        self._declarations.setdefault(
            plugin_unique_identifier, (plugin_id, orjson.dumps(declaration))
        )

    @_synchronously
    def get_declaration(self, plugin_unique_identifier):
        found = self._declarations.get(plugin_unique_identifier)
        return None if found is None else orjson.loads(found[1])

    @_synchronously
    def get_declarations(self, plugin_unique_identifiers):
        return {
            identifier: orjson.loads(self._declarations[identifier][1])
            for identifier in plugin_unique_identifiers
            if identifier in self._declarations
        }

    @_synchronously
    def get_declarations_json(self, plugin_unique_identifiers, known=()):
        known = frozenset(known)
        return {
            identifier: None if identifier in known else self._declarations[identifier][1]
            for identifier in plugin_unique_identifiers
            if identifier in self._declarations
        }

    @_synchronously
    def delete_declaration(self, plugin_unique_identifier):
        self._declarations.pop(plugin_unique_identifier, None)

    @_synchronously
    def get_readmes(self, plugin_unique_identifier):
        return {
            language: content
            for (identifier, language), content in self._readmes.items()
            if identifier == plugin_unique_identifier
        }

    @_synchronously
    def save_readme(self, plugin_unique_identifier, language, content):
        self._readmes[(plugin_unique_identifier, language)] = content

    # -- install tasks ----------------------------------------------------

    @staticmethod
    def _stored(task: InstallTask) -> InstallTask:
        return attrs.evolve(task, plugins=decode_task_plugins(encode_task_plugins(task.plugins)))

    @_synchronously
    def create_task(self, task):
        if task.id in self._tasks:
            raise ValueError(f"task {task.id} exists")
        self._tasks[task.id] = self._stored(task)

    @_synchronously
    def update_task(self, task):
        old = self._tasks.get(task.id)
        if old is None:
            return
        self._tasks[task.id] = self._stored(attrs.evolve(
            old,
            status=task.status,
            total_plugins=task.total_plugins,
            completed_plugins=task.completed_plugins,
            plugins=task.plugins,
            updated_at=utc_from_timestamp(self._now()),
        ))

    @_synchronously
    def get_task(self, tenant_id, task_id):
        task = self._tasks.get(task_id)
        return task if task is not None and task.tenant_id == tenant_id else None

    @_synchronously
    def list_tasks(self, tenant_id, offset, limit):
        mine = _newest_first(t for t in self._tasks.values() if t.tenant_id == tenant_id)
        return mine[offset:offset + limit]

    @_synchronously
    def list_tasks_by_status(self, statuses):
        wanted = set(statuses)
        return _oldest_first(t for t in self._tasks.values() if t.status in wanted)

    @_synchronously
    def delete_task(self, tenant_id, task_id):
        task = self._tasks.get(task_id)
        if task is not None and task.tenant_id == tenant_id:
            del self._tasks[task_id]

    @_synchronously
    def delete_all_tasks(self, tenant_id):
        for task_id in [t.id for t in self._tasks.values() if t.tenant_id == tenant_id]:
            del self._tasks[task_id]

    # -- remote debugging keys --------------------------------------------

    @_synchronously
    def get_or_create_debugging_key(self, tenant_id, new_key, ttl):
        now = self._now()
        old = self._debugging_keys.get(tenant_id)
        key = new_key
        if old is not None and old.expires_at > utc_from_timestamp(now):
            key = old.key
        record = DebuggingKey(
            tenant_id=tenant_id, key=key, expires_at=utc_from_timestamp(now + ttl)
        )
        self._debugging_keys[tenant_id] = record
        return record

    @_synchronously
    def get_debugging_key(self, key):
        now = utc_from_timestamp(self._now())
        for record in self._debugging_keys.values():
            if record.key == key and record.expires_at > now:
                return record
        return None

    # -- plugin key/value storage -------------------------------------------

    @_synchronously
    def storage_get(self, tenant_id, plugin_id, key):
        return self._storage_values.get((tenant_id, plugin_id, key))

    @_synchronously
    def storage_set(self, tenant_id, plugin_id, key, value, quota):
        value = bytes(value)
        old = self._storage_values.get((tenant_id, plugin_id, key))
        total = self._storage_totals.get((tenant_id, plugin_id), 0)
        new_total = total - (0 if old is None else len(old)) + len(value)
        # check before writing anything: that is the transaction
        if new_total > quota:
            raise StorageQuotaExceededError()
        self._storage_values[(tenant_id, plugin_id, key)] = value
        self._storage_totals[(tenant_id, plugin_id)] = new_total

    @_synchronously
    def storage_delete(self, tenant_id, plugin_id, key):
        old = self._storage_values.pop((tenant_id, plugin_id, key), None)
        if old is None:
            return 0
        total = self._storage_totals.get((tenant_id, plugin_id), 0)
        self._storage_totals[(tenant_id, plugin_id)] = max(total - len(old), 0)
        return 1

    @_synchronously
    def storage_exists(self, tenant_id, plugin_id, key):
        return (tenant_id, plugin_id, key) in self._storage_values

    @_synchronously
    def storage_size(self, tenant_id, plugin_id):
        return self._storage_totals.get((tenant_id, plugin_id), 0)

    # -- endpoints ----------------------------------------------------------

    def _add_endpoint_counters(self, tenant_id, plugin_id, setups, active):
        installation = self._find_installation(tenant_id, plugin_id)
        if installation is not None:
            self._installations[installation.id] = attrs.evolve(
                installation,
                endpoints_setups=installation.endpoints_setups + setups,
                endpoints_active=installation.endpoints_active + active,
            )

    def _tenant_endpoint(self, tenant_id, endpoint_id):
        endpoint = self._endpoints.get(endpoint_id)
        if endpoint is None or endpoint.tenant_id != tenant_id:
            return None
        return endpoint

    @staticmethod
    def _endpoint_out(endpoint):
        # callers get their own settings dict, as from a database
        if endpoint is None:
            return None
        return attrs.evolve(endpoint, settings=_copy_json(endpoint.settings))

    @_synchronously
    def create_endpoint(self, endpoint_id, tenant_id, user_id, plugin_id, name, settings):
        moment = utc_from_timestamp(self._now())
        endpoint = Endpoint(
            id=endpoint_id,
            created_at=moment,
            updated_at=moment,
            name=name,
            hook_id=new_hook_id(),
            tenant_id=tenant_id,
            user_id=user_id,
            plugin_id=plugin_id,
            expired_at=ENDPOINT_EXPIRES_AT,
            enabled=True,
            settings=_copy_json(settings),
        )
        self._endpoints[endpoint.id] = endpoint
        self._add_endpoint_counters(tenant_id, plugin_id, 1, 1)
        return self._endpoint_out(endpoint)

    @_synchronously
    def get_endpoint(self, tenant_id, endpoint_id):
        return self._endpoint_out(self._tenant_endpoint(tenant_id, endpoint_id))

    @_synchronously
    def get_endpoint_by_hook_id(self, hook_id):
        for endpoint in self._endpoints.values():
            if endpoint.hook_id == hook_id:
                return self._endpoint_out(endpoint)
        return None

    @_synchronously
    def list_endpoints(self, tenant_id, offset, limit):
        mine = _newest_first(e for e in self._endpoints.values() if e.tenant_id == tenant_id)
        return [self._endpoint_out(e) for e in mine[offset:offset + limit]]

    @_synchronously
    def list_plugin_endpoints(self, tenant_id, plugin_id, offset, limit):
        mine = _newest_first(
            e for e in self._endpoints.values()
            if e.tenant_id == tenant_id and e.plugin_id == plugin_id
        )
        return [self._endpoint_out(e) for e in mine[offset:offset + limit]]

    @_synchronously
    def update_endpoint(self, tenant_id, endpoint_id, name, settings):
        endpoint = self._tenant_endpoint(tenant_id, endpoint_id)
        if endpoint is None:
            return None
        endpoint = attrs.evolve(
            endpoint, name=name, settings=_copy_json(settings),
            updated_at=utc_from_timestamp(self._now()),
        )
        self._endpoints[endpoint.id] = endpoint
        return self._endpoint_out(endpoint)

    @_synchronously
    def set_endpoint_enabled(self, tenant_id, endpoint_id, enabled):
        enabled = bool(enabled)
        endpoint = self._tenant_endpoint(tenant_id, endpoint_id)
        if endpoint is None or endpoint.enabled == enabled:
            return self._endpoint_out(endpoint)
        endpoint = attrs.evolve(endpoint, enabled=enabled, updated_at=utc_from_timestamp(self._now()))
        self._endpoints[endpoint.id] = endpoint
        self._add_endpoint_counters(tenant_id, endpoint.plugin_id, 0, 1 if enabled else -1)
        return self._endpoint_out(endpoint)

    @_synchronously
    def delete_endpoint(self, tenant_id, endpoint_id):
        endpoint = self._tenant_endpoint(tenant_id, endpoint_id)
        if endpoint is None:
            return False
        del self._endpoints[endpoint.id]
        self._add_endpoint_counters(tenant_id, endpoint.plugin_id, -1, -1 if endpoint.enabled else 0)
        return True

    # -- serverless functions ---------------------------------------------

    @_synchronously
    def upsert_serverless_runtime(self, plugin_unique_identifier, function_url, function_name, checksum):
        now = self._now()
        moment = utc_from_timestamp(now)
        existing = self._serverless.get(plugin_unique_identifier)
        if existing is None:
            record = ServerlessRuntimeRecord(
                id=new_id(now),
                created_at=moment,
                updated_at=moment,
                plugin_unique_identifier=plugin_unique_identifier,
                function_url=function_url,
                function_name=function_name,
                type="serverless",
                checksum=checksum,
            )
        else:
            record = attrs.evolve(
                existing, function_url=function_url, function_name=function_name, checksum=checksum,
                updated_at=moment,
            )
        self._serverless[plugin_unique_identifier] = record
        return record

    @_synchronously
    def get_serverless_runtime(self, plugin_unique_identifier):
        return self._serverless.get(plugin_unique_identifier)

    @_synchronously
    def list_serverless_runtimes(self):
        return _oldest_first(self._serverless.values())
