"""
The daemon's database operations, written once for SQLite and PostgreSQL.

Every operation is an ``async def`` over a transaction object that has a
:class:`Dialect` and one method, ``await tx.execute(sql, params)``, which
returns the result rows as a list of tuples (empty for statements without
a result).  SQL is written with ``?`` placeholders; the PostgreSQL
transaction converts them.  ``SELECT ... {lock}`` marks the reads that lock
rows (``FOR UPDATE`` on PostgreSQL; SQLite transactions are serialized, so
nothing is needed there).  The operations that only read are marked
:func:`read_only`: a backend may run them again after a lost connection.

:class:`SQLPersistence` turns these operations into the
:class:`~difydaemon.interfaces.IPersistence` methods; a subclass only says
how to run one operation in one transaction.
"""

from __future__ import annotations

import secrets
import string
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import resources

import attrs
import orjson
from attrs import frozen
from twisted.internet.defer import Deferred

from difydaemon.errors import (
    AlreadyInstalledError,
    RecordNotFoundError,
    StorageQuotaExceededError,
)
from difydaemon.ids import new_id, utc_from_timestamp
from difydaemon.persistence.records import (
    PROVIDER_TABLES,
    DebuggingKey,
    Endpoint,
    Installation,
    InstallTask,
    InstallTaskPlugin,
    PluginRecord,
    ProviderInstallation,
    ServerlessRuntimeRecord,
    UninstallResult,
    UpgradeResult,
)


@frozen
class Dialect:
    """
    What differs between the databases, as seen by the shared operations.

    :ivar name: ``sqlite`` or ``postgres``; also picks migration overrides.
    :ivar lock: the suffix of a ``SELECT`` that locks the rows it reads.
    :ivar encode_time: aware datetime -> column value.
    :ivar decode_time: column value -> aware UTC datetime.
    :ivar integrity_error: the driver's unique-violation exception class.
    :ivar migration_lock: a statement that makes concurrent migrators (other
        replicas) wait for each other until commit, or None.
    """

    name: str
    lock: str
    encode_time: Callable
    decode_time: Callable
    integrity_error: type
    migration_lock: str | None


def read_only(operation):
    """
    Mark ``operation`` as one that only reads.  A backend may run it once
    more after losing its connection (nothing can be written twice), and
    PostgreSQL runs it in a ``READ ONLY`` transaction, which refuses any
    write: a wrong mark fails loudly instead of repeating a change.
    """
    operation.read_only = True
    return operation


def is_read_only(operation) -> bool:
    """Whether ``operation`` is marked :func:`read_only`."""
    return getattr(operation, "read_only", False)


# -- migrations --------------------------------------------------------------

MIGRATIONS_TABLE_SQL = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version varchar(255) PRIMARY KEY, applied_at timestamptz NOT NULL)"
)


@frozen
class Migration:
    """One schema migration file: its version (the file stem) and statements."""

    version: str
    statements: tuple


def split_statements(script: str) -> tuple:
    """
    The statements of a migration file: ``--`` comment lines dropped, split
    at every semicolon that ends a line.
    """
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    statements = []
    current = []
    for line in lines:
        current.append(line)
        if line.rstrip().endswith(";"):
            statements.append("\n".join(current).strip().rstrip(";").strip())
            current = []
    tail = "\n".join(current).strip()
    if tail:
        statements.append(tail)
    return tuple(s for s in statements if s)


def load_migrations(dialect_name: str, folder=None) -> list:
    """
    The migrations in version order.

    ``NNNN_name.sql`` serves every database; ``NNNN_name.<dialect>.sql``,
    when present, replaces it for that dialect.

    :param folder: where the files are (a :class:`pathlib.Path` or an
        importlib resource); the package's ``migrations`` by default.
    """
    if folder is None:
        folder = resources.files("difydaemon.persistence") / "migrations"
    common = {}
    specific = {}
    for entry in folder.iterdir():
        name = entry.name
        if not name.endswith(".sql"):
            continue
        parts = name[: -len(".sql")].split(".")
        if len(parts) == 1:
            common[parts[0]] = entry
        elif len(parts) == 2 and parts[1] == dialect_name:
            specific[parts[0]] = entry
    chosen = {**common, **specific}
    return [
        Migration(version, split_statements(chosen[version].read_text(encoding="utf-8")))
        for version in sorted(chosen)
    ]


async def create_migrations_table(tx) -> None:
    """Make sure ``schema_migrations`` exists."""
    if tx.dialect.migration_lock:
        await tx.execute(tx.dialect.migration_lock)
    await tx.execute(MIGRATIONS_TABLE_SQL)


async def apply_migration(tx, now: float, migration: Migration) -> bool:
    """Apply ``migration`` unless it is recorded already; True if applied."""
    if tx.dialect.migration_lock:
        await tx.execute(tx.dialect.migration_lock)
    rows = await tx.execute(
        "SELECT version FROM schema_migrations WHERE version = ?", (migration.version,)
    )
    if rows:
        return False
    for statement in migration.statements:
        await tx.execute(statement)
    await tx.execute(
        "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
        (migration.version, tx.dialect.encode_time(utc_from_timestamp(now))),
    )
    return True


# -- row decoding ------------------------------------------------------------

PLUGIN_COLUMNS = (
    "id, created_at, updated_at, plugin_unique_identifier, plugin_id, refers, "
    "install_type, manifest_type, remote_declaration, source"
)
INSTALLATION_COLUMNS = (
    "id, created_at, updated_at, tenant_id, plugin_id, plugin_unique_identifier, "
    "runtime_type, endpoints_setups, endpoints_active, source, meta"
)
PROVIDER_COLUMNS = (
    "id, created_at, updated_at, tenant_id, provider, plugin_unique_identifier, plugin_id"
)
TASK_COLUMNS = (
    "id, created_at, updated_at, status, tenant_id, total_plugins, completed_plugins, plugins"
)


def _dumps(value) -> str:
    return orjson.dumps(value).decode("utf-8")


def _plugin(dialect: Dialect, row) -> PluginRecord:
    return PluginRecord(
        id=str(row[0]),
        created_at=dialect.decode_time(row[1]),
        updated_at=dialect.decode_time(row[2]),
        plugin_unique_identifier=row[3],
        plugin_id=row[4],
        refers=int(row[5]),
        install_type=row[6],
        manifest_type=row[7],
        remote_declaration=None if row[8] is None else orjson.loads(row[8]),
        source=row[9],
    )


def _installation(dialect: Dialect, row) -> Installation:
    return Installation(
        id=str(row[0]),
        created_at=dialect.decode_time(row[1]),
        updated_at=dialect.decode_time(row[2]),
        tenant_id=row[3],
        plugin_id=row[4],
        plugin_unique_identifier=row[5],
        runtime_type=row[6],
        endpoints_setups=int(row[7]),
        endpoints_active=int(row[8]),
        source=row[9],
        meta=orjson.loads(row[10]),
    )


def _provider(dialect: Dialect, row) -> ProviderInstallation:
    return ProviderInstallation(
        id=str(row[0]),
        created_at=dialect.decode_time(row[1]),
        updated_at=dialect.decode_time(row[2]),
        tenant_id=row[3],
        provider=row[4],
        plugin_unique_identifier=row[5],
        plugin_id=row[6],
    )


def encode_task_plugins(plugins) -> str:
    """The JSON text of a task's per-plugin statuses."""
    return _dumps([attrs.asdict(plugin) for plugin in plugins])


def decode_task_plugins(text: str) -> tuple:
    """The per-plugin statuses of a task from their JSON text."""
    return tuple(InstallTaskPlugin(**item) for item in orjson.loads(text))


def _task(dialect: Dialect, row) -> InstallTask:
    return InstallTask(
        id=str(row[0]),
        created_at=dialect.decode_time(row[1]),
        updated_at=dialect.decode_time(row[2]),
        status=row[3],
        tenant_id=row[4],
        total_plugins=int(row[5]),
        completed_plugins=int(row[6]),
        plugins=decode_task_plugins(row[7]),
    )


def is_uuid(value: str) -> bool:
    """
    Whether ``value`` can be compared with a uuid column: PostgreSQL
    refuses a malformed one with an error, but a malformed id simply names
    nothing.
    """
    try:
        uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return False
    return True


def provider_table(kind: str) -> str:
    """The projection table of a provider kind; ValueError for others."""
    try:
        return PROVIDER_TABLES[kind]
    except KeyError:
        raise ValueError(f"unknown provider kind {kind!r}") from None


def _placeholders(count: int) -> str:
    return ", ".join(["?"] * count)


# -- plugins and installations ----------------------------------------------


async def _lock_plugins(tx, identifiers) -> dict:
    # Locks in identifier order so that two transactions locking the same
    # pair cannot deadlock.
    wanted = sorted(set(identifiers))
    rows = await tx.execute(
        f"SELECT {PLUGIN_COLUMNS} FROM plugins WHERE plugin_unique_identifier IN "
        f"({_placeholders(len(wanted))}) ORDER BY plugin_unique_identifier{tx.dialect.lock}",
        tuple(wanted),
    )
    return {row[3]: _plugin(tx.dialect, row) for row in rows}


async def _ensure_plugin(
    tx, now: float, identifier: str, plugin_id: str, install_type: str,
    manifest_type: str, source: str, remote_declaration,
) -> None:
    moment = tx.dialect.encode_time(utc_from_timestamp(now))
    # A concurrent insert of the same identifier waits for ours and then
    # does nothing, so both continue with the one row.
    await tx.execute(
        "INSERT INTO plugins (id, created_at, updated_at, plugin_unique_identifier, "
        "plugin_id, refers, install_type, manifest_type, remote_declaration, source) "
        "VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?) "
        "ON CONFLICT (plugin_unique_identifier) DO NOTHING",
        (
            new_id(now), moment, moment, identifier, plugin_id, install_type,
            manifest_type, None if remote_declaration is None else _dumps(remote_declaration),
            source,
        ),
    )


async def _add_refers(tx, now: float, identifier: str, delta: int) -> None:
    await tx.execute(
        "UPDATE plugins SET refers = refers + ?, updated_at = ? "
        "WHERE plugin_unique_identifier = ?",
        (delta, tx.dialect.encode_time(utc_from_timestamp(now)), identifier),
    )


async def _delete_plugin(tx, identifier: str) -> None:
    for table in ("plugins", "plugin_declarations", "serverless_runtimes"):
        await tx.execute(
            f"DELETE FROM {table} WHERE plugin_unique_identifier = ?", (identifier,)
        )


async def _insert_projections(
    tx, now: float, tenant_id: str, identifier: str, plugin_id: str, providers: dict
) -> None:
    moment = tx.dialect.encode_time(utc_from_timestamp(now))
    for kind, provider in providers.items():
        await tx.execute(
            f"INSERT INTO {provider_table(kind)} (id, created_at, updated_at, tenant_id, "
            "provider, plugin_unique_identifier, plugin_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (new_id(now), moment, moment, tenant_id, provider, identifier, plugin_id),
        )


async def _delete_projections(tx, tenant_id: str, plugin_id: str) -> None:
    for table in PROVIDER_TABLES.values():
        await tx.execute(
            f"DELETE FROM {table} WHERE tenant_id = ? AND plugin_id = ?", (tenant_id, plugin_id)
        )


async def install_plugin(
    tx, now: float, tenant_id: str, identifier: str, plugin_id: str, runtime_type: str,
    source: str, meta: dict, providers: dict, remote_declaration,
) -> Installation:
    """http-api §5.4 step 5; see :meth:`IPersistence.install_plugin`."""
    await _ensure_plugin(
        tx, now, identifier, plugin_id, runtime_type, "", source, remote_declaration
    )
    await _lock_plugins(tx, [identifier])
    if remote_declaration is not None:
        # a debug plugin reconnecting may bring a changed declaration
        await tx.execute(
            "UPDATE plugins SET remote_declaration = ? WHERE plugin_unique_identifier = ?",
            (_dumps(remote_declaration), identifier),
        )
    existing = await tx.execute(
        "SELECT id FROM plugin_installations WHERE tenant_id = ? AND plugin_id = ?",
        (tenant_id, plugin_id),
    )
    if existing:
        raise AlreadyInstalledError("plugin already installed")
    await _add_refers(tx, now, identifier, 1)
    moment = utc_from_timestamp(now)
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
        meta=dict(meta),
    )
    encoded = tx.dialect.encode_time(moment)
    try:
        await tx.execute(
            f"INSERT INTO plugin_installations ({INSTALLATION_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?)",
            (
                installation.id, encoded, encoded, tenant_id, plugin_id, identifier,
                runtime_type, source, _dumps(installation.meta),
            ),
        )
    except tx.dialect.integrity_error:
        # Another version of the same plugin_id was installed concurrently
        # (it held a different plugins row lock); the unique index decides.
        raise AlreadyInstalledError("plugin already installed") from None
    await _insert_projections(tx, now, tenant_id, identifier, plugin_id, providers)
    return installation


async def uninstall_plugin(tx, now: float, tenant_id: str, installation_id: str):
    """http-api §5.5; see :meth:`IPersistence.uninstall_plugin`."""
    if not is_uuid(installation_id):
        return None
    rows = await tx.execute(
        f"SELECT {INSTALLATION_COLUMNS} FROM plugin_installations "
        f"WHERE id = ? AND tenant_id = ?{tx.dialect.lock}",
        (installation_id, tenant_id),
    )
    if not rows:
        return None
    installation = _installation(tx.dialect, rows[0])
    identifier = installation.plugin_unique_identifier
    plugins = await _lock_plugins(tx, [identifier])
    await tx.execute("DELETE FROM plugin_installations WHERE id = ?", (installation.id,))
    await _delete_projections(tx, tenant_id, installation.plugin_id)
    removed = False
    plugin = plugins.get(identifier)
    if plugin is not None:
        if plugin.refers - 1 <= 0:
            await _delete_plugin(tx, identifier)
            removed = True
        else:
            await _add_refers(tx, now, identifier, -1)
    return UninstallResult(installation=installation, plugin_removed=removed)


async def upgrade_plugin(
    tx, now: float, tenant_id: str, original: str, new: str, providers: dict,
    source: str, meta: dict,
) -> UpgradeResult:
    """http-api §5.6; see :meth:`IPersistence.upgrade_plugin`."""
    rows = await tx.execute(
        f"SELECT {INSTALLATION_COLUMNS} FROM plugin_installations "
        f"WHERE tenant_id = ? AND plugin_unique_identifier = ?{tx.dialect.lock}",
        (tenant_id, original),
    )
    if not rows:
        raise RecordNotFoundError()
    old = _installation(tx.dialect, rows[0])
    await _ensure_plugin(tx, now, new, old.plugin_id, old.runtime_type, "plugin", source, None)
    await _lock_plugins(tx, [original, new])
    # Adding before removing keeps an upgrade to the same identifier from
    # deleting the row it still needs.
    await _add_refers(tx, now, new, 1)
    await _add_refers(tx, now, original, -1)
    removed = False
    if original != new:
        left = await tx.execute(
            "SELECT refers FROM plugins WHERE plugin_unique_identifier = ?", (original,)
        )
        if left and int(left[0][0]) <= 0:
            await _delete_plugin(tx, original)
            removed = True
    moment = utc_from_timestamp(now)
    installation = attrs.evolve(
        old, plugin_unique_identifier=new, source=source, meta=dict(meta), updated_at=moment
    )
    await tx.execute(
        "UPDATE plugin_installations SET plugin_unique_identifier = ?, source = ?, meta = ?, "
        "updated_at = ? WHERE id = ?",
        (new, source, _dumps(installation.meta), tx.dialect.encode_time(moment), old.id),
    )
    await _delete_projections(tx, tenant_id, old.plugin_id)
    await _insert_projections(tx, now, tenant_id, new, old.plugin_id, providers)
    return UpgradeResult(installation=installation, original_plugin_removed=removed)


@read_only
async def get_plugin(tx, identifier: str):
    """The ``plugins`` row of an identifier, or None."""
    rows = await tx.execute(
        f"SELECT {PLUGIN_COLUMNS} FROM plugins WHERE plugin_unique_identifier = ?",
        (identifier,),
    )
    return _plugin(tx.dialect, rows[0]) if rows else None


@read_only
async def list_plugins(tx, install_type: str) -> list:
    """Every ``plugins`` row of an install type, oldest first."""
    rows = await tx.execute(
        f"SELECT {PLUGIN_COLUMNS} FROM plugins WHERE install_type = ? "
        "ORDER BY created_at, id",
        (install_type,),
    )
    return [_plugin(tx.dialect, row) for row in rows]


@read_only
async def get_installation(tx, tenant_id: str, plugin_id: str):
    """A tenant's installation of a plugin_id, or None."""
    rows = await tx.execute(
        f"SELECT {INSTALLATION_COLUMNS} FROM plugin_installations "
        "WHERE tenant_id = ? AND plugin_id = ?",
        (tenant_id, plugin_id),
    )
    return _installation(tx.dialect, rows[0]) if rows else None


@read_only
async def get_installation_by_id(tx, tenant_id: str, installation_id: str):
    """A tenant's installation by id, or None."""
    if not is_uuid(installation_id):
        return None
    rows = await tx.execute(
        f"SELECT {INSTALLATION_COLUMNS} FROM plugin_installations "
        "WHERE id = ? AND tenant_id = ?",
        (installation_id, tenant_id),
    )
    return _installation(tx.dialect, rows[0]) if rows else None


@read_only
async def list_installations(tx, tenant_id: str, offset: int, limit: int) -> tuple:
    """A page of a tenant's installations, newest first, and their count."""
    rows = await tx.execute(
        f"SELECT {INSTALLATION_COLUMNS} FROM plugin_installations WHERE tenant_id = ? "
        "ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
        (tenant_id, limit, offset),
    )
    total = await tx.execute(
        "SELECT COUNT(*) FROM plugin_installations WHERE tenant_id = ?", (tenant_id,)
    )
    return [_installation(tx.dialect, row) for row in rows], int(total[0][0])


@read_only
async def list_installations_by_runtime_type(tx, runtime_type: str) -> list:
    """Every tenant's installations of one runtime type, oldest first."""
    rows = await tx.execute(
        f"SELECT {INSTALLATION_COLUMNS} FROM plugin_installations WHERE runtime_type = ? "
        "ORDER BY created_at, id",
        (runtime_type,),
    )
    return [_installation(tx.dialect, row) for row in rows]


@read_only
async def list_installations_by_plugin_ids(tx, tenant_id: str, plugin_ids) -> list:
    """A tenant's installations of the given plugin_ids."""
    wanted = sorted(set(plugin_ids))
    if not wanted:
        return []
    rows = await tx.execute(
        f"SELECT {INSTALLATION_COLUMNS} FROM plugin_installations WHERE tenant_id = ? "
        f"AND plugin_id IN ({_placeholders(len(wanted))})",
        (tenant_id, *wanted),
    )
    return [_installation(tx.dialect, row) for row in rows]


@read_only
async def list_providers(tx, kind: str, tenant_id: str, offset: int, limit: int) -> list:
    """A page of one projection table of a tenant, newest first."""
    rows = await tx.execute(
        f"SELECT {PROVIDER_COLUMNS} FROM {provider_table(kind)} WHERE tenant_id = ? "
        "ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
        (tenant_id, limit, offset),
    )
    return [_provider(tx.dialect, row) for row in rows]


@read_only
async def get_provider(tx, kind: str, tenant_id: str, plugin_id: str):
    """A tenant's projection row of one plugin_id, or None."""
    rows = await tx.execute(
        f"SELECT {PROVIDER_COLUMNS} FROM {provider_table(kind)} "
        "WHERE tenant_id = ? AND plugin_id = ? ORDER BY created_at DESC, id DESC LIMIT 1",
        (tenant_id, plugin_id),
    )
    return _provider(tx.dialect, rows[0]) if rows else None


# -- declarations and readmes -------------------------------------------------


async def save_declaration(tx, now: float, identifier: str, plugin_id: str, declaration) -> None:
    """Insert a declaration unless its identifier has one."""
    moment = tx.dialect.encode_time(utc_from_timestamp(now))
    await tx.execute(
        "INSERT INTO plugin_declarations (id, created_at, updated_at, "
        "plugin_unique_identifier, plugin_id, declaration) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (plugin_unique_identifier) DO NOTHING",
        (new_id(now), moment, moment, identifier, plugin_id, _dumps(declaration)),
    )


@read_only
async def get_declarations(tx, identifiers) -> dict:
    """identifier -> declaration for the ones that exist."""
    found = await get_declarations_json(tx, identifiers, frozenset())
    return {identifier: orjson.loads(text) for identifier, text in found.items()}


@read_only
async def get_declaration(tx, identifier: str):
    """The declaration of one identifier, or None."""
    found = await get_declarations(tx, [identifier])
    return found.get(identifier)


@read_only
async def get_declarations_json(tx, identifiers, known) -> dict:
    """
    identifier -> stored JSON bytes for the ones that exist, None for those
    in ``known``: their text is neither read nor sent.
    """
    wanted = sorted(set(identifiers))
    if not wanted:
        return {}
    found = {}
    unknown = wanted
    if not set(known).isdisjoint(wanted):
        # ask which still exist, and read only the others' text
        rows = await tx.execute(
            "SELECT plugin_unique_identifier FROM plugin_declarations "
            f"WHERE plugin_unique_identifier IN ({_placeholders(len(wanted))})",
            tuple(wanted),
        )
        found = {row[0]: None for row in rows}
        unknown = sorted(set(found) - set(known))
    if unknown:
        rows = await tx.execute(
            "SELECT plugin_unique_identifier, declaration FROM plugin_declarations "
            f"WHERE plugin_unique_identifier IN ({_placeholders(len(unknown))})",
            tuple(unknown),
        )
        for identifier, text in rows:
            found[identifier] = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return found


async def delete_declaration(tx, identifier: str) -> None:
    """Forget the declaration of an identifier."""
    await tx.execute(
        "DELETE FROM plugin_declarations WHERE plugin_unique_identifier = ?", (identifier,)
    )


@read_only
async def get_readmes(tx, identifier: str) -> dict:
    """language -> README text of an identifier."""
    rows = await tx.execute(
        "SELECT language, content FROM plugin_readme_records "
        "WHERE plugin_unique_identifier = ?",
        (identifier,),
    )
    return {row[0]: row[1] for row in rows}


async def save_readme(tx, now: float, identifier: str, language: str, content: str) -> None:
    """Store (or replace) the README of an identifier in one language."""
    moment = tx.dialect.encode_time(utc_from_timestamp(now))
    await tx.execute(
        "INSERT INTO plugin_readme_records (id, created_at, updated_at, "
        "plugin_unique_identifier, language, content) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (plugin_unique_identifier, language) DO UPDATE SET "
        "content = excluded.content, updated_at = excluded.updated_at",
        (new_id(now), moment, moment, identifier, language, content),
    )


# -- install tasks ------------------------------------------------------------


async def create_task(tx, task: InstallTask) -> None:
    """Insert a task as given."""
    encode = tx.dialect.encode_time
    await tx.execute(
        f"INSERT INTO install_tasks ({TASK_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            task.id, encode(task.created_at), encode(task.updated_at), task.status,
            task.tenant_id, task.total_plugins, task.completed_plugins,
            encode_task_plugins(task.plugins),
        ),
    )


async def update_task(tx, now: float, task: InstallTask) -> None:
    """Replace a task's status, counters and plugins; stamp updated_at."""
    if not is_uuid(task.id):
        return
    await tx.execute(
        "UPDATE install_tasks SET status = ?, total_plugins = ?, completed_plugins = ?, "
        "plugins = ?, updated_at = ? WHERE id = ?",
        (
            task.status, task.total_plugins, task.completed_plugins,
            encode_task_plugins(task.plugins),
            tx.dialect.encode_time(utc_from_timestamp(now)), task.id,
        ),
    )


@read_only
async def get_task(tx, tenant_id: str, task_id: str):
    """One task of a tenant, or None."""
    if not is_uuid(task_id):
        return None
    rows = await tx.execute(
        f"SELECT {TASK_COLUMNS} FROM install_tasks WHERE id = ? AND tenant_id = ?",
        (task_id, tenant_id),
    )
    return _task(tx.dialect, rows[0]) if rows else None


@read_only
async def list_tasks(tx, tenant_id: str, offset: int, limit: int) -> list:
    """A page of a tenant's tasks, newest first."""
    rows = await tx.execute(
        f"SELECT {TASK_COLUMNS} FROM install_tasks WHERE tenant_id = ? "
        "ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
        (tenant_id, limit, offset),
    )
    return [_task(tx.dialect, row) for row in rows]


@read_only
async def list_tasks_by_status(tx, statuses) -> list:
    """Every task, of every tenant, in one of ``statuses``; oldest first."""
    wanted = sorted(set(statuses))
    if not wanted:
        return []
    rows = await tx.execute(
        f"SELECT {TASK_COLUMNS} FROM install_tasks "
        f"WHERE status IN ({_placeholders(len(wanted))}) ORDER BY created_at, id",
        tuple(wanted),
    )
    return [_task(tx.dialect, row) for row in rows]


async def delete_task(tx, tenant_id: str, task_id: str) -> None:
    """Delete one task of a tenant, if it exists."""
    if not is_uuid(task_id):
        return
    await tx.execute(
        "DELETE FROM install_tasks WHERE id = ? AND tenant_id = ?", (task_id, tenant_id)
    )


async def delete_all_tasks(tx, tenant_id: str) -> None:
    """Delete every task of a tenant."""
    await tx.execute("DELETE FROM install_tasks WHERE tenant_id = ?", (tenant_id,))


# -- remote debugging keys ------------------------------------------------------


async def get_or_create_debugging_key(
    tx, now: float, tenant_id: str, new_key: str, ttl: float
) -> DebuggingKey:
    """See :meth:`IPersistence.get_or_create_debugging_key`."""
    encode = tx.dialect.encode_time
    moment = encode(utc_from_timestamp(now))
    expires_at = utc_from_timestamp(now + ttl)
    # Two concurrent first requests of a tenant: the second insert waits for
    # the first and then does nothing, and both read the one key back.
    await tx.execute(
        "INSERT INTO debugging_keys (id, created_at, updated_at, tenant_id, key, expires_at) "
        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant_id) DO NOTHING",
        (new_id(now), moment, moment, tenant_id, new_key, encode(expires_at)),
    )
    rows = await tx.execute(
        f"SELECT key, expires_at FROM debugging_keys WHERE tenant_id = ?{tx.dialect.lock}",
        (tenant_id,),
    )
    key = rows[0][0]
    if tx.dialect.decode_time(rows[0][1]) <= utc_from_timestamp(now):
        key = new_key
    await tx.execute(
        "UPDATE debugging_keys SET key = ?, expires_at = ?, updated_at = ? WHERE tenant_id = ?",
        (key, encode(expires_at), moment, tenant_id),
    )
    return DebuggingKey(tenant_id=tenant_id, key=key, expires_at=expires_at)


@read_only
async def get_debugging_key(tx, now: float, key: str):
    """See :meth:`IPersistence.get_debugging_key`."""
    rows = await tx.execute(
        "SELECT tenant_id, key, expires_at FROM debugging_keys WHERE key = ?", (key,)
    )
    if not rows:
        return None
    expires_at = tx.dialect.decode_time(rows[0][2])
    if expires_at <= utc_from_timestamp(now):
        return None
    return DebuggingKey(tenant_id=rows[0][0], key=rows[0][1], expires_at=expires_at)


# -- plugin key/value storage --------------------------------------------------


async def _lock_storage_total(tx, now: float, tenant_id: str, plugin_id: str) -> int:
    # Every writer of a (tenant, plugin) locks its tenant_storages row first,
    # so writes of one plugin's keys are serialized and always take the row
    # lock before any plugin_storages row lock: no deadlock, no lost update.
    moment = tx.dialect.encode_time(utc_from_timestamp(now))
    await tx.execute(
        "INSERT INTO tenant_storages (id, created_at, updated_at, tenant_id, plugin_id, size) "
        "VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT (tenant_id, plugin_id) DO NOTHING",
        (new_id(now), moment, moment, tenant_id, plugin_id),
    )
    rows = await tx.execute(
        f"SELECT size FROM tenant_storages WHERE tenant_id = ? AND plugin_id = ?{tx.dialect.lock}",
        (tenant_id, plugin_id),
    )
    return int(rows[0][0])


async def _stored_length(tx, tenant_id: str, plugin_id: str, key: str):
    rows = await tx.execute(
        "SELECT length(value) FROM plugin_storages "
        "WHERE tenant_id = ? AND plugin_id = ? AND key = ?",
        (tenant_id, plugin_id, key),
    )
    return int(rows[0][0]) if rows else None


async def _set_storage_total(tx, now: float, tenant_id: str, plugin_id: str, size: int) -> None:
    await tx.execute(
        "UPDATE tenant_storages SET size = ?, updated_at = ? WHERE tenant_id = ? AND plugin_id = ?",
        (size, tx.dialect.encode_time(utc_from_timestamp(now)), tenant_id, plugin_id),
    )


@read_only
async def storage_get(tx, tenant_id: str, plugin_id: str, key: str):
    """See :meth:`IPersistence.storage_get`."""
    rows = await tx.execute(
        "SELECT value FROM plugin_storages WHERE tenant_id = ? AND plugin_id = ? AND key = ?",
        (tenant_id, plugin_id, key),
    )
    # psycopg2 gives bytea as a memoryview
    return bytes(rows[0][0]) if rows else None


async def storage_set(
    tx, now: float, tenant_id: str, plugin_id: str, key: str, value: bytes, quota: int
) -> None:
    """See :meth:`IPersistence.storage_set`."""
    total = await _lock_storage_total(tx, now, tenant_id, plugin_id)
    old = await _stored_length(tx, tenant_id, plugin_id, key) or 0
    new_total = total - old + len(value)
    if new_total > quota:
        # the transaction rolls back, taking a just-inserted total row with it
        raise StorageQuotaExceededError()
    moment = tx.dialect.encode_time(utc_from_timestamp(now))
    await tx.execute(
        "INSERT INTO plugin_storages "
        "(id, created_at, updated_at, tenant_id, plugin_id, key, value) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant_id, plugin_id, key) DO UPDATE SET "
        "value = excluded.value, updated_at = excluded.updated_at",
        (new_id(now), moment, moment, tenant_id, plugin_id, key, value),
    )
    await _set_storage_total(tx, now, tenant_id, plugin_id, new_total)


async def storage_delete(tx, now: float, tenant_id: str, plugin_id: str, key: str) -> int:
    """See :meth:`IPersistence.storage_delete`."""
    if await _stored_length(tx, tenant_id, plugin_id, key) is None:
        return 0
    total = await _lock_storage_total(tx, now, tenant_id, plugin_id)
    # read again under the lock: a concurrent delete may have won
    old = await _stored_length(tx, tenant_id, plugin_id, key)
    if old is None:
        return 0
    await tx.execute(
        "DELETE FROM plugin_storages WHERE tenant_id = ? AND plugin_id = ? AND key = ?",
        (tenant_id, plugin_id, key),
    )
    await _set_storage_total(tx, now, tenant_id, plugin_id, max(total - old, 0))
    return 1


@read_only
async def storage_exists(tx, tenant_id: str, plugin_id: str, key: str) -> bool:
    """See :meth:`IPersistence.storage_exists`."""
    return await _stored_length(tx, tenant_id, plugin_id, key) is not None


@read_only
async def storage_size(tx, tenant_id: str, plugin_id: str) -> int:
    """See :meth:`IPersistence.storage_size`."""
    rows = await tx.execute(
        "SELECT size FROM tenant_storages WHERE tenant_id = ? AND plugin_id = ?",
        (tenant_id, plugin_id),
    )
    return int(rows[0][0]) if rows else 0


# -- endpoints ----------------------------------------------------------------

ENDPOINT_COLUMNS = (
    "id, created_at, updated_at, name, hook_id, tenant_id, user_id, plugin_id, "
    "expired_at, enabled, settings"
)

#: when a new endpoint expires: never, in practice (as the Go daemon sets it)
ENDPOINT_EXPIRES_AT = datetime(2050, 1, 1, tzinfo=timezone.utc)

_HOOK_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_hook_id() -> str:
    """A random 16-character ``[a-z0-9]`` hook id (about 82 bits)."""
    return "".join(secrets.choice(_HOOK_ID_ALPHABET) for _ in range(16))


def _endpoint(dialect: Dialect, row) -> Endpoint:
    return Endpoint(
        id=str(row[0]),
        created_at=dialect.decode_time(row[1]),
        updated_at=dialect.decode_time(row[2]),
        name=row[3],
        hook_id=row[4],
        tenant_id=row[5],
        user_id=row[6],
        plugin_id=row[7],
        expired_at=dialect.decode_time(row[8]),
        enabled=bool(row[9]),
        settings=orjson.loads(row[10]),
    )


async def _add_endpoint_counters(tx, tenant_id: str, plugin_id: str, setups: int, active: int) -> None:
    await tx.execute(
        "UPDATE plugin_installations SET endpoints_setups = endpoints_setups + ?, "
        "endpoints_active = endpoints_active + ? WHERE tenant_id = ? AND plugin_id = ?",
        (setups, active, tenant_id, plugin_id),
    )


async def _locked_endpoint(tx, tenant_id: str, endpoint_id: str):
    if not is_uuid(endpoint_id):
        return None
    rows = await tx.execute(
        f"SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id = ? AND tenant_id = ?{tx.dialect.lock}",
        (endpoint_id, tenant_id),
    )
    return _endpoint(tx.dialect, rows[0]) if rows else None


async def create_endpoint(
    tx, now: float, endpoint_id: str, hook_id: str, tenant_id: str, user_id: str,
    plugin_id: str, name: str, settings: dict,
) -> Endpoint:
    """See :meth:`IPersistence.create_endpoint`."""
    moment = utc_from_timestamp(now)
    endpoint = Endpoint(
        id=endpoint_id,
        created_at=moment,
        updated_at=moment,
        name=name,
        hook_id=hook_id,
        tenant_id=tenant_id,
        user_id=user_id,
        plugin_id=plugin_id,
        expired_at=ENDPOINT_EXPIRES_AT,
        enabled=True,
        settings=orjson.loads(_dumps(settings)),
    )
    encode = tx.dialect.encode_time
    await tx.execute(
        f"INSERT INTO endpoints ({ENDPOINT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            endpoint.id, encode(moment), encode(moment), name, hook_id, tenant_id, user_id,
            plugin_id, encode(ENDPOINT_EXPIRES_AT), True, _dumps(settings),
        ),
    )
    await _add_endpoint_counters(tx, tenant_id, plugin_id, 1, 1)
    return endpoint


@read_only
async def get_endpoint(tx, tenant_id: str, endpoint_id: str):
    """One endpoint of a tenant, or None."""
    if not is_uuid(endpoint_id):
        return None
    rows = await tx.execute(
        f"SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id = ? AND tenant_id = ?",
        (endpoint_id, tenant_id),
    )
    return _endpoint(tx.dialect, rows[0]) if rows else None


@read_only
async def get_endpoint_by_hook_id(tx, hook_id: str):
    """The endpoint of a hook id, or None."""
    rows = await tx.execute(
        f"SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE hook_id = ?", (hook_id,)
    )
    return _endpoint(tx.dialect, rows[0]) if rows else None


@read_only
async def list_endpoints(tx, tenant_id: str, offset: int, limit: int) -> list:
    """A page of a tenant's endpoints, newest first."""
    rows = await tx.execute(
        f"SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE tenant_id = ? "
        "ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
        (tenant_id, limit, offset),
    )
    return [_endpoint(tx.dialect, row) for row in rows]


@read_only
async def list_plugin_endpoints(tx, tenant_id: str, plugin_id: str, offset: int, limit: int) -> list:
    """A page of a tenant's endpoints of one plugin, newest first."""
    rows = await tx.execute(
        f"SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE tenant_id = ? AND plugin_id = ? "
        "ORDER BY created_at DESC, id DESC LIMIT ? OFFSET ?",
        (tenant_id, plugin_id, limit, offset),
    )
    return [_endpoint(tx.dialect, row) for row in rows]


async def update_endpoint(tx, now: float, tenant_id: str, endpoint_id: str, name: str, settings: dict):
    """See :meth:`IPersistence.update_endpoint`."""
    endpoint = await _locked_endpoint(tx, tenant_id, endpoint_id)
    if endpoint is None:
        return None
    moment = utc_from_timestamp(now)
    await tx.execute(
        "UPDATE endpoints SET name = ?, settings = ?, updated_at = ? WHERE id = ?",
        (name, _dumps(settings), tx.dialect.encode_time(moment), endpoint.id),
    )
    return attrs.evolve(endpoint, name=name, settings=orjson.loads(_dumps(settings)), updated_at=moment)


async def set_endpoint_enabled(tx, now: float, tenant_id: str, endpoint_id: str, enabled: bool):
    """See :meth:`IPersistence.set_endpoint_enabled`."""
    endpoint = await _locked_endpoint(tx, tenant_id, endpoint_id)
    if endpoint is None or endpoint.enabled == enabled:
        return endpoint
    moment = utc_from_timestamp(now)
    await tx.execute(
        "UPDATE endpoints SET enabled = ?, updated_at = ? WHERE id = ?",
        (enabled, tx.dialect.encode_time(moment), endpoint.id),
    )
    await _add_endpoint_counters(tx, tenant_id, endpoint.plugin_id, 0, 1 if enabled else -1)
    return attrs.evolve(endpoint, enabled=enabled, updated_at=moment)


async def delete_endpoint(tx, tenant_id: str, endpoint_id: str) -> bool:
    """See :meth:`IPersistence.delete_endpoint`."""
    endpoint = await _locked_endpoint(tx, tenant_id, endpoint_id)
    if endpoint is None:
        return False
    await tx.execute("DELETE FROM endpoints WHERE id = ?", (endpoint.id,))
    # Deviation: the Go daemon takes one off endpoints_active even for a
    # disabled endpoint, which drifts the counter below the truth.
    await _add_endpoint_counters(tx, tenant_id, endpoint.plugin_id, -1, -1 if endpoint.enabled else 0)
    return True


# -- the IPersistence methods -------------------------------------------------


# -- serverless functions -------------------------------------------------------

SERVERLESS_COLUMNS = (
    "id, created_at, updated_at, plugin_unique_identifier, function_url, function_name, type, checksum"
)


def _serverless_runtime(dialect: Dialect, row) -> ServerlessRuntimeRecord:
    return ServerlessRuntimeRecord(
        id=str(row[0]),
        created_at=dialect.decode_time(row[1]),
        updated_at=dialect.decode_time(row[2]),
        plugin_unique_identifier=row[3],
        function_url=row[4],
        function_name=row[5],
        type=row[6],
        checksum=row[7],
    )


async def upsert_serverless_runtime(
    tx, now: float, identifier: str, function_url: str, function_name: str, checksum: str
) -> ServerlessRuntimeRecord:
    """Insert or update the function row of an identifier (Go's ON CONFLICT upsert)."""
    moment = tx.dialect.encode_time(utc_from_timestamp(now))
    await tx.execute(
        "INSERT INTO serverless_runtimes (id, created_at, updated_at, plugin_unique_identifier, "
        "function_url, function_name, type, checksum) VALUES (?, ?, ?, ?, ?, ?, 'serverless', ?) "
        "ON CONFLICT (plugin_unique_identifier) DO UPDATE SET function_url = excluded.function_url, "
        "function_name = excluded.function_name, checksum = excluded.checksum, type = excluded.type, "
        "updated_at = excluded.updated_at",
        (new_id(now), moment, moment, identifier, function_url, function_name, checksum),
    )
    return await get_serverless_runtime(tx, identifier)


@read_only
async def get_serverless_runtime(tx, identifier: str):
    """The function row of an identifier, or None."""
    rows = await tx.execute(
        f"SELECT {SERVERLESS_COLUMNS} FROM serverless_runtimes WHERE plugin_unique_identifier = ?",
        (identifier,),
    )
    return _serverless_runtime(tx.dialect, rows[0]) if rows else None


@read_only
async def list_serverless_runtimes(tx) -> list:
    """Every function row, oldest first."""
    rows = await tx.execute(f"SELECT {SERVERLESS_COLUMNS} FROM serverless_runtimes ORDER BY created_at, id", ())
    return [_serverless_runtime(tx.dialect, row) for row in rows]


class SQLPersistence:
    """
    The :class:`~difydaemon.interfaces.IPersistence` methods over the shared
    operations.

    Subclasses implement ``_transact(operation, *args)``: run
    ``await operation(tx, *args)`` in one transaction, commit if it returns,
    roll back if it raises, and give a Deferred of its result.  They also
    implement ``migrate`` and ``close``.  The public methods are documented
    on the interface.

    :param reactor: gives the time (``seconds()``) of timestamps and ids.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def _transact(self, operation, *args) -> Deferred:
        raise NotImplementedError()

    def _now(self) -> float:
        return self._reactor.seconds()

    async def _migrate(self) -> None:
        await self._transact(create_migrations_table)
        for migration in load_migrations(self._dialect.name):
            await self._transact(apply_migration, self._now(), migration)

    def install_plugin(
        self, tenant_id, plugin_unique_identifier, plugin_id, runtime_type, source, meta,
        providers, remote_declaration=None,
    ):
        return self._transact(
            install_plugin, self._now(), tenant_id, plugin_unique_identifier, plugin_id,
            runtime_type, source, meta, providers, remote_declaration,
        )

    def uninstall_plugin(self, tenant_id, installation_id):
        return self._transact(uninstall_plugin, self._now(), tenant_id, installation_id)

    def upgrade_plugin(self, tenant_id, original_identifier, new_identifier, providers, source, meta):
        return self._transact(
            upgrade_plugin, self._now(), tenant_id, original_identifier, new_identifier,
            providers, source, meta,
        )

    def get_plugin(self, plugin_unique_identifier):
        return self._transact(get_plugin, plugin_unique_identifier)

    def list_plugins(self, install_type):
        return self._transact(list_plugins, install_type)

    def get_installation(self, tenant_id, plugin_id):
        return self._transact(get_installation, tenant_id, plugin_id)

    def get_installation_by_id(self, tenant_id, installation_id):
        return self._transact(get_installation_by_id, tenant_id, installation_id)

    def list_installations(self, tenant_id, offset, limit):
        return self._transact(list_installations, tenant_id, offset, limit)

    def list_installations_by_plugin_ids(self, tenant_id, plugin_ids):
        return self._transact(list_installations_by_plugin_ids, tenant_id, list(plugin_ids))

    def list_installations_by_runtime_type(self, runtime_type):
        return self._transact(list_installations_by_runtime_type, runtime_type)

    def list_providers(self, kind, tenant_id, offset, limit):
        return self._transact(list_providers, kind, tenant_id, offset, limit)

    def get_provider(self, kind, tenant_id, plugin_id):
        return self._transact(get_provider, kind, tenant_id, plugin_id)

    def save_declaration(self, plugin_unique_identifier, plugin_id, declaration):
        return self._transact(
            save_declaration, self._now(), plugin_unique_identifier, plugin_id, declaration
        )

    def get_declaration(self, plugin_unique_identifier):
        return self._transact(get_declaration, plugin_unique_identifier)

    def get_declarations(self, plugin_unique_identifiers):
        return self._transact(get_declarations, list(plugin_unique_identifiers))

    def get_declarations_json(self, plugin_unique_identifiers, known=()):
        return self._transact(get_declarations_json, list(plugin_unique_identifiers), frozenset(known))

    def delete_declaration(self, plugin_unique_identifier):
        return self._transact(delete_declaration, plugin_unique_identifier)

    def get_readmes(self, plugin_unique_identifier):
        return self._transact(get_readmes, plugin_unique_identifier)

    def save_readme(self, plugin_unique_identifier, language, content):
        return self._transact(save_readme, self._now(), plugin_unique_identifier, language, content)

    def create_task(self, task):
        return self._transact(create_task, task)

    def update_task(self, task):
        return self._transact(update_task, self._now(), task)

    def get_task(self, tenant_id, task_id):
        return self._transact(get_task, tenant_id, task_id)

    def list_tasks(self, tenant_id, offset, limit):
        return self._transact(list_tasks, tenant_id, offset, limit)

    def list_tasks_by_status(self, statuses):
        return self._transact(list_tasks_by_status, list(statuses))

    def delete_task(self, tenant_id, task_id):
        return self._transact(delete_task, tenant_id, task_id)

    def delete_all_tasks(self, tenant_id):
        return self._transact(delete_all_tasks, tenant_id)

    def get_or_create_debugging_key(self, tenant_id, new_key, ttl):
        return self._transact(get_or_create_debugging_key, self._now(), tenant_id, new_key, ttl)

    def get_debugging_key(self, key):
        return self._transact(get_debugging_key, self._now(), key)

    def storage_get(self, tenant_id, plugin_id, key):
        return self._transact(storage_get, tenant_id, plugin_id, key)

    def storage_set(self, tenant_id, plugin_id, key, value, quota):
        return self._transact(
            storage_set, self._now(), tenant_id, plugin_id, key, bytes(value), quota
        )

    def storage_delete(self, tenant_id, plugin_id, key):
        return self._transact(storage_delete, self._now(), tenant_id, plugin_id, key)

    def storage_exists(self, tenant_id, plugin_id, key):
        return self._transact(storage_exists, tenant_id, plugin_id, key)

    def storage_size(self, tenant_id, plugin_id):
        return self._transact(storage_size, tenant_id, plugin_id)

    def create_endpoint(self, endpoint_id, tenant_id, user_id, plugin_id, name, settings):
        return self._transact(
            create_endpoint, self._now(), endpoint_id, new_hook_id(), tenant_id, user_id,
            plugin_id, name, settings,
        )

    def get_endpoint(self, tenant_id, endpoint_id):
        return self._transact(get_endpoint, tenant_id, endpoint_id)

    def get_endpoint_by_hook_id(self, hook_id):
        return self._transact(get_endpoint_by_hook_id, hook_id)

    def list_endpoints(self, tenant_id, offset, limit):
        return self._transact(list_endpoints, tenant_id, offset, limit)

    def list_plugin_endpoints(self, tenant_id, plugin_id, offset, limit):
        return self._transact(list_plugin_endpoints, tenant_id, plugin_id, offset, limit)

    def update_endpoint(self, tenant_id, endpoint_id, name, settings):
        return self._transact(update_endpoint, self._now(), tenant_id, endpoint_id, name, settings)

    def set_endpoint_enabled(self, tenant_id, endpoint_id, enabled):
        return self._transact(set_endpoint_enabled, self._now(), tenant_id, endpoint_id, bool(enabled))

    def delete_endpoint(self, tenant_id, endpoint_id):
        return self._transact(delete_endpoint, tenant_id, endpoint_id)

    def upsert_serverless_runtime(self, plugin_unique_identifier, function_url, function_name, checksum):
        return self._transact(
            upsert_serverless_runtime, self._now(), plugin_unique_identifier, function_url, function_name, checksum
        )

    def get_serverless_runtime(self, plugin_unique_identifier):
        return self._transact(get_serverless_runtime, plugin_unique_identifier)

    def list_serverless_runtimes(self):
        return self._transact(list_serverless_runtimes)
