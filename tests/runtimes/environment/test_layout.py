"""
Tests for :mod:`difydaemon.runtimes.environment.layout`: working directories,
runner versions, dependency files, the venv marker.
"""

from __future__ import annotations

import os


from difydaemon.errors import (
    InternalServerError,
    UniqueIdentifierError,
)
from difydaemon.runtimes.environment import (
    MARKER_PATH,
    choose_dependency_file,
    runner_version,
    venv_is_valid,
    working_dir_for,
)
from difydaemon.testing.cases import SynchronousTestCase
from tests.runtimes.environment.fakes import CHECKSUM


# -- pure parts --------------------------------------------------------------


class WorkingDirTests(SynchronousTestCase):
    def test_author_is_a_directory_level(self):
        """The author is a directory and ``:`` becomes ``-`` before ``@checksum``."""
        self.assertEqual(
            working_dir_for("/w", f"acme/echo:0.0.1@{CHECKSUM}"),
            f"/w/acme/echo-0.0.1@{CHECKSUM}",
        )

    def test_without_author(self):
        """An identifier without an author lives directly under the working path."""
        self.assertEqual(working_dir_for("/w", f"echo:1.2.3@{CHECKSUM}"), f"/w/echo-1.2.3@{CHECKSUM}")

    def test_rejects_path_escapes(self):
        """An identifier that could escape the working path is refused."""
        self.assertRaises(UniqueIdentifierError, working_dir_for, "/w", f"../echo:0.0.1@{CHECKSUM}")
        self.assertRaises(UniqueIdentifierError, working_dir_for, "/w", f"acme/..:0.0.1@{CHECKSUM}")


class RunnerVersionTests(SynchronousTestCase):
    def test_empty_means_312(self):
        """An empty or missing meta.runner.version means Python 3.12."""
        self.assertEqual(runner_version(""), "3.12")
        self.assertEqual(runner_version(None), "3.12")

    def test_patch_dropped(self):
        """Only major.minor is kept."""
        self.assertEqual(runner_version("3.12.1"), "3.12")
        self.assertEqual(runner_version(" 3.13 "), "3.13")

    def test_not_a_version(self):
        """Text that is not a version is refused, naming it."""
        error = self.assertRaises(InternalServerError, runner_version, "python3")
        self.assertIn("'python3'", error.message)


class DependencyFileTests(SynchronousTestCase):
    def test_mirror_prefers_requirements(self):
        """With a mirror set, requirements.txt wins over pyproject.toml."""
        present = {"pyproject.toml", "requirements.txt"}
        self.assertEqual(choose_dependency_file(present, "https://mirror/simple"), "requirements.txt")

    def test_mirror_without_requirements(self):
        """With a mirror but no requirements.txt, pyproject.toml is used."""
        self.assertEqual(choose_dependency_file({"pyproject.toml"}, "https://m"), "pyproject.toml")

    def test_shipped_wheels_prefer_requirements(self):
        """A package shipping a wheels/ folder installs from requirements.txt even without a mirror."""
        present = {"pyproject.toml", "requirements.txt", "wheels"}
        self.assertEqual(choose_dependency_file(present, None), "requirements.txt")

    def test_no_mirror_prefers_pyproject(self):
        """Without a mirror, pyproject.toml wins."""
        present = {"pyproject.toml", "requirements.txt"}
        self.assertEqual(choose_dependency_file(present, None), "pyproject.toml")

    def test_requirements_only(self):
        """A lone requirements.txt is used."""
        self.assertEqual(choose_dependency_file({"requirements.txt", "main.py"}, ""), "requirements.txt")

    def test_neither(self):
        """Neither file is an error naming both."""
        error = self.assertRaises(InternalServerError, choose_dependency_file, {"main.py"}, None)
        self.assertIn("pyproject.toml", error.message)
        self.assertIn("requirements.txt", error.message)


class VenvValidityTests(SynchronousTestCase):
    def make(self, *paths):
        root = self.mktemp()
        os.makedirs(root)
        for path in paths:
            full = os.path.join(root, path)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            open(full, "w").close()
        return root

    def test_complete(self):
        """A venv with its python and the marker is valid."""
        self.assertTrue(venv_is_valid(self.make(".venv/bin/python", MARKER_PATH)))

    def test_without_marker(self):
        """A venv without the marker is not valid."""
        self.assertFalse(venv_is_valid(self.make(".venv/bin/python")))

    def test_without_python(self):
        """A venv without its python is not valid."""
        self.assertFalse(venv_is_valid(self.make(MARKER_PATH)))

    def test_nothing(self):
        """No venv is not valid."""
        self.assertFalse(venv_is_valid(self.make()))
