"""
The JSON shapes Dify parses from management routes (``http-api.md`` §2.4).

Pure functions from records and declarations to JSON-ready dicts.  A
declaration is a :class:`~difydaemon.management.declarations.Declaration`
(or None): it is embedded as the JSON bytes it holds, never re-encoded.
"""

from __future__ import annotations

from difydaemon.management.declarations import Declaration
from difydaemon.packaging.identifier import parse_identifier
from difydaemon.persistence.records import Installation, InstallTask, ProviderInstallation

#: provider kind -> the declaration key holding its provider declaration
DECLARATION_KEYS = {
    "tool": "tool",
    "model": "model",
    "agent_strategy": "agent_strategy",
    "datasource": "datasource",
    "trigger": "trigger",
}

#: category names of ``/installation/ids`` and ``/:category/list``
CATEGORIES = ("tool", "model", "extension", "agent-strategy", "datasource", "trigger")


def installation_json(inst: Installation) -> dict:
    """An installation row as the batch route returns it."""
    return {
        "id": inst.id,
        "created_at": inst.created_at,
        "updated_at": inst.updated_at,
        "tenant_id": inst.tenant_id,
        "plugin_id": inst.plugin_id,
        "plugin_unique_identifier": inst.plugin_unique_identifier,
        "runtime_type": inst.runtime_type,
        "endpoints_setups": inst.endpoints_setups,
        "endpoints_active": inst.endpoints_active,
        "source": inst.source,
        "meta": inst.meta,
    }


def installation_with_declaration(inst: Installation, declaration: Declaration | None) -> dict:
    """The batch row: the installation plus version, checksum and declaration."""
    ident = parse_identifier(inst.plugin_unique_identifier)
    row = installation_json(inst)
    row["version"] = ident.version
    row["checksum"] = ident.checksum
    row["declaration"] = None if declaration is None else declaration.fragment()
    return row


def plugin_entity(inst: Installation, stored: Declaration | None) -> dict:
    """A PluginEntity of the ``list`` routes."""
    ident = parse_identifier(inst.plugin_unique_identifier)
    declaration = {} if stored is None else stored.value
    return {
        "id": inst.id,
        "installation_id": inst.id,
        "name": declaration.get("name", ident.name),
        "plugin_id": inst.plugin_id,
        "tenant_id": inst.tenant_id,
        "plugin_unique_identifier": inst.plugin_unique_identifier,
        "endpoints_active": inst.endpoints_active,
        "endpoints_setups": inst.endpoints_setups,
        "declaration": {} if stored is None else stored.fragment(),
        "runtime_type": inst.runtime_type,
        "version": declaration.get("version", ident.version),
        "created_at": inst.created_at,
        "updated_at": inst.updated_at,
        "source": inst.source,
        "checksum": ident.checksum,
        "meta": inst.meta,
    }


def provider_json(kind: str, row: ProviderInstallation, declaration: Declaration | None) -> dict:
    """A provider row (tools, models, ...) with its provider declaration."""
    out = {
        "id": row.id,
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "tenant_id": row.tenant_id,
        "provider": row.provider,
        "plugin_unique_identifier": row.plugin_unique_identifier,
        "plugin_id": row.plugin_id,
        "declaration": None if declaration is None else declaration.part(DECLARATION_KEYS[kind]),
    }
    if kind == "agent_strategy":
        out["meta"] = None if declaration is None else declaration.part("meta")
    return out


def task_json(task: InstallTask) -> dict:
    """An InstallTask as Dify parses it."""
    return {
        "id": task.id,
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "status": task.status,
        "tenant_id": task.tenant_id,
        "total_plugins": task.total_plugins,
        "completed_plugins": task.completed_plugins,
        "plugins": [
            {
                "plugin_unique_identifier": p.plugin_unique_identifier,
                "plugin_id": p.plugin_id,
                "status": p.status,
                "message": p.message,
                "icon": p.icon,
                "icon_dark": p.icon_dark,
                "labels": p.labels,
                "source": p.source,
            }
            for p in task.plugins
        ],
    }


def matches_query(declaration: dict, plugin_id: str, query: str, language: str) -> bool:
    """
    The case-insensitive substring search of ``/:category/list`` over the
    plugin id, name, and the localized label and description.
    """
    if not query:
        return True
    needle = query.lower()
    texts = [plugin_id, declaration.get("name", "")]
    for key in ("label", "description"):
        i18n = declaration.get(key) or {}
        if isinstance(i18n, dict):
            texts.append(i18n.get(language) or i18n.get("en_US") or "")
    return any(needle in (text or "").lower() for text in texts)
