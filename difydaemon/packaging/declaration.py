"""
The PluginDeclaration of a package (``http-api.md`` §4.5, ``runtimes.md``
§5.2): ``manifest.yaml`` plus every provider file it references, normalised
as the Go daemon's structs marshal them so that Dify's pydantic models parse
the result, with the install-time checks of §5.3.

Declarations are plain JSON-ready dicts: they are stored and sent as JSON,
and their many optional shapes are Dify's to interpret.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from difydaemon.errors import InvalidManifestError
from difydaemon.packaging.manifest import (
    IDENTITY_NAME,
    MANIFEST_FILE,
    LANGUAGES,
    check_tags,
    i18n_lenient,
    normalise_manifest,
    require,
)

if TYPE_CHECKING:
    # imported where a declaration is built: the daemon, which builds none
    # (its decoder children do), never loads PyYAML
    from difydaemon.packaging.plugin_yaml import PackageYaml

ASSETS_DIR = "_assets/"
MODEL_POSITION_TYPES = ("llm", "text_embedding", "tts", "speech2text", "moderation", "rerank")
MODEL_ICON_FIELDS = ("icon_small", "icon_large", "icon_small_dark", "icon_large_dark")

# The Go daemon's use_template defaults (model_declaration.go); a rule that
# names one of these gets the missing fields from it.
_RULE_TEMPLATES = {
    "temperature": {
        "type": "float", "default": 0.0, "min": 0.0, "max": 1.0, "precision": 2,
        "help": {
            "en_US": "Controls randomness. Lower temperature results in less random completions. As the "
                     "temperature approaches zero, the model will become deterministic and repetitive. Higher "
                     "temperature results in more random completions.",
        },
    },
    "top_p": {
        "type": "float", "default": 1.0, "min": 0.0, "max": 1.0, "precision": 2,
        "help": {
            "en_US": "Controls diversity via nucleus sampling: 0.5 means half of all likelihood-weighted "
                     "options are considered.",
        },
    },
    "top_k": {
        "type": "int", "default": 50, "min": 1.0, "max": 100.0, "precision": 0,
        "help": {
            "en_US": "Limits the number of tokens to consider for each step by keeping only the k most "
                     "likely tokens.",
        },
    },
    "presence_penalty": {
        "type": "float", "default": 0.0, "min": 0.0, "max": 1.0, "precision": 2,
        "help": {"en_US": "Applies a penalty to the log-probability of tokens already in the text."},
    },
    "frequency_penalty": {
        "type": "float", "default": 0.0, "min": 0.0, "max": 1.0, "precision": 2,
        "help": {"en_US": "Applies a penalty to the log-probability of tokens that appear in the text."},
    },
    "max_tokens": {
        "type": "int", "default": 64, "min": 1.0, "max": 2048.0, "precision": 0,
        "help": {
            "en_US": "Specifies the upper limit on the length of generated results. If the generated results "
                     "are truncated, you can increase this parameter.",
        },
    },
    "response_format": {
        "type": "string", "options": ["JSON", "XML"],
        "help": {
            "en_US": "Set a response format, ensure the output from llm is a valid code block as possible, "
                     "such as JSON, XML, etc.",
        },
    },
    "json_schema": {
        "type": "string",
        "help": {"en_US": "Set a response json schema will ensure LLM to adhere it."},
    },
}


# ---------------------------------------------------------------------------
# shared pieces


def _list(value, field: str) -> list:
    if value is None:
        return []
    require(isinstance(value, list), field, "must be a list")
    return value


def _provider_configs(value, field: str) -> list:
    """Credentials/settings: a list, or a map whose keys become ``name``."""
    if value is None or value == "" or value == {} or value == []:
        return []
    if isinstance(value, dict):
        configs = []
        for key, config in value.items():
            require(isinstance(config, dict), f"{field}.{key}", "must be an object")
            configs.append({**config, "name": key})
        return configs
    require(isinstance(value, list), field, "must be a list or a map")
    for config in value:
        require(isinstance(config, dict), field, "entries must be objects")
    return [dict(config) for config in value]


def _children(package: PackageYaml, provider: dict, key: str, kind: str) -> list[dict]:
    """The items a provider lists under ``key``: file paths or inline objects."""
    items = []
    for entry in _list(provider.get(key), f"{kind}.{key}"):
        if isinstance(entry, str):
            items.append(package.mapping(entry, kind))
        elif isinstance(entry, dict):
            items.append(entry)
    return items


def _without_extra(item: dict) -> dict:
    # The SDK's ``extra.python.source`` is runtime wiring, not declaration.
    return {key: value for key, value in item.items() if key != "extra"}


def _identity_name(identity: dict, field: str) -> str:
    name = identity.get("name")
    require(isinstance(name, str) and IDENTITY_NAME.fullmatch(name) is not None, f"{field}.name",
            "must match ^[a-zA-Z0-9_-]+$")
    return name


def _provider_identity(identity, field: str, plugin: dict, inherit: bool) -> dict:
    require(isinstance(identity, dict), field, "is required")
    result = dict(identity)
    _identity_name(identity, field)
    require(isinstance(identity.get("author"), str) and identity["author"] != "", f"{field}.author", "is required")
    label = i18n_lenient(identity.get("label"))
    require(label is not None and label.get("en_US"), f"{field}.label.en_US", "is required")
    result["label"] = label
    icon = identity.get("icon")
    require(isinstance(icon, str) and icon != "", f"{field}.icon", "is required")
    result["icon_dark"] = identity.get("icon_dark") or ""
    description = i18n_lenient(identity.get("description"))
    if inherit and (description is None or not description.get("en_US")):
        description = dict(plugin["description"])
    result["description"] = description if description is not None else {"en_US": ""}
    tags = check_tags(identity.get("tags"), f"{field}.tags")
    if inherit and not tags:
        tags = list(plugin["tags"])
    result["tags"] = tags
    return result


def _parameter(parameter: dict, defaults: dict) -> dict:
    result = dict(defaults)
    result.update(parameter)
    if "label" in result:
        result["label"] = i18n_lenient(result["label"])
    if result.get("options") is None:
        result["options"] = []
    return result


_TOOL_PARAMETER_DEFAULTS = {
    "scope": None, "llm_description": "", "required": False, "auto_generate": None, "template": None,
    "default": None, "min": None, "max": None, "multiple": False, "precision": None, "options": [],
}
_STRATEGY_PARAMETER_DEFAULTS = {
    "help": None, "auto_generate": None, "template": None, "scope": None, "required": False,
    "default": None, "min": None, "max": None, "precision": None, "options": [],
}
_DATASOURCE_PARAMETER_DEFAULTS = {
    "scope": None, "required": False, "auto_generate": None, "template": None, "default": None,
    "min": None, "max": None, "precision": None, "options": [],
}


def _parameters(value, field: str, defaults: dict) -> list[dict]:
    parameters = []
    for parameter in _list(value, field):
        require(isinstance(parameter, dict), field, "entries must be objects")
        parameters.append(_parameter(parameter, defaults))
    return parameters


# ---------------------------------------------------------------------------
# one function per provider kind


def _tool_provider(package: PackageYaml, path: str, plugin: dict) -> dict:
    raw = package.mapping(path, "tool file")
    provider = _without_extra(raw)
    for key in ("credentials_for_provider",):
        provider.pop(key, None)
    provider["identity"] = _provider_identity(raw.get("identity"), "tool.identity", plugin, inherit=True)
    credentials = raw.get("credentials_schema")
    if credentials in (None, "", [], {}):
        credentials = raw.get("credentials_for_provider")
    provider["credentials_schema"] = _provider_configs(credentials, "tool.credentials_schema")
    provider["oauth_schema"] = raw.get("oauth_schema")
    tools = []
    for index, tool in enumerate(_children(package, raw, "tools", "tool file")):
        field = f"tool.tools[{index}]"
        tool = _child_entry(tool, field)
        description = tool.get("description")
        if isinstance(description, dict):
            tool["description"] = {**description, "human": i18n_lenient(description.get("human"))}
        tool["parameters"] = _parameters(tool.get("parameters"), f"{field}.parameters", _TOOL_PARAMETER_DEFAULTS)
        tool.setdefault("has_runtime_parameters", False)
        if not tool.get("output_schema"):
            tool.pop("output_schema", None)
        tools.append(tool)
    provider["tools"] = tools
    return provider


def _endpoint_group(package: PackageYaml, path: str) -> dict:
    raw = package.mapping(path, "endpoint file")
    group = _without_extra(raw)
    group["settings"] = _provider_configs(raw.get("settings"), "endpoint.settings")
    endpoints = []
    for endpoint in _children(package, raw, "endpoints", "endpoint file"):
        endpoint = _without_extra(endpoint)
        endpoint.setdefault("hidden", False)
        endpoints.append(endpoint)
    group["endpoints"] = endpoints
    return group


def _go_glob(pattern: str) -> re.Pattern:
    """Go's ``filepath.Match``: ``*`` and ``?`` never cross ``/``."""
    out = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "\\" and index + 1 < len(pattern):
            index += 1
            out.append(re.escape(pattern[index]))
        elif char == "[":
            end = pattern.find("]", index + 2)
            if end == -1:
                raise InvalidManifestError(f"invalid model file pattern: {pattern!r}")
            out.append("[" + _go_class(pattern[index + 1 : end]) + "]")
            index = end
        else:
            out.append(re.escape(char))
        index += 1
    try:
        return re.compile("".join(out))
    except re.error as error:
        # A range whose ends are reversed ("[z-a]") and the like.
        raise InvalidManifestError(f"invalid model file pattern: {pattern!r} ({error})") from None


def _go_class(body: str) -> str:
    """The inside of a ``[...]`` of a Go pattern as a regex class: ranges kept, all else literal."""
    out = []
    if body.startswith("^"):
        out.append("^/")
        body = body[1:]
    index = 0
    while index < len(body):
        char = body[index]
        if char == "\\" and index + 1 < len(body):
            index += 1
            out.append(re.escape(body[index]))
        elif char == "-":
            out.append("-")
        else:
            out.append(re.escape(char))
        index += 1
    return "".join(out)


def _parameter_rule(rule: dict, field: str) -> dict:
    require(isinstance(rule, dict), field, "must be an object")
    result = {
        "name": rule.get("name"), "use_template": None, "label": None, "type": None, "help": None,
        "required": False, "default": None, "min": None, "max": None, "precision": None, "options": None,
    }
    result.update(rule)
    label = i18n_lenient(result.get("label"))
    # Go fills the label from the rule name before it looks at the template,
    # so a template's label never shows; Dify has always seen the name.
    result["label"] = label if label and label.get("en_US") else {"en_US": str(rule.get("name", ""))}
    template_name = result.get("use_template")
    if template_name:
        template = _RULE_TEMPLATES.get(template_name) if isinstance(template_name, str) else None
        require(template is not None, f"{field}.use_template", f"unknown template {template_name!r}")
        for key, value in template.items():
            if result.get(key) is None:
                result[key] = copy.deepcopy(value)
    if result.get("help") is not None:
        result["help"] = i18n_lenient(result["help"])
    if result.get("options") is None:
        result["options"] = []
    return result


def _model(model: dict, field: str) -> dict:
    result = {
        "model": model.get("model"), "label": None, "model_type": model.get("model_type"), "features": None,
        "fetch_from": "predefined-model", "model_properties": {}, "deprecated": False,
        "parameter_rules": [], "pricing": None,
    }
    result.update(_without_extra(model))
    label = i18n_lenient(result.get("label")) or {"en_US": ""}
    if not label.get("en_US"):
        label["en_US"] = str(result.get("model") or "")
    result["label"] = label
    if not result.get("fetch_from"):
        result["fetch_from"] = "predefined-model"
    if result.get("model_properties") is None:
        result["model_properties"] = {}
    result["parameter_rules"] = [
        _parameter_rule(rule, f"{field}.parameter_rules[{index}]")
        for index, rule in enumerate(_list(result.get("parameter_rules"), f"{field}.parameter_rules"))
    ]
    return result


def _model_provider(package: PackageYaml, path: str, plugin: dict) -> dict:
    raw = package.mapping(path, "model file")
    provider = _without_extra(raw)
    provider_name = raw.get("provider")
    require(isinstance(provider_name, str) and 0 < len(provider_name) < 256, "model.provider", "is required")
    label = i18n_lenient(raw.get("label"))
    require(label is not None and label.get("en_US"), "model.label.en_US", "is required")
    provider["label"] = label
    description = i18n_lenient(raw.get("description"))
    provider["description"] = description if description is not None else dict(plugin["description"])
    for key in MODEL_ICON_FIELDS:
        provider[key] = i18n_lenient(raw.get(key))
    for key in ("provider_credential_schema", "model_credential_schema"):
        schema = raw.get(key)
        if isinstance(schema, dict):
            schema = dict(schema)
            schema["credential_form_schemas"] = _list(schema.get("credential_form_schemas"), f"model.{key}")
        provider[key] = schema
    provider.setdefault("background", None)
    provider.setdefault("help", None)
    provider["supported_model_types"] = _list(raw.get("supported_model_types"), "model.supported_model_types")
    provider["configurate_methods"] = _list(raw.get("configurate_methods"), "model.configurate_methods")

    models_spec = raw.get("models")
    models: list[dict] = []
    if isinstance(models_spec, dict):
        patterns: list[str] = []
        position: dict = {}
        for model_type in MODEL_POSITION_TYPES:
            spec = models_spec.get(model_type)
            if not isinstance(spec, dict):
                continue
            position_file = spec.get("position")
            if isinstance(position_file, str) and position_file:
                names = package.load(position_file, f"{model_type} position file")
                require(isinstance(names, list) and all(isinstance(name, str) for name in names),
                        f"model.models.{model_type}.position", f"{position_file} must be a list of model names")
                position[model_type] = names
            for pattern in _list(spec.get("predefined"), f"model.models.{model_type}.predefined"):
                if isinstance(pattern, str):
                    patterns.append(pattern)
        compiled = [_go_glob(pattern) for pattern in patterns]
        for name in package.files:
            if name.endswith("_position.yaml"):
                continue
            for regexp in compiled:
                if regexp.fullmatch(name):
                    models.append(package.mapping(name, "model file"))
        provider["position"] = position
    elif isinstance(models_spec, list):
        models = [model for model in models_spec if isinstance(model, dict)]
        provider.pop("position", None)
    provider["models"] = [_model(model, f"model.models[{index}]") for index, model in enumerate(models)]
    return provider


def _child_entry(entry: dict, field: str) -> dict:
    """
    A tool, strategy or event of a provider without ``extra``, its identity
    required, its name checked and its label normalised.
    """
    entry = _without_extra(entry)
    identity = entry.get("identity")
    require(isinstance(identity, dict), f"{field}.identity", "is required")
    _identity_name(identity, f"{field}.identity")
    entry["identity"] = {**identity, "label": i18n_lenient(identity.get("label"))}
    return entry


def _agent_strategy_provider(package: PackageYaml, path: str, plugin: dict) -> dict:
    raw = package.mapping(path, "agent strategy file")
    provider = _without_extra(raw)
    provider["identity"] = _provider_identity(raw.get("identity"), "agent_strategy.identity", plugin, inherit=False)
    strategies = []
    for index, strategy in enumerate(_children(package, raw, "strategies", "agent strategy file")):
        field = f"agent_strategy.strategies[{index}]"
        strategy = _child_entry(strategy, field)
        strategy["description"] = i18n_lenient(strategy.get("description"))
        strategy["parameters"] = _parameters(
            strategy.get("parameters"), f"{field}.parameters", _STRATEGY_PARAMETER_DEFAULTS
        )
        strategy.setdefault("output_schema", None)
        if strategy.get("features") is None:
            strategy["features"] = []
        strategies.append(strategy)
    provider["strategies"] = strategies
    return provider


def _datasource_provider(package: PackageYaml, path: str, plugin: dict) -> dict:
    raw = package.mapping(path, "datasource file")
    provider = _without_extra(raw)
    identity = raw.get("identity")
    require(isinstance(identity, dict), "datasource.identity", "is required")
    _identity_name(identity, "datasource.identity")
    identity = dict(identity)
    identity["label"] = i18n_lenient(identity.get("label"))
    identity["description"] = i18n_lenient(identity.get("description"))
    require(isinstance(identity.get("icon"), str) and identity["icon"] != "", "datasource.identity.icon", "is required")
    identity["tags"] = check_tags(identity.get("tags"), "datasource.identity.tags")
    provider["identity"] = identity
    provider["credentials_schema"] = _provider_configs(raw.get("credentials_schema"), "datasource.credentials_schema")
    provider["oauth_schema"] = raw.get("oauth_schema")
    datasources = []
    for index, datasource in enumerate(_children(package, raw, "datasources", "datasource file")):
        field = f"datasource.datasources[{index}]"
        datasource = _without_extra(datasource)
        ds_identity = datasource.get("identity")
        require(isinstance(ds_identity, dict), f"{field}.identity", "is required")
        datasource["identity"] = {**ds_identity, "label": i18n_lenient(ds_identity.get("label"))}
        datasource["description"] = i18n_lenient(datasource.get("description"))
        datasource["parameters"] = _parameters(
            datasource.get("parameters"), f"{field}.parameters", _DATASOURCE_PARAMETER_DEFAULTS
        )
        if not datasource.get("output_schema"):
            datasource.pop("output_schema", None)
        datasources.append(datasource)
    provider["datasources"] = datasources
    return provider


def _trigger_provider(package: PackageYaml, path: str, plugin: dict) -> dict:
    raw = package.mapping(path, "trigger file")
    provider = _without_extra(raw)
    provider["identity"] = _provider_identity(raw.get("identity"), "trigger.identity", plugin, inherit=True)
    provider["subscription_schema"] = _provider_configs(raw.get("subscription_schema"), "trigger.subscription_schema")
    constructor = raw.get("subscription_constructor")
    if isinstance(constructor, dict):
        constructor = dict(constructor)
        constructor["parameters"] = _list(constructor.get("parameters"), "trigger.subscription_constructor.parameters")
        constructor["credentials_schema"] = _provider_configs(
            constructor.get("credentials_schema"), "trigger.subscription_constructor.credentials_schema"
        )
    provider["subscription_constructor"] = constructor
    events = []
    for index, event in enumerate(_children(package, raw, "events", "event file")):
        field = f"trigger.events[{index}]"
        event = _child_entry(event, field)
        event["description"] = i18n_lenient(event.get("description"))
        event["parameters"] = _list(event.get("parameters"), f"{field}.parameters")
        events.append(event)
    provider["events"] = events
    return provider


# ---------------------------------------------------------------------------
# public API


def _check_kinds(declaration: dict) -> None:
    present = [kind for kind in ("tool", "model", "endpoint", "agent_strategy", "datasource", "trigger")
               if kind in declaration]
    if not present:
        raise InvalidManifestError(
            "invalid manifest field plugins: at least one of tool, model, endpoint, agent_strategy, "
            "datasource or trigger must be provided"
        )
    for exclusive in ("model", "agent_strategy", "datasource", "trigger"):
        if exclusive in present and len(present) > 1:
            others = ", ".join(kind for kind in present if kind != exclusive)
            raise InvalidManifestError(
                f"invalid manifest field plugins: {exclusive} cannot be provided together with {others}"
            )


def build_declaration(
    files: Mapping[str, bytes], package: PackageYaml | None = None, manifest: dict | None = None
) -> dict:
    """
    The PluginDeclaration (JSON-ready dict, ``verified`` false) of a package.

    :param package: the package's YAML with the budget it reads under (one
        for ``files`` alone by default).
    :param manifest: ``manifest.yaml`` already read through ``package``.
    :raises InvalidManifestError: a rule is broken (names the field) or a
        referenced file is missing (names the file).
    :raises MalformedPackageError: a YAML file cannot be parsed or is over a
        limit (names it).
    """
    if package is None:
        from difydaemon.packaging.plugin_yaml import PackageYaml

        package = PackageYaml(files)
    if manifest is None:
        manifest = package.mapping(MANIFEST_FILE, "manifest file")
    declaration = normalise_manifest(manifest)
    plugins = declaration["plugins"]
    # Only one provider per kind is kept, the last one listed, as in Go.
    for path in plugins["tools"]:
        declaration["tool"] = _tool_provider(package, path, declaration)
    for path in plugins["models"]:
        declaration["model"] = _model_provider(package, path, declaration)
    for path in plugins["endpoints"]:
        declaration["endpoint"] = _endpoint_group(package, path)
    for path in plugins["agent_strategies"]:
        declaration["agent_strategy"] = _agent_strategy_provider(package, path, declaration)
    for path in plugins["datasources"]:
        declaration["datasource"] = _datasource_provider(package, path, declaration)
    for path in plugins["triggers"]:
        declaration["trigger"] = _trigger_provider(package, path, declaration)
    _check_kinds(declaration)
    for field, filename in icon_references(declaration):
        if ASSETS_DIR + filename not in files:
            raise InvalidManifestError(f"invalid manifest field {field}: icon file {ASSETS_DIR}{filename} not found")
    return declaration


def providers_of(declaration: Mapping) -> dict[str, str]:
    """
    Provider names by kind: ``tool``, ``model``, ``agent_strategy``,
    ``datasource``, ``trigger`` (kinds the plugin lacks are absent).
    """
    providers = {}
    if declaration.get("tool"):
        providers["tool"] = declaration["tool"]["identity"]["name"]
    if declaration.get("model"):
        providers["model"] = declaration["model"]["provider"]
    for kind in ("agent_strategy", "datasource", "trigger"):
        if declaration.get(kind):
            providers[kind] = declaration[kind]["identity"]["name"]
    return providers


def category_of(declaration: Mapping) -> str:
    """tool > model > datasource > agent-strategy > trigger > extension."""
    plugins = declaration.get("plugins") or {}
    for kind, listed, category in (
        ("tool", "tools", "tool"),
        ("model", "models", "model"),
        ("datasource", "datasources", "datasource"),
        ("agent_strategy", "agent_strategies", "agent-strategy"),
        ("trigger", "triggers", "trigger"),
    ):
        if declaration.get(kind) or plugins.get(listed):
            return category
    return "extension"


def _icon_paths(declaration: Mapping) -> list[tuple[tuple, str]]:
    paths: list[tuple[tuple, str]] = []

    def add(path: tuple, value) -> None:
        if isinstance(value, str) and value:
            paths.append((path, value))

    add(("icon",), declaration.get("icon"))
    add(("icon_dark",), declaration.get("icon_dark"))
    for kind in ("tool", "agent_strategy", "trigger", "datasource"):
        identity = (declaration.get(kind) or {}).get("identity") or {}
        add((kind, "identity", "icon"), identity.get("icon"))
        add((kind, "identity", "icon_dark"), identity.get("icon_dark"))
    for index, datasource in enumerate((declaration.get("datasource") or {}).get("datasources") or []):
        identity = datasource.get("identity") or {}
        add(("datasource", "datasources", index, "identity", "icon"), identity.get("icon"))
    model = declaration.get("model") or {}
    for key in MODEL_ICON_FIELDS:
        icons = model.get(key) or {}
        for language in LANGUAGES:
            add(("model", key, language), icons.get(language))
    return paths


def _path_text(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


def icon_references(declaration: Mapping) -> list[tuple[str, str]]:
    """Every icon field as ``(field path such as "model.icon_small.en_US", file name)``."""
    return [(_path_text(path), filename) for path, filename in _icon_paths(declaration)]


def asset_id(content: bytes, filename: str) -> str:
    """hex SHA-256(content ‖ file name) + the file name's extension."""
    base = filename.rsplit("/", 1)[-1]
    # Go's filepath.Ext: from the last dot of the last element, so ".svg" of
    # a dot-file counts too.
    extension = base[base.rfind(".") :] if "." in base else ""
    return hashlib.sha256(content + filename.encode("utf-8")).hexdigest() + extension


def remap_icons(declaration: Mapping, files: Mapping[str, bytes]) -> tuple[dict, dict[str, bytes]]:
    """
    Replace every icon file name by its asset id.

    Only the containers on the way to an icon are copied; the rest of the
    new declaration is shared with ``declaration``, which is left as it
    was.  (A deep copy of telegram_trigger's declaration took 50-100 ms,
    and this runs on the reactor thread.)

    :returns: the new declaration and the assets to store, asset id -> bytes.
    :raises InvalidManifestError: an icon's file is not under ``_assets/``.
    """
    remapped = dict(declaration)
    copied = {id(remapped)}
    assets: dict[str, bytes] = {}
    for path, filename in _icon_paths(declaration):
        content = files.get(ASSETS_DIR + filename)
        if content is None:
            raise InvalidManifestError(
                f"invalid manifest field {_path_text(path)}: icon file {ASSETS_DIR}{filename} not found"
            )
        identifier = asset_id(content, filename)
        assets[identifier] = content
        target = remapped
        for part in path[:-1]:
            child = target[part]
            if id(child) not in copied:
                child = dict(child) if isinstance(child, dict) else list(child)
                copied.add(id(child))
                target[part] = child
            target = child
        target[path[-1]] = identifier
    return remapped, assets
