"""
A full or read-only object store behind the management routes (issue 11,
item 8): every save it refuses gives an envelope naming the storage
problem, and nothing -- object, directory or row -- is left behind.  The
store here is a FailingObjectStorage over memory; the real disk is in
tests/storage and tests/test_storage_end_to_end.py.
"""

from __future__ import annotations

from difydaemon.packaging.archive import read_package
from difydaemon.packaging.checksum import package_checksum
from difydaemon.persistence.records import TASK_FAILED
from difydaemon.storage.memory import MemoryObjectStorage
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.packages import build_package, echo_plugin_files
from difydaemon.testing.storage import FailingObjectStorage

from .harness import TENANT, DaemonHarness, encode_form, error_of

PACKAGE = build_package(echo_plugin_files())
IDENTIFIER = f"acme/echo:0.0.1@{package_checksum(read_package(PACKAGE, 1 << 20))}"


class UploadToFailingStorageTests(SynchronousTestCase):
    """Uploads whose saves are refused."""

    def harness(self, *prefixes: str) -> DaemonHarness:
        """A daemon whose store refuses the saves below ``prefixes``."""
        self.memory = MemoryObjectStorage()
        return DaemonHarness(self, storage=FailingObjectStorage(self.memory, prefixes))

    def assert_storage_error(self, env: dict, key: str) -> None:
        """The envelope is the -500 that names the refused key and the disk's reason."""
        self.assertEqual(env["code"], -500, env)
        self.assertEqual(
            error_of(env),
            {
                "message": f"object storage cannot save {key}: No space left on device",
                "error_type": "PluginDaemonInternalServerError",
                "args": None,
            },
        )

    def assert_nothing_stored(self, daemon: DaemonHarness) -> None:
        """No object and no declaration row is left."""
        self.assertEqual(self.memory.objects, {})
        self.assertIsNone(self.successResultOf(daemon.persistence.get_declaration(IDENTIFIER)))

    def test_package_save_refused(self):
        """A refused package save names it, and the icon already saved is removed again."""
        daemon = self.harness("plugin_packages")
        env = daemon.upload(PACKAGE)
        self.assert_storage_error(env, f"plugin_packages/{IDENTIFIER}")
        self.assert_nothing_stored(daemon)

    def test_asset_save_refused(self):
        """A refused icon save names the asset key; nothing is stored."""
        daemon = self.harness("assets")
        env = daemon.upload(PACKAGE)
        self.assertEqual(env["code"], -500, env)
        self.assertRegex(error_of(env)["message"],
                         r"^object storage cannot save assets/[0-9a-f]{64}\.svg: No space left on device$")
        self.assert_nothing_stored(daemon)

    def test_bundle_save_refused(self):
        """A bundle whose embedded package cannot be saved names the key and stores nothing."""
        from tests.packaging.test_package import bundle

        checksum = package_checksum(read_package(PACKAGE, 1 << 20))
        daemon = self.harness("plugin_packages")
        content_type, body = encode_form(
            {"verify_signature": "false"},
            {"dify_bundle": bundle([{"type": "package", "value": {"path": checksum}}], {checksum: PACKAGE})},
        )
        env = daemon.call("POST", f"/plugin/{TENANT}/management/install/upload/bundle",
                          data=body, headers={"Content-Type": content_type})
        self.assert_storage_error(env, f"plugin_packages/{IDENTIFIER}")
        self.assert_nothing_stored(daemon)

    def test_upload_succeeds_once_storage_recovers(self):
        """After a refused upload, the same upload succeeds on a store with room."""
        daemon = self.harness("plugin_packages")
        self.assertEqual(daemon.upload(PACKAGE)["code"], -500)
        daemon.storage.prefixes = ()
        env = daemon.upload(PACKAGE)
        self.assertEqual(env["code"], 0, env)
        self.assertEqual(env["data"]["unique_identifier"], IDENTIFIER)


class InstallToFailingStorageTests(SynchronousTestCase):
    """An install whose copy of the package cannot be saved."""

    def test_install_task_names_storage_problem(self):
        """The task fails with the storage message; no installation, plugin row or installed copy is left."""
        memory = MemoryObjectStorage()
        daemon = DaemonHarness(self, storage=FailingObjectStorage(memory, ["plugin"]))
        self.assertEqual(daemon.upload(PACKAGE)["code"], 0)
        task_id = daemon.install(IDENTIFIER)["task_id"]
        task = daemon.ok("GET", f"/plugin/{TENANT}/management/install/tasks/{task_id}")
        self.assertEqual(task["status"], TASK_FAILED)
        self.assertEqual(task["plugins"][0]["message"],
                         f"object storage cannot save plugin/{IDENTIFIER}: No space left on device")
        self.assertEqual(daemon.launcher.launched, [])
        self.assertIsNone(self.successResultOf(daemon.persistence.get_plugin(IDENTIFIER)))
        self.assertEqual(sorted(k for k in memory.objects if k.startswith("plugin/")), [])
        listing = daemon.ok("GET", f"/plugin/{TENANT}/management/list", params={"page": 1, "page_size": 10})
        self.assertEqual(listing["total"], 0)
