"""Tests for difydaemon.packaging.declaration and manifest."""

from __future__ import annotations

import hashlib
import json

import yaml

from difydaemon.errors import InvalidManifestError, MalformedPackageError
from difydaemon.packaging.archive import read_package
from difydaemon.packaging.declaration import (
    build_declaration,
    category_of,
    icon_references,
    providers_of,
    remap_icons,
)
from difydaemon.packaging.manifest import format_created_at
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.packages import echo_plugin_files

from tests.packaging.fixtures import AGENT, ALL_PACKAGES, MAX_SIZE, OPENAI, UNSIGNED, fixture_bytes


def fixture_files(name):
    return read_package(fixture_bytes(name), MAX_SIZE)


def with_manifest(change, files=None):
    """Echo plugin files whose manifest dict went through ``change``."""
    files = dict(files or echo_plugin_files())
    manifest = yaml.safe_load(files["manifest.yaml"])
    change(manifest)
    files["manifest.yaml"] = yaml.safe_dump(manifest).encode()
    return files


def get_path(document, path):
    """Follow a "a.b[0].c" path of icon_references."""
    for part in path.replace("[", ".[").split("."):
        document = document[int(part[1:-1])] if part.startswith("[") else document[part]
    return document


class FixtureDeclarationTests(SynchronousTestCase):
    """The three real packages decode into the shapes Dify expects."""

    def test_providers_and_categories(self):
        """Provider names and categories of the fixtures."""
        expected = {
            AGENT: ({"agent_strategy": "agent"}, "agent-strategy"),
            OPENAI: ({"model": "openai"}, "model"),
            UNSIGNED: ({"tool": "test"}, "tool"),
        }
        for name, (providers, category) in expected.items():
            declaration = build_declaration(fixture_files(name))
            self.assertEqual((providers_of(declaration), category_of(declaration)), (providers, category), name)

    def test_json_ready(self):
        """Every fixture declaration survives a JSON round trip unchanged."""
        for name in ALL_PACKAGES:
            declaration = build_declaration(fixture_files(name))
            self.assertEqual(json.loads(json.dumps(declaration)), declaration)

    def test_top_level_shape(self):
        """Top-level fields and defaults match the Go daemon's marshalling."""
        declaration = build_declaration(fixture_files(UNSIGNED))
        self.assertEqual(declaration["created_at"], "2025-03-30T14:38:08.927240378Z")
        self.assertIs(declaration["verified"], False)
        self.assertEqual(declaration["tags"], [])
        self.assertEqual(declaration["icon_dark"], "")
        self.assertEqual(declaration["plugins"]["models"], [])
        self.assertEqual(declaration["meta"]["runner"], {"language": "python", "version": "3.12", "entrypoint": "main"})
        self.assertNotIn("extra", declaration["tool"])

    def test_tool_provider(self):
        """Tool files become full tool objects and identity defaults are filled."""
        tool = build_declaration(fixture_files(UNSIGNED))["tool"]
        self.assertEqual(tool["credentials_schema"], [])
        self.assertEqual(tool["identity"]["tags"], [])
        [only] = tool["tools"]
        self.assertEqual(only["identity"]["name"], "test")
        self.assertEqual(only["description"]["llm"], "test")
        self.assertEqual(only["parameters"][0]["name"], "query")
        self.assertEqual(only["parameters"][0]["options"], [])
        self.assertNotIn("extra", only)

    def test_model_provider(self):
        """Model globs are expanded, positions read, defaults and templates applied."""
        files = fixture_files(OPENAI)
        model = build_declaration(files)["model"]
        yaml_models = [name for name in files if name.startswith("models/") and name.endswith(".yaml")
                       and not name.endswith("_position.yaml")]
        self.assertEqual(len(model["models"]), len(yaml_models))
        self.assertEqual(model["position"]["llm"][:2], ["o1", "o1-2024-12-17"])
        by_name = {entry["model"]: entry for entry in model["models"]}
        self.assertEqual(by_name["tts-1"]["label"], {"en_US": "tts-1"})
        self.assertEqual(by_name["tts-1"]["fetch_from"], "predefined-model")
        self.assertEqual(by_name["tts-1"]["parameter_rules"], [])
        temperature = by_name["gpt-4o"]["parameter_rules"][0]
        self.assertEqual((temperature["type"], temperature["min"], temperature["max"]), ("float", 0.0, 1.0))
        self.assertEqual(model["description"]["en_US"], "Models provided by OpenAI, such as GPT-3.5-Turbo and GPT-4.")
        self.assertEqual(model["provider_credential_schema"]["credential_form_schemas"][0]["variable"],
                         "openai_api_key")

    def test_agent_strategy_provider(self):
        """Strategy files are inlined with features defaulted."""
        strategies = build_declaration(fixture_files(AGENT))["agent_strategy"]["strategies"]
        self.assertEqual([strategy["identity"]["name"] for strategy in strategies], ["function_calling", "ReAct"])
        self.assertEqual(strategies[0]["features"], ["history-messages"])

    def test_remap_icons(self):
        """Every icon field becomes sha256(bytes + name) + extension and the bytes are returned."""
        for name in ALL_PACKAGES:
            files = fixture_files(name)
            declaration = build_declaration(files)
            references = icon_references(declaration)
            self.assertGreaterEqual(len(references), 2)
            remapped, assets = remap_icons(declaration, files)
            for path, filename in references:
                content = files["_assets/" + filename]
                expected = hashlib.sha256(content + filename.encode()).hexdigest() + "." + filename.rsplit(".", 1)[1]
                self.assertEqual(get_path(remapped, path), expected, (name, path))
                self.assertEqual(assets[expected], content)
            for _, value in icon_references(remapped):
                self.assertIn(value, assets)
            self.assertEqual(get_path(declaration, references[0][0]), references[0][1])

    def test_remap_copies_only_icon_paths(self):
        """remap_icons leaves the declaration as it was and shares every part that holds no icon."""
        files = fixture_files(OPENAI)
        declaration = build_declaration(files)
        before = json.dumps(declaration, sort_keys=True)
        remapped, _ = remap_icons(declaration, files)
        self.assertEqual(json.dumps(declaration, sort_keys=True), before)
        self.assertIsNot(remapped["model"], declaration["model"])
        self.assertIs(remapped["model"]["models"], declaration["model"]["models"])
        self.assertIs(remapped["resource"], declaration["resource"])
        self.assertNotEqual(remapped["model"]["icon_small"], declaration["model"]["icon_small"])

    def test_model_icon_references(self):
        """Model provider icons are referenced per language."""
        references = dict(icon_references(build_declaration(fixture_files(OPENAI))))
        self.assertEqual(references["model.icon_small.en_US"], "icon_s_en.svg")
        self.assertEqual(references["model.icon_large.en_US"], "icon_l_en.svg")

    def test_remap_missing_icon(self):
        """remap_icons refuses a declaration naming an icon the files lack."""
        files = fixture_files(UNSIGNED)
        declaration = build_declaration(files)
        declaration["tool"]["identity"]["icon"] = "gone.svg"
        with self.assertRaises(InvalidManifestError) as caught:
            remap_icons(declaration, files)
        self.assertIn("gone.svg", caught.exception.message)
        self.assertIn("tool.identity.icon", caught.exception.message)


class EchoDeclarationTests(SynchronousTestCase):
    """Rules checked on variations of the echo plugin."""

    def assertInvalid(self, files, *fragments, error=InvalidManifestError):
        with self.assertRaises(error) as caught:
            build_declaration(files)
        for fragment in fragments:
            self.assertIn(fragment, caught.exception.message)

    def test_echo_decodes(self):
        """The echo plugin is a tool plugin with provider echo and storage permission."""
        declaration = build_declaration(echo_plugin_files())
        self.assertEqual(providers_of(declaration), {"tool": "echo"})
        self.assertEqual(declaration["resource"]["permission"]["storage"], {"enabled": True, "size": 1048576})
        self.assertEqual(declaration["tool"]["identity"]["description"], {"en_US": "Echo tools"})
        self.assertEqual(declaration["created_at"], "2025-01-01T00:00:00Z")

    def test_identity_description_inherited(self):
        """A tool provider without description takes the plugin's."""
        files = echo_plugin_files()
        provider = yaml.safe_load(files["provider/echo.yaml"])
        del provider["identity"]["description"]
        files["provider/echo.yaml"] = yaml.safe_dump(provider).encode()
        declaration = build_declaration(with_manifest(lambda m: m.update(tags=["utilities"]), files))
        self.assertEqual(declaration["tool"]["identity"]["description"], {"en_US": "Echoes its input back"})
        self.assertEqual(declaration["tool"]["identity"]["tags"], ["utilities"])

    def test_credentials_map_becomes_list(self):
        """credentials_for_provider as a map becomes credentials_schema with names from keys."""
        files = echo_plugin_files()
        provider = yaml.safe_load(files["provider/echo.yaml"])
        provider["credentials_for_provider"] = {
            "api_key": {"type": "secret-input", "required": True, "label": {"en_US": "Key"}},
            "region": {"type": "text-input", "required": False, "label": {"en_US": "Region"}},
        }
        files["provider/echo.yaml"] = yaml.safe_dump(provider, sort_keys=False).encode()
        tool = build_declaration(files)["tool"]
        self.assertEqual([config["name"] for config in tool["credentials_schema"]], ["api_key", "region"])
        self.assertEqual(tool["credentials_schema"][0]["type"], "secret-input")
        self.assertNotIn("credentials_for_provider", tool)

    def test_malformed_yaml(self):
        """Unparseable YAML is MalformedPackageError naming the file."""
        files = echo_plugin_files()
        files["tools/echo.yaml"] = b"identity: [unclosed\n"
        self.assertInvalid(files, "tools/echo.yaml", error=MalformedPackageError)

    def test_missing_declared_file(self):
        """A referenced file that is absent is InvalidManifestError naming it."""
        files = echo_plugin_files()
        del files["tools/echo.yaml"]
        self.assertInvalid(files, "tools/echo.yaml")

    def test_missing_manifest(self):
        """A package without manifest.yaml is refused naming it."""
        files = echo_plugin_files()
        del files["manifest.yaml"]
        self.assertInvalid(files, "manifest.yaml")

    def test_bad_version(self):
        """A version without three numeric parts is refused naming the field."""
        self.assertInvalid(with_manifest(lambda m: m.update(version="1.0")), "version")
        self.assertInvalid(with_manifest(lambda m: m["meta"].update(version="x")), "meta.version")

    def test_bad_author_and_name(self):
        """Uppercase or over-long authors and names are refused naming the field."""
        self.assertInvalid(with_manifest(lambda m: m.update(author="Acme")), "author")
        self.assertInvalid(with_manifest(lambda m: m.update(author="a" * 65)), "author")
        self.assertInvalid(with_manifest(lambda m: m.update(name="Echo")), "name")

    def test_label_rules(self):
        """label needs en_US of 1..1023 characters."""
        self.assertInvalid(with_manifest(lambda m: m.update(label={"zh_Hans": "x"})), "label.en_US")
        self.assertInvalid(with_manifest(lambda m: m.update(description={"en_US": "x" * 1024})), "description.en_US")

    def test_missing_icon(self):
        """An icon absent from _assets is refused naming the file."""
        self.assertInvalid(with_manifest(lambda m: m.update(icon="nope.svg")), "icon", "_assets/nope.svg")
        self.assertInvalid(with_manifest(lambda m: m.pop("icon")), "icon")

    def test_resource_rules(self):
        """Zero memory and out-of-range storage sizes are refused."""
        self.assertInvalid(with_manifest(lambda m: m["resource"].update(memory=0)), "resource.memory")
        self.assertInvalid(
            with_manifest(lambda m: m["resource"]["permission"]["storage"].update(size=10)),
            "resource.permission.storage.size",
        )

    def test_meta_rules(self):
        """Unknown architectures, runner languages and tags are refused."""
        self.assertInvalid(with_manifest(lambda m: m["meta"].update(arch=["riscv"])), "meta.arch")
        self.assertInvalid(with_manifest(lambda m: m["meta"]["runner"].update(language="go")), "meta.runner.language")
        self.assertInvalid(with_manifest(lambda m: m.update(tags=["games"])), "tags")

    def test_category_exclusivity(self):
        """A model provider next to a tool provider is refused."""
        files = with_manifest(lambda m: m["plugins"].update(models=["provider/model.yaml"]))
        files["provider/model.yaml"] = yaml.safe_dump({
            "provider": "m", "label": {"en_US": "M"}, "supported_model_types": ["llm"],
            "configurate_methods": ["predefined-model"], "models": {},
        }).encode()
        self.assertInvalid(files, "model cannot be provided together with tool")

    def test_nothing_provided(self):
        """A plugin with no provider at all is refused."""
        self.assertInvalid(with_manifest(lambda m: m["plugins"].update(tools=[])), "at least one of")

    def test_identity_name_rule(self):
        """A tool name outside ^[a-zA-Z0-9_-]+$ is refused naming the field."""
        files = echo_plugin_files()
        tool = yaml.safe_load(files["tools/echo.yaml"])
        tool["identity"]["name"] = "echo tool"
        files["tools/echo.yaml"] = yaml.safe_dump(tool).encode()
        self.assertInvalid(files, "tool.tools[0].identity.name")

    def test_yaml_1_2_scalars(self):
        """'yes' stays a string and unquoted timestamps are formatted by us, as yaml.v3 reads them."""
        files = with_manifest(lambda m: None)
        text = files["manifest.yaml"].decode().replace("created_at: '2025-01-01T00:00:00Z'",
                                                       "created_at: 2025-01-01 08:00:00.5000 +08:00")
        files["manifest.yaml"] = (text + "privacy: yes\n").encode()
        declaration = build_declaration(files)
        self.assertEqual(declaration["privacy"], "yes")
        self.assertEqual(declaration["created_at"], "2025-01-01T08:00:00.5+08:00")


class FieldTypeTests(SynchronousTestCase):
    """Fields of an unexpected type are refused with the package's own errors, never a TypeError."""

    def assertRefused(self, files, *fragments):
        with self.assertRaises((InvalidManifestError, MalformedPackageError)) as caught:
            build_declaration(files)
        for fragment in fragments:
            self.assertIn(fragment, caught.exception.message)

    def test_arch_entries_of_other_types(self):
        """A mapping or list inside meta.arch is an unknown architecture (the fuzzing find)."""
        for entry in ({"ameta": None}, ["amd64"], 64, None):
            self.assertRefused(with_manifest(lambda m: m["meta"].update(arch=["amd64", entry])), "meta.arch")

    def test_repo_that_urlsplit_refuses(self):
        """A repo URL with an unclosed IPv6 bracket is refused naming repo."""
        self.assertRefused(with_manifest(lambda m: m.update(repo="https://[::1/plugin")), "repo", "URL")

    def model_files(self, rule):
        files = with_manifest(lambda m: m["plugins"].update(tools=[], models=["provider/model.yaml"]))
        files["provider/model.yaml"] = yaml.safe_dump({
            "provider": "m", "label": {"en_US": "M"}, "supported_model_types": ["llm"],
            "configurate_methods": ["predefined-model"], "models": {"llm": {"predefined": ["models/*.yaml"]}},
        }).encode()
        files["models/a.yaml"] = yaml.safe_dump({
            "model": "a", "model_type": "llm", "parameter_rules": [rule],
        }).encode()
        return files

    def test_use_template_of_other_types(self):
        """A list or mapping as use_template is an unknown template (a fuzzing find)."""
        for template in (["temperature"], {"name": "top_p"}):
            self.assertRefused(self.model_files({"name": "t", "use_template": template}),
                               "parameter_rules[0].use_template", "unknown template")
        rules = build_declaration(self.model_files({"name": "t", "use_template": "top_p"}))["model"]["models"][0]
        self.assertEqual(rules["parameter_rules"][0]["max"], 1.0)

    def test_model_glob_with_reversed_range(self):
        """A model glob Python's re cannot compile is refused naming the pattern."""
        files = self.model_files({"name": "t"})
        provider = yaml.safe_load(files["provider/model.yaml"])
        provider["models"]["llm"]["predefined"] = ["models/[z-a].yaml"]
        files["provider/model.yaml"] = yaml.safe_dump(provider).encode()
        self.assertRefused(files, "invalid model file pattern", "[z-a]")

    def test_model_glob_classes(self):
        """Go glob classes keep their ranges and negation, and '.' inside one is literal."""
        files = self.model_files({"name": "t"})
        provider = yaml.safe_load(files["provider/model.yaml"])
        provider["models"]["llm"]["predefined"] = ["models/[a-c].yaml", "models/[^a-z]x[.]yaml"]
        files["provider/model.yaml"] = yaml.safe_dump(provider).encode()
        files["models/9x.yaml"] = files["models/a.yaml"].replace(b"model: a", b"model: nine")
        files["models/9xZyaml"] = files["models/a.yaml"].replace(b"model: a", b"model: never")
        models = [model["model"] for model in build_declaration(files)["model"]["models"]]
        self.assertEqual(sorted(models), ["a", "nine"])

    def test_integer_too_long_for_python(self):
        """An integer of 5000 digits is MalformedPackageError, not Python's ValueError."""
        files = echo_plugin_files()
        files["manifest.yaml"] = files["manifest.yaml"] + b"extra: " + b"7" * 5000 + b"\n"
        self.assertRefused(files, "manifest.yaml")


class CreatedAtTests(SynchronousTestCase):
    """created_at is always RFC 3339 with a zone."""

    def test_formats(self):
        """Zones are kept, zero offsets become Z, fractions lose trailing zeros."""
        self.assertEqual(format_created_at("2025-01-08T15:22:00.000000000Z"), "2025-01-08T15:22:00Z")
        self.assertEqual(format_created_at("2025-01-08T15:22:00+00:00"), "2025-01-08T15:22:00Z")
        self.assertEqual(format_created_at("2025-01-08T15:22:00-0530"), "2025-01-08T15:22:00-05:30")
        self.assertEqual(format_created_at("2025-01-08"), "2025-01-08T00:00:00Z")
        self.assertEqual(format_created_at("2025-01-08 01:02:03"), "2025-01-08T01:02:03Z")
        self.assertEqual(format_created_at(None), "0001-01-01T00:00:00Z")

    def test_invalid(self):
        """Text that is not a timestamp is refused naming created_at."""
        for value in ("yesterday", "2025-13-01T00:00:00Z", 12):
            with self.assertRaises(InvalidManifestError) as caught:
                format_created_at(value)
            self.assertIn("created_at", caught.exception.message)
