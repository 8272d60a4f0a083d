"""Tests for difydaemon.cli.offline: ``dify plugin package --offline``."""

from __future__ import annotations

import os

from difydaemon.cli.errors import CommandError
from difydaemon.cli.offline import DEFAULT_PLATFORMS, download_commands, offline_requirements, with_wheels
from difydaemon.cli.packing import package_directory
from difydaemon.testing.cases import SynchronousTestCase
from tests.cli.helpers import dify
from tests.runtimes.environment.test_bytecode import tiny_wheel


class FakeDownloads:
    """Plays ``pip download``: records each argv and puts a wheel named after its platform in ``--dest``."""

    def __init__(self, fail: bool = False):
        self.runs = []
        self.fail = fail

    def __call__(self, argv):
        self.runs.append(list(argv))
        if self.fail:
            raise CommandError("downloading wheels failed (exit 1): ERROR: No matching distribution found for nope")
        destination = argv[argv.index("--dest") + 1]
        platform = argv[argv.index("--platform") + 1]
        with open(tiny_wheel(os.path.join(destination, "..", "built")), "rb") as f:
            content = f.read()
        with open(os.path.join(destination, f"tinydist-1.0-cp312-cp312-{platform}.whl"), "wb") as f:
            f.write(content)


class OfflineTests(SynchronousTestCase):
    def test_download_commands(self):
        """One pip download per platform, wheels only, for the target Python, into the destination."""
        self.assertEqual(
            download_commands("/py", "/r.txt", "/dest", "3.12", ("p1", "p2")),
            [
                ["/py", "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
                 "--python-version", "3.12", "--platform", platform, "--dest", "/dest", "-r", "/r.txt"]
                for platform in ("p1", "p2")
            ],
        )

    def test_offline_requirements_once(self):
        """The offline options are put first, once, however often the file is processed."""
        once = offline_requirements(b"dify_plugin==0.10.1\n")
        self.assertEqual(once, b"--no-index\n--find-links=./wheels/\ndify_plugin==0.10.1\n")
        self.assertEqual(offline_requirements(once), once)

    def test_with_wheels(self):
        """The wheels of every default platform land in wheels/, and requirements.txt installs from them alone."""
        downloads = FakeDownloads()
        files = with_wheels({"main.py": b"", "requirements.txt": b"tinydist==1.0\n"}, run=downloads, python="/py")
        self.assertEqual([run[run.index("--platform") + 1] for run in downloads.runs], list(DEFAULT_PLATFORMS))
        self.assertEqual(
            sorted(name for name in files if name.startswith("wheels/")),
            sorted(f"wheels/tinydist-1.0-cp312-cp312-{platform}.whl" for platform in DEFAULT_PLATFORMS),
        )
        self.assertTrue(files["requirements.txt"].startswith(b"--no-index\n--find-links=./wheels/\n"))

    def test_failed_download(self):
        """A failed download fails the packaging with pip's complaint."""
        error = self.assertRaises(
            CommandError, with_wheels, {"requirements.txt": b"nope\n"}, run=FakeDownloads(fail=True)
        )
        self.assertIn("No matching distribution found for nope", error.message)

    def test_without_requirements(self):
        """--offline refuses a plugin without requirements.txt."""
        error = self.assertRaises(CommandError, with_wheels, {"main.py": b""}, run=FakeDownloads())
        self.assertIn("requirements.txt", error.message)

    def test_packaged_with_wheels(self):
        """A scaffolded plugin packaged with its wheels passes the daemon's checks and carries them."""
        parent = os.path.abspath(self.mktemp())
        os.makedirs(parent)
        self.assertEqual(dify("plugin", "init", "--quick", "--author", "acme", "--name", "off", "-o", parent).status, 0)
        downloads = FakeDownloads()
        data, decoded = package_directory(
            os.path.join(parent, "off"), 50 * 1024 * 1024, None, lambda files: with_wheels(files, run=downloads)
        )
        self.assertEqual(decoded.identifier.plugin_id, "acme/off")
        self.assertIn(b"wheels/tinydist-1.0-cp312-cp312-manylinux2014_x86_64.whl", data)
