"""
``manifest.yaml``: the validation rules of ``runtimes.md`` §5.3 for the
plugin's own fields (the YAML itself is read by
:mod:`difydaemon.packaging.plugin_yaml`).

The result of :func:`normalise_manifest` is the top level of the
PluginDeclaration (``http-api.md`` §2.4), ready for JSON; the provider parts
are added by :mod:`difydaemon.packaging.declaration`.
"""

from __future__ import annotations

import datetime
import re
from urllib.parse import urlsplit

from difydaemon.errors import InvalidManifestError

MANIFEST_FILE = "manifest.yaml"
LANGUAGES = ("en_US", "zh_Hans", "ja_JP", "pt_BR")
TAGS = frozenset(
    (
        "search image videos weather finance design travel social news medical productivity "
        "education business entertainment utilities agent rag other trigger"
    ).split()
)
ARCHES = frozenset(("amd64", "arm64"))
PLUGIN_KINDS = ("tools", "models", "endpoints", "agent_strategies", "datasources", "triggers")
STORAGE_SIZE_MIN = 1024
STORAGE_SIZE_MAX = 1073741824
ZERO_TIME = "0001-01-01T00:00:00Z"

VERSION = re.compile(r"\d{1,4}(\.\d{1,4}){2}(-\w{1,16})?", re.ASCII)
AUTHOR = re.compile(r"[a-z0-9_-]{1,64}", re.ASCII)
PLUGIN_NAME = re.compile(r"[a-z0-9_-]{1,128}", re.ASCII)
IDENTITY_NAME = re.compile(r"[a-zA-Z0-9_-]+", re.ASCII)
_TIMESTAMP = re.compile(
    r"(\d{4})-(\d{1,2})-(\d{1,2})"
    r"(?:[Tt ](\d{1,2}):(\d{1,2}):(\d{1,2})(?:\.(\d{1,9}))?"
    r"\s*(Z|z|[+-]\d{2}:?\d{2})?)?",
    re.ASCII,
)


def require(condition: bool, field: str, problem: str) -> None:
    """Raise :class:`InvalidManifestError` naming ``field`` unless ``condition``."""
    if not condition:
        raise InvalidManifestError(f"invalid manifest field {field}: {problem}")


def i18n(value, field: str, required: bool = True, max_length: int = 1023) -> dict | None:
    """
    Normalise an I18n object: ``en_US`` (1..max chars) plus the non-empty
    ones of zh_Hans, ja_JP, pt_BR; other languages are dropped, as Go does.
    A bare string is taken as every language's text.
    """
    if value is None and not required:
        return None
    if isinstance(value, str):
        value = {"en_US": value}
    require(isinstance(value, dict), field, "must be an object with en_US")
    result = {}
    for language in LANGUAGES:
        text = value.get(language)
        if text is None or text == "":
            continue
        require(isinstance(text, (str, int, float)) and not isinstance(text, bool), f"{field}.{language}", "must be a string")
        text = str(text)
        require(len(text) <= max_length, f"{field}.{language}", f"must be at most {max_length} characters")
        result[language] = text
    require("en_US" in result, f"{field}.en_US", "is required")
    return result


def i18n_lenient(value) -> dict | None:
    """
    An I18n object taken as it comes (nested declaration texts are not
    validated by the Go daemon at install): only the four languages, as strings.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return {"en_US": value}
    if not isinstance(value, dict):
        return None
    result = {"en_US": ""}
    for language in LANGUAGES:
        text = value.get(language)
        if text is not None and text != "":
            result[language] = str(text)
    return result


def check_version(value, field: str) -> str:
    """A ``major.minor.patch[-suffix]`` version string."""
    require(isinstance(value, str) and VERSION.fullmatch(value) is not None, field,
            r"must match ^\d{1,4}(\.\d{1,4}){2}(-\w{1,16})?$")
    return value


def format_created_at(value) -> str:
    """
    RFC 3339 (Go's RFC3339Nano) with a zone, from what yaml.v3 accepts as a
    timestamp; a missing value is Go's zero time.
    """
    if value is None or value == "":
        return ZERO_TIME
    match = _TIMESTAMP.fullmatch(str(value).strip()) if isinstance(value, str) else None
    require(match is not None, "created_at", "must be an RFC 3339 timestamp")
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        datetime.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0))
    except ValueError:
        require(False, "created_at", "must be a valid date and time")
    text = f"{int(year):04d}-{int(month):02d}-{int(day):02d}T{int(hour or 0):02d}:{int(minute or 0):02d}:{int(second or 0):02d}"
    fraction = (fraction or "").rstrip("0")
    if fraction:
        text += "." + fraction
    if zone is None or zone in ("Z", "z"):
        return text + "Z"
    sign, digits = zone[0], zone[1:].replace(":", "")
    require(int(digits[:2]) < 24 and int(digits[2:]) < 60, "created_at", "bad zone offset")
    if int(digits) == 0:
        return text + "Z"
    return f"{text}{sign}{digits[:2]}:{digits[2:]}"


def _permission(value) -> dict:
    require(isinstance(value, dict), "resource.permission", "must be an object")
    result: dict = {}
    for kind in ("tool", "node", "endpoint", "app"):
        if value.get(kind) is not None:
            entry = value[kind]
            require(isinstance(entry, dict), f"resource.permission.{kind}", "must be an object")
            result[kind] = {"enabled": bool(entry.get("enabled", False))}
    if value.get("model") is not None:
        entry = value["model"]
        require(isinstance(entry, dict), "resource.permission.model", "must be an object")
        result["model"] = {
            key: bool(entry.get(key, False))
            for key in ("enabled", "llm", "text_embedding", "rerank", "tts", "speech2text", "moderation")
        }
    if value.get("storage") is not None:
        entry = value["storage"]
        require(isinstance(entry, dict), "resource.permission.storage", "must be an object")
        size = entry.get("size", 0)
        require(
            isinstance(size, int) and not isinstance(size, bool) and STORAGE_SIZE_MIN <= size <= STORAGE_SIZE_MAX,
            "resource.permission.storage.size",
            f"must be between {STORAGE_SIZE_MIN} and {STORAGE_SIZE_MAX}",
        )
        result["storage"] = {"enabled": bool(entry.get("enabled", False)), "size": size}
    return result


def _tags(value, field: str) -> list[str]:
    if value is None:
        return []
    require(isinstance(value, list), field, "must be a list")
    for tag in value:
        require(isinstance(tag, str) and tag in TAGS, field, f"unknown tag {tag!r}")
    return list(value)


def check_tags(value, field: str) -> list[str]:
    """A list of tags from the fixed vocabulary (None -> [])."""
    return _tags(value, field)


def normalise_manifest(manifest: dict) -> dict:
    """
    Validate the plugin's own fields and give them the JSON shape of the
    PluginDeclaration top level.

    :raises InvalidManifestError: naming the first field that breaks a rule.
    """
    version = check_version(manifest.get("version"), "version")
    require(manifest.get("type") == "plugin", "type", "must be 'plugin'")
    author = manifest.get("author")
    require(isinstance(author, str) and AUTHOR.fullmatch(author) is not None, "author",
            "must match ^[a-z0-9_-]{1,64}$")
    name = manifest.get("name")
    require(isinstance(name, str) and PLUGIN_NAME.fullmatch(name) is not None, "name",
            "must match ^[a-z0-9_-]{1,128}$")
    label = i18n(manifest.get("label"), "label")
    description = i18n(manifest.get("description"), "description")

    icon = manifest.get("icon")
    require(isinstance(icon, str) and icon != "", "icon", "is required")
    require(len(icon) <= 128, "icon", "must be at most 128 characters")
    icon_dark = manifest.get("icon_dark") or ""
    require(isinstance(icon_dark, str) and len(icon_dark) <= 128, "icon_dark", "must be a string of at most 128 characters")

    resource = manifest.get("resource")
    require(isinstance(resource, dict), "resource", "is required")
    memory = resource.get("memory")
    require(isinstance(memory, int) and not isinstance(memory, bool) and memory > 0, "resource.memory",
            "must be a positive number of bytes")
    normal_resource: dict = {"memory": memory}
    if resource.get("permission") is not None:
        normal_resource["permission"] = _permission(resource["permission"])

    plugins = manifest.get("plugins")
    require(isinstance(plugins, dict), "plugins", "is required")
    normal_plugins = {}
    for kind in PLUGIN_KINDS:
        paths = plugins.get(kind) or []
        require(isinstance(paths, list), f"plugins.{kind}", "must be a list of paths")
        for path in paths:
            require(isinstance(path, str) and 0 < len(path) <= 128, f"plugins.{kind}",
                    "entries must be paths of at most 128 characters")
        normal_plugins[kind] = list(paths)

    meta = manifest.get("meta")
    require(isinstance(meta, dict), "meta", "is required")
    meta_version = check_version(meta.get("version"), "meta.version")
    arch = meta.get("arch")
    require(isinstance(arch, list) and len(arch) > 0, "meta.arch", "is required")
    for value in arch:
        require(isinstance(value, str) and value in ARCHES, "meta.arch", f"unknown architecture {value!r}")
    runner = meta.get("runner")
    require(isinstance(runner, dict), "meta.runner", "is required")
    require(runner.get("language") == "python", "meta.runner.language", "must be 'python'")
    runner_version = runner.get("version")
    require(isinstance(runner_version, (str, int, float)) and not isinstance(runner_version, bool)
            and 0 < len(str(runner_version)) <= 128, "meta.runner.version", "is required (at most 128 characters)")
    entrypoint = runner.get("entrypoint")
    require(isinstance(entrypoint, str) and 0 < len(entrypoint) <= 256, "meta.runner.entrypoint",
            "is required (at most 256 characters)")
    minimum = meta.get("minimum_dify_version")
    require(minimum is None or isinstance(minimum, str), "meta.minimum_dify_version", "must be a string")

    declaration = {
        "version": version,
        "type": "plugin",
        "author": author,
        "name": name,
        "label": label,
        "description": description,
        "icon": icon,
        "icon_dark": icon_dark,
        "resource": normal_resource,
        "plugins": normal_plugins,
        "meta": {
            "version": meta_version,
            "arch": list(arch),
            "runner": {"language": "python", "version": str(runner_version), "entrypoint": entrypoint},
            "minimum_dify_version": minimum,
        },
        "tags": _tags(manifest.get("tags"), "tags"),
        "created_at": format_created_at(manifest.get("created_at")),
        "verified": False,
    }
    privacy = manifest.get("privacy")
    if privacy is not None:
        require(isinstance(privacy, str), "privacy", "must be a string")
        declaration["privacy"] = privacy
    repo = manifest.get("repo")
    if repo is not None and repo != "":
        try:
            parts = urlsplit(repo) if isinstance(repo, str) else None
        except ValueError:
            # urlsplit refuses some texts outright (an unclosed "[" host).
            parts = None
        require(parts is not None and parts.scheme != "" and parts.netloc != "", "repo", "must be a URL")
        declaration["repo"] = repo
    return declaration
