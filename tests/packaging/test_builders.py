"""Tests for difydaemon.testing.packages (the test-package builders)."""

from __future__ import annotations

import ast
import io
import os
import zipfile

import yaml

from difydaemon.packaging.declaration import build_declaration
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.packages import build_package, echo_plugin_files, heavy_trigger_plugin_files, write_files


class BuildPackageTests(SynchronousTestCase):
    """build_package lays zips out like the CLI packager."""

    def test_layout(self):
        """Entries are sorted, deflated, files only, with the given comment."""
        data = build_package({"b.txt": "text", "a/x.bin": b"\x00\x01", "B.txt": b""}, comment=b"hi")
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            self.assertEqual([info.filename for info in infos], ["B.txt", "a/x.bin", "b.txt"])
            self.assertTrue(all(info.compress_type == zipfile.ZIP_DEFLATED for info in infos))
            self.assertFalse(any(info.is_dir() for info in infos))
            self.assertEqual(archive.read("b.txt"), b"text")
            self.assertEqual(archive.comment, b"hi")

    def test_deterministic(self):
        """The same files give the same bytes."""
        self.assertEqual(build_package(echo_plugin_files()), build_package(echo_plugin_files()))


class EchoPluginTests(SynchronousTestCase):
    """echo_plugin_files is the minimal real plugin of runtimes.md §7."""

    def test_files(self):
        """It has every file §7 lists and requires dify_plugin 0.10.x."""
        files = echo_plugin_files(extra_requirements=("requests",))
        self.assertEqual(set(files), {
            "manifest.yaml", "provider/echo.yaml", "provider/echo.py", "tools/echo.yaml", "tools/echo.py",
            "main.py", "requirements.txt", "_assets/icon.svg", "README.md",
        })
        self.assertEqual(files["requirements.txt"], b"dify_plugin>=0.10.0,<0.11.0\nrequests\n")

    def test_parameters(self):
        """Author, name and version are substituted into the YAML."""
        files = echo_plugin_files(author="zed", name="parrot", version="1.2.3")
        manifest = yaml.safe_load(files["manifest.yaml"])
        self.assertEqual((manifest["author"], manifest["name"], manifest["version"]), ("zed", "parrot", "1.2.3"))
        self.assertEqual(yaml.safe_load(files["provider/echo.yaml"])["identity"]["author"], "zed")

    def test_sources_are_sdk_code(self):
        """The Python files parse and define the SDK subclasses §7 names."""
        files = echo_plugin_files()
        classes = {}
        for path in ("provider/echo.py", "tools/echo.py", "main.py"):
            tree = ast.parse(files[path].decode(), filename=path)
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    classes[node.name] = [base.id for base in node.bases]
        self.assertEqual(classes, {"EchoProvider": ["ToolProvider"], "EchoTool": ["Tool"]})
        self.assertIn(b"DifyPluginEnv(MAX_REQUEST_TIMEOUT=120)", files["main.py"])

    def test_sources_referenced(self):
        """Every extra.python.source names a file of the plugin."""
        files = echo_plugin_files()
        for path in ("provider/echo.yaml", "tools/echo.yaml"):
            self.assertIn(yaml.safe_load(files[path])["extra"]["python"]["source"], files)

    def test_declares(self):
        """The plugin passes every manifest rule."""
        self.assertEqual(build_declaration(echo_plugin_files())["tool"]["tools"][0]["identity"]["name"], "echo")


class WriteFilesTests(SynchronousTestCase):
    """write_files lays a plugin's files out as a source tree."""

    def test_tree(self):
        """Every file is written at its relative path, directories created, into an existing directory."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.assertEqual(write_files(directory, {"main.py": b"x", "tools/deep/a.yaml": b"y"}), directory)
        with open(os.path.join(directory, "main.py"), "rb") as main, open(os.path.join(directory, "tools", "deep", "a.yaml"), "rb") as tool:
            self.assertEqual((main.read(), tool.read()), (b"x", b"y"))


class HeavyTriggerPluginTests(SynchronousTestCase):
    """heavy_trigger_plugin_files is shaped like telegram_trigger and decodes."""

    def test_default_shape(self):
        """Seven event files of about 200 kB, each with an anchor and an alias, and no blob."""
        files = heavy_trigger_plugin_files()
        events = {name: content for name, content in files.items() if name.startswith("events/")}
        self.assertEqual(len(events), 7)
        for content in events.values():
            self.assertGreater(len(content), 150_000)
            self.assertLess(len(content), 250_000)
            self.assertEqual((content.count(b"&id001"), content.count(b"*id001")), (1, 1))
        self.assertNotIn("data/blob.bin", files)

    def test_declares_as_the_old_loader_did(self):
        """A small heavy plugin is a trigger plugin whose declaration equals the previous loader's."""
        from tests.packaging.test_plugin_yaml import ReferenceYaml

        files = heavy_trigger_plugin_files(events=3, event_bytes=20_000, blob_bytes=1000, nonce="n")
        declaration = build_declaration(files)
        self.assertEqual([event["identity"]["name"] for event in declaration["trigger"]["events"]],
                         ["event_0", "event_1", "event_2"])
        self.assertEqual(declaration, build_declaration(files, ReferenceYaml(files)))
        self.assertEqual(len(files["data/blob.bin"]), 1000)
        self.assertNotEqual(files["README.md"], heavy_trigger_plugin_files(events=1, event_bytes=1)["README.md"])
