"""
The whole daemon on a storage root that really fails (issue 11, item 8):
a full and a read-only filesystem (tiny tmpfs mounts, where the machine
lets the test mount one) and a root where a directory the store needs is
a file (everywhere).
Tests run as root, whom permissions do not stop, so neither failure is a
chmod.  The upload answers an envelope naming the storage problem, and
nothing -- file, directory or row -- is left behind.
"""

from __future__ import annotations

import os

import orjson
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest

from difydaemon.packaging.archive import read_package
from difydaemon.packaging.checksum import package_checksum
from difydaemon.testing.packages import build_package, echo_plugin_files
from tests.api.harness import encode_form
from tests.test_end_to_end import TENANT, DaemonCase

# 300 kB that do not compress: the package is far larger than its icon
PACKAGE = build_package(dict(echo_plugin_files(), **{"payload.bin": os.urandom(300_000)}))
IDENTIFIER = f"acme/echo:0.0.1@{package_checksum(read_package(PACKAGE, 1 << 20))}"


def tree(root: str) -> list:
    """Every directory and file below ``root``, relative to it."""
    found = []
    for directory, names, files in os.walk(root):
        for name in names + files:
            found.append(os.path.relpath(os.path.join(directory, name), root))
    return sorted(found)


async def mount_tmpfs(test, path: str, options: str) -> None:
    """Mount a tmpfs with ``options`` on ``path`` until the test ends; skip the test where mounting is not allowed."""
    os.makedirs(path)
    out, err, code = await getProcessOutputAndValue("mount", ["-t", "tmpfs", "-o", options, "tmpfs", path])
    if code != 0:
        raise SkipTest(f"cannot mount a tmpfs here: {err.decode(errors='replace').strip()}")
    test.addCleanup(getProcessOutputAndValue, "umount", [path])


class UploadChecks:
    """Upload PACKAGE to the daemon of a DaemonCase, and what a failed upload must leave."""

    async def upload(self) -> dict:
        """Upload PACKAGE; the envelope."""
        content_type, body = encode_form({"verify_signature": "false"}, {"dify_pkg": PACKAGE})
        code, reply = await self.call(
            "POST", f"/plugin/{TENANT}/management/install/upload/package", body, {"Content-Type": content_type}
        )
        self.assertEqual(code, 200, reply)
        return orjson.loads(reply)

    async def assert_no_declaration(self) -> None:
        """No declaration or plugin row of IDENTIFIER exists."""
        code, reply = await self.call(
            "GET", f"/plugin/{TENANT}/management/fetch/manifest?plugin_unique_identifier={IDENTIFIER}"
        )
        self.assertEqual(orjson.loads(orjson.loads(reply)["message"])["message"], "plugin not found")



class FailingStorageRootTests(UploadChecks, DaemonCase):
    """Uploads onto a storage root that refuses them."""

    timeout = 120

    def assert_storage_error(self, envelope: dict, reason: str) -> None:
        """A -500 envelope naming the package key and the disk's reason."""
        self.assertEqual(envelope["code"], -500, envelope)
        error = orjson.loads(envelope["message"])
        self.assertEqual(error["error_type"], "PluginDaemonInternalServerError")
        self.assertEqual(error["message"], f"object storage cannot save plugin_packages/{IDENTIFIER}: {reason}")

    async def test_full_filesystem(self):
        """On a full disk the upload names 'No space left on device' and leaves nothing; with room it succeeds."""
        root = os.path.abspath(self.mktemp())
        await mount_tmpfs(self, root, "size=1m")
        filler = os.path.join(root, "filler")
        stat = os.statvfs(root)
        with open(filler, "wb") as f:
            # leave room for the icon, not for the package
            f.write(b"\0" * (stat.f_bavail * stat.f_frsize - 64 * 1024))
        await self._start(PLUGIN_STORAGE_LOCAL_ROOT=root)
        self.assert_storage_error(await self.upload(), "No space left on device")
        self.assertEqual(tree(root), ["filler"])
        await self.assert_no_declaration()
        os.unlink(filler)
        envelope = await self.upload()
        self.assertEqual(envelope["code"], 0, envelope)
        self.assertEqual(envelope["data"]["unique_identifier"], IDENTIFIER)

    async def test_read_only_filesystem(self):
        """On a read-only disk the upload names 'Read-only file system' and leaves nothing."""
        root = os.path.abspath(self.mktemp())
        await mount_tmpfs(self, root, "size=1m,ro")
        await self._start(PLUGIN_STORAGE_LOCAL_ROOT=root)
        envelope = await self.upload()
        self.assertEqual(envelope["code"], -500, envelope)
        self.assertRegex(orjson.loads(envelope["message"])["message"],
                         r"^object storage cannot save assets/[0-9a-f]{64}\.svg: Read-only file system$")
        self.assertEqual(tree(root), [])
        await self.assert_no_declaration()

    async def test_directory_is_a_file(self):
        """Where the package directory is a file the upload names 'Not a directory' and leaves nothing else."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        with open(os.path.join(root, "plugin_packages"), "wb") as f:
            f.write(b"in the way")
        await self._start(PLUGIN_STORAGE_LOCAL_ROOT=root)
        self.assert_storage_error(await self.upload(), "Not a directory")
        self.assertEqual(tree(root), ["plugin_packages"])
        await self.assert_no_declaration()
