"""Tests for difydaemon.cli.packing: when ``uv export`` makes requirements.txt."""

from __future__ import annotations

import os
import stat

from difydaemon.cli.packing import plugin_files, wants_exported_requirements
from difydaemon.testing.cases import SynchronousTestCase
from tests.cli.helpers import dify, write

EXPORTED = b"dify-plugin==0.10.1\nrequests==2.32.3\n"


class ExportedRequirementsTests(SynchronousTestCase):
    """The files on disk, not the ignore rules, decide whether uv export runs (as in Go)."""

    def setUp(self):
        super().setUp()
        parent = os.path.abspath(self.mktemp())
        os.makedirs(parent)
        self.assertEqual(dify("plugin", "init", "--quick", "--author", "acme", "--name", "lock", "-o", parent).status, 0)
        self.directory = os.path.join(parent, "lock")
        os.remove(os.path.join(self.directory, "requirements.txt"))
        write(os.path.join(self.directory, "pyproject.toml"), '[project]\nname = "lock"\nversion = "0.0.1"\n')
        write(os.path.join(self.directory, "uv.lock"), "version = 1\n")
        # A stand-in for uv that prints fixed requirements, as Go's own packager test does.
        self.uv = os.path.join(parent, "fake-uv")
        write(self.uv, "#!/bin/sh\nprintf '" + EXPORTED.decode().replace("\n", "\\n") + "'\n")
        os.chmod(self.uv, stat.S_IRWXU)

    def ignore(self, filename, text):
        for name in (".difyignore", ".gitignore"):
            path = os.path.join(self.directory, name)
            if os.path.exists(path):
                os.remove(path)
        write(os.path.join(self.directory, filename), text)

    def test_lock_and_project_export(self):
        """pyproject.toml and uv.lock without requirements.txt: the exported requirements are packaged."""
        files = plugin_files(self.directory, self.uv)
        self.assertEqual(files["requirements.txt"], EXPORTED)
        self.assertIn("uv.lock", files)
        self.assertEqual(list(files), sorted(files, key=lambda name: name.encode()))

    def test_lock_ignored_by_difyignore_still_exports(self):
        """A uv.lock on disk that .difyignore leaves out still yields requirements.txt."""
        self.ignore(".difyignore", "uv.lock\n")
        files = plugin_files(self.directory, self.uv)
        self.assertNotIn("uv.lock", files)
        self.assertEqual(files["requirements.txt"], EXPORTED)

    def test_lock_and_project_ignored_by_gitignore_still_export(self):
        """Without .difyignore, a .gitignore that leaves out uv.lock and pyproject.toml changes nothing."""
        self.ignore(".gitignore", "uv.lock\npyproject.toml\n")
        files = plugin_files(self.directory, self.uv)
        self.assertNotIn("uv.lock", files)
        self.assertNotIn("pyproject.toml", files)
        self.assertEqual(files["requirements.txt"], EXPORTED)

    def test_ignored_requirements_prevent_export(self):
        """A requirements.txt on disk that .difyignore leaves out means no requirements.txt at all."""
        write(os.path.join(self.directory, "requirements.txt"), "mine==1.0\n")
        self.ignore(".difyignore", "requirements.txt\n")
        self.assertFalse(wants_exported_requirements(self.directory))
        self.assertNotIn("requirements.txt", plugin_files(self.directory, self.uv))

    def test_present_requirements_are_kept(self):
        """A requirements.txt that is packaged is the one on disk, not an export."""
        write(os.path.join(self.directory, "requirements.txt"), "mine==1.0\n")
        self.assertEqual(plugin_files(self.directory, self.uv)["requirements.txt"], b"mine==1.0\n")

    def test_no_lock_on_disk_no_export(self):
        """Without a uv.lock on disk nothing is exported, whatever the ignore rules say."""
        os.remove(os.path.join(self.directory, "uv.lock"))
        self.ignore(".difyignore", "!uv.lock\n")
        self.assertFalse(wants_exported_requirements(self.directory))
        self.assertNotIn("requirements.txt", plugin_files(self.directory, self.uv))
