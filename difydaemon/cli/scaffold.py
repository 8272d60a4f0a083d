"""
``dify plugin init``: the files of a new plugin (``runtimes.md`` §6), laid
out for the current SDK.

:func:`scaffold_files` is pure (the time comes in); :func:`write_scaffold`
puts the files on disk.
"""

from __future__ import annotations

import datetime
import os
import re
from string import Template

import yaml
from attrs import evolve, field, frozen

from difydaemon.cli import templates
from difydaemon.cli.errors import CommandError
from difydaemon.packaging.manifest import AUTHOR, PLUGIN_NAME, STORAGE_SIZE_MAX, STORAGE_SIZE_MIN

MODEL_CATEGORIES = ("llm", "text-embedding", "speech2text", "moderation", "rerank", "tts")
CATEGORIES = ("tool", *MODEL_CATEGORIES, "extension", "agent-strategy", "datasource", "trigger")
LANGUAGES = ("python",)
MEMORY = 268435456
DEFAULT_STORAGE_SIZE = 1048576
_MIN_DIFY_VERSION = re.compile(r"\d+(\.\d+){0,3}([a-z0-9.+-]*)", re.ASCII)


@frozen
class Permissions:
    """The ``resource.permission`` a plugin asks for (the ``--allow-*`` flags)."""

    endpoint: bool = False
    tool: bool = False
    model: bool = False
    llm: bool = False
    text_embedding: bool = False
    rerank: bool = False
    tts: bool = False
    speech2text: bool = False
    moderation: bool = False
    node: bool = False
    app: bool = False
    storage: bool = False
    storage_size: int = DEFAULT_STORAGE_SIZE

    def to_manifest(self) -> dict:
        """The manifest's ``resource.permission`` mapping (only what is asked for)."""
        result: dict = {}
        if self.tool:
            result["tool"] = {"enabled": True}
        model_kinds = ("llm", "text_embedding", "rerank", "tts", "speech2text", "moderation")
        if self.model or any(getattr(self, kind) for kind in model_kinds):
            result["model"] = {"enabled": True, **{kind: getattr(self, kind) for kind in model_kinds}}
        if self.node:
            result["node"] = {"enabled": True}
        if self.endpoint:
            result["endpoint"] = {"enabled": True}
        if self.app:
            result["app"] = {"enabled": True}
        if self.storage:
            result["storage"] = {"enabled": True, "size": self.storage_size}
        return result


@frozen
class ScaffoldOptions:
    """
    What ``dify plugin init`` was asked for.

    :ivar category: one of :data:`CATEGORIES`.
    :ivar min_dify_version: ``meta.minimum_dify_version``, or None.
    """

    author: str
    name: str
    description: str
    category: str = "tool"
    repo: str | None = None
    language: str = "python"
    min_dify_version: str | None = None
    permissions: Permissions = field(factory=Permissions)


def check_options(options: ScaffoldOptions) -> None:
    """
    Refuse options the daemon or the SDK would refuse later.

    :raises CommandError: naming the first bad option.
    """
    if AUTHOR.fullmatch(options.author) is None:
        raise CommandError(f"invalid --author {options.author!r}: use 1-64 of a-z, 0-9, _ and -")
    if PLUGIN_NAME.fullmatch(options.name) is None:
        raise CommandError(f"invalid --name {options.name!r}: use 1-128 of a-z, 0-9, _ and -")
    if not options.description.strip() or len(options.description) > 1023:
        raise CommandError("invalid --description: it must be 1 to 1023 characters")
    if options.category not in CATEGORIES:
        raise CommandError(f"invalid --category {options.category!r}: choose from {', '.join(CATEGORIES)}")
    if options.language not in LANGUAGES:
        raise CommandError(f"invalid --language {options.language!r}: only python is supported")
    if options.repo and not re.match(r"^[a-z][a-z0-9+.-]*://[^/\s]+", options.repo):
        raise CommandError(f"invalid --repo {options.repo!r}: it must be a URL")
    if options.min_dify_version and _MIN_DIFY_VERSION.fullmatch(options.min_dify_version) is None:
        raise CommandError(f"invalid --min-dify-version {options.min_dify_version!r}")
    size = options.permissions.storage_size
    if options.permissions.storage and not STORAGE_SIZE_MIN <= size <= STORAGE_SIZE_MAX:
        raise CommandError(f"invalid --storage-size {size}: it must be between {STORAGE_SIZE_MIN} and {STORAGE_SIZE_MAX}")


def class_prefix(name: str) -> str:
    """``my-plugin_x`` -> ``MyPluginX`` (a valid Python identifier)."""
    prefix = "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_]+", name) if part)
    if not prefix or prefix[0].isdigit():
        prefix = "Plugin" + prefix
    return prefix


def label_of(name: str) -> str:
    """``my-plugin`` -> ``My Plugin``."""
    return " ".join(part[:1].upper() + part[1:] for part in re.split(r"[-_]+", name) if part) or name


def _yaml_text(value: str) -> str:
    """A YAML scalar for a template slot (quoted when plain text would not survive)."""
    return yaml.safe_dump(value, default_style=None, width=10**6).strip().removesuffix("\n...").strip()


def _plugins_entry(category: str, name: str) -> tuple[str, str]:
    if category == "tool":
        return "tools", f"provider/{name}.yaml"
    if category in MODEL_CATEGORIES:
        return "models", f"provider/{name}.yaml"
    if category == "extension":
        return "endpoints", f"group/{name}.yaml"
    if category == "agent-strategy":
        return "agent_strategies", f"provider/{name}.yaml"
    if category == "datasource":
        return "datasources", f"provider/{name}.yaml"
    return "triggers", f"provider/{name}.yaml"


def manifest_text(options: ScaffoldOptions, created_at: str) -> str:
    """``manifest.yaml`` of a new plugin."""
    permissions = options.permissions
    if options.category == "extension" and not permissions.endpoint:
        # An endpoint plugin cannot serve anything without this.
        permissions = evolve(permissions, endpoint=True)
    kind, path = _plugins_entry(options.category, options.name)
    label = label_of(options.name)
    manifest: dict = {
        "version": "0.0.1",
        "type": "plugin",
        "author": options.author,
        "name": options.name,
        "label": {"en_US": label},
        "description": {"en_US": options.description},
        "icon": "icon.svg",
        "icon_dark": "icon-dark.svg",
        "resource": {"memory": MEMORY, "permission": permissions.to_manifest()},
        "plugins": {kind: [path]},
        "meta": {
            "version": "0.0.1",
            "arch": ["amd64", "arm64"],
            "runner": {"language": options.language, "version": "3.12", "entrypoint": "main"},
        },
        "created_at": created_at,
        "privacy": "PRIVACY.md",
    }
    if options.min_dify_version:
        manifest["meta"]["minimum_dify_version"] = options.min_dify_version
    if options.repo:
        manifest["repo"] = options.repo
    if options.category == "trigger":
        manifest["tags"] = ["trigger"]
    elif options.category == "agent-strategy":
        manifest["tags"] = ["agent"]
    return yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True, width=10**6)


def _category_files(options: ScaffoldOptions) -> dict[str, str]:
    name = options.name
    category = options.category
    if category == "tool":
        return {
            f"provider/{name}.yaml": templates.TOOL_PROVIDER_YAML,
            f"provider/{name}.py": templates.TOOL_PROVIDER_PY,
            f"tools/{name}.yaml": templates.TOOL_YAML,
            f"tools/{name}.py": templates.TOOL_PY,
        }
    if category in MODEL_CATEGORIES:
        key = category.replace("-", "_")
        return {
            f"provider/{name}.yaml": templates.MODEL_PROVIDER_YAML,
            f"provider/{name}.py": templates.MODEL_PROVIDER_PY,
            f"models/{key}/{key}.yaml": templates.MODEL_YAML[category],
            f"models/{key}/{key}.py": templates.MODEL_PY[category],
        }
    if category == "extension":
        return {
            f"group/{name}.yaml": templates.ENDPOINT_GROUP_YAML,
            f"endpoints/{name}.yaml": templates.ENDPOINT_YAML,
            f"endpoints/{name}.py": templates.ENDPOINT_PY,
        }
    if category == "agent-strategy":
        return {
            f"provider/{name}.yaml": templates.AGENT_PROVIDER_YAML,
            f"provider/{name}.py": templates.AGENT_PROVIDER_PY,
            f"strategies/{name}.yaml": templates.AGENT_STRATEGY_YAML,
            f"strategies/{name}.py": templates.AGENT_STRATEGY_PY,
        }
    if category == "datasource":
        return {
            f"provider/{name}.yaml": templates.DATASOURCE_PROVIDER_YAML,
            f"provider/{name}.py": templates.DATASOURCE_PROVIDER_PY,
            f"datasources/{name}.yaml": templates.DATASOURCE_YAML,
            f"datasources/{name}.py": templates.DATASOURCE_PY,
        }
    return {
        f"provider/{name}.yaml": templates.TRIGGER_PROVIDER_YAML,
        f"provider/{name}.py": templates.TRIGGER_PROVIDER_PY,
        f"events/{name}.yaml": templates.EVENT_YAML,
        f"events/{name}.py": templates.EVENT_PY,
    }


def format_created_at(now: datetime.datetime) -> str:
    """RFC 3339 with the zone, to the second (the local zone when ``now`` is naive)."""
    if now.tzinfo is None:
        now = now.astimezone()
    return now.isoformat(timespec="seconds")


def scaffold_files(options: ScaffoldOptions, now: datetime.datetime) -> dict[str, str]:
    """
    Every file of a new plugin, by path relative to the plugin directory.

    :raises CommandError: bad options (see :func:`check_options`).
    """
    check_options(options)
    label = label_of(options.name)
    category = options.category
    model_key = category.replace("-", "_")
    yaml_values = {
        "author": options.author,
        "name": options.name,
        "label": _yaml_text(label),
        "description": _yaml_text(options.description),
        "class_prefix": class_prefix(options.name),
        "model_type": category,
        "model_key": model_key,
        "model_name": f"{options.name}-{category}",
        "category": category,
    }
    text_values = dict(yaml_values, label=label, description=options.description)
    files = {
        "manifest.yaml": manifest_text(options, format_created_at(now)),
        "main.py": templates.MAIN_PY,
        "requirements.txt": templates.REQUIREMENTS,
        "_assets/icon.svg": templates.ICON_SVG,
        "_assets/icon-dark.svg": templates.ICON_DARK_SVG,
        "README.md": Template(templates.README_MD).substitute(text_values),
        "PRIVACY.md": Template(templates.PRIVACY_MD).substitute(text_values),
        ".difyignore": templates.DIFYIGNORE,
        ".gitignore": templates.GITIGNORE,
        ".env.example": templates.ENV_EXAMPLE,
    }
    for path, template in _category_files(options).items():
        values = yaml_values if path.endswith(".yaml") else text_values
        files[path] = Template(template).substitute(values)
    return files


def write_scaffold(parent: str, options: ScaffoldOptions, now: datetime.datetime) -> str:
    """
    Create ``<parent>/<name>/`` with the scaffold's files.

    :returns: the plugin directory.
    :raises CommandError: bad options, or the directory exists and is not empty.
    """
    files = scaffold_files(options, now)
    directory = os.path.join(parent, options.name)
    if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise CommandError(f"{directory} already exists and is not empty")
    try:
        for path, text in files.items():
            target = os.path.join(directory, *path.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "w", encoding="utf-8") as handle:
                handle.write(text)
    except OSError as error:
        raise CommandError(f"cannot write {error.filename}: {error.strerror}") from None
    return directory
