"""IObjectStorage: one contract for the filesystem and in-memory stores."""

import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from difydaemon.errors import ObjectNotFoundError, ObjectStorageError
from difydaemon.interfaces import IObjectStorage
from difydaemon.observability.metrics import DaemonMetrics
from difydaemon.storage.filesystem import TEMPORARY_SUFFIX, FilesystemObjectStorage
from difydaemon.storage.memory import MemoryObjectStorage
from difydaemon.storage.metered import MeteredObjectStorage
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from tests.persistence.contract import contract

PACKAGE = "plugin_packages/acme/echo:0.0.1@" + "a" * 64

BAD_KEYS = [
    "", "/abs", "a//b", "a/", "./a", "a/./b", "a/../b", "..", "../escape", "a\\b", "nul\x00",
]


async def _raises(testcase, exception, deferred):
    """Assert that ``deferred`` fails with ``exception``."""
    try:
        await deferred
    except exception:
        return
    testcase.fail(f"expected {exception.__name__}")


class ObjectStorageContract:
    """The behaviour every IObjectStorage must have; ``self.storage`` is fresh."""

    storage = None

    @contract
    async def test_provides_interface(self):
        """The implementation provides IObjectStorage with matching signatures."""
        self.assertTrue(verifyObject(IObjectStorage, self.storage))

    @contract
    async def test_round_trip(self):
        """Saved bytes (every byte value) load back unchanged under an identifier-like key."""
        data = bytes(range(256)) * 10
        await self.storage.save(PACKAGE, data)
        self.assertEqual(await self.storage.load(PACKAGE), data)
        self.assertTrue(await self.storage.exists(PACKAGE))

    @contract
    async def test_replace(self):
        """Saving an existing key replaces its bytes."""
        await self.storage.save("k", b"one")
        await self.storage.save("k", b"two")
        self.assertEqual(await self.storage.load("k"), b"two")

    @contract
    async def test_empty_object(self):
        """An empty value is stored and exists."""
        await self.storage.save("empty", b"")
        self.assertEqual(await self.storage.load("empty"), b"")
        self.assertTrue(await self.storage.exists("empty"))

    @contract
    async def test_missing(self):
        """A missing key does not exist and loading it is ObjectNotFoundError."""
        await self.storage.save("dir/present", b"x")
        self.assertFalse(await self.storage.exists("absent"))
        self.assertFalse(await self.storage.exists("dir"))
        await _raises(self, ObjectNotFoundError, self.storage.load("absent"))
        await _raises(self, ObjectNotFoundError, self.storage.load("dir"))
        await _raises(self, ObjectNotFoundError, self.storage.load("dir/present/below"))

    @contract
    async def test_delete(self):
        """delete removes a key; deleting an absent key is no error."""
        await self.storage.save("a/b", b"x")
        await self.storage.save("a/c", b"y")
        await self.storage.delete("a/b")
        await self.storage.delete("a/b")
        await self.storage.delete("never/there")
        self.assertFalse(await self.storage.exists("a/b"))
        self.assertEqual(await self.storage.load("a/c"), b"y")

    @contract
    async def test_list(self):
        """list gives every key below the prefix, full keys, sorted, not siblings."""
        for key in ("media/z.png", "media/a/b.svg", "media/a.svg", "mediax/no", "other"):
            await self.storage.save(key, b"x")
        self.assertEqual(
            await self.storage.list("media"), ["media/a.svg", "media/a/b.svg", "media/z.png"]
        )
        self.assertEqual(await self.storage.list("media/a"), ["media/a/b.svg"])
        self.assertEqual(await self.storage.list("nothing"), [])
        self.assertEqual(await self.storage.list("other"), [])
        self.assertEqual(len(await self.storage.list("")), 5)

    @contract
    async def test_bad_keys_refused(self):
        """Every method refuses malformed keys with ValueError and stores nothing."""
        for key in BAD_KEYS:
            await _raises(self, ValueError, self.storage.save(key, b"x"))
            await _raises(self, ValueError, self.storage.load(key))
            await _raises(self, ValueError, self.storage.exists(key))
            await _raises(self, ValueError, self.storage.delete(key))
            if key:
                await _raises(self, ValueError, self.storage.list(key))
        self.assertEqual(await self.storage.list(""), [])


class MemoryObjectStorageTests(ObjectStorageContract, SynchronousTestCase):
    """The in-memory store keeps the contract with fired Deferreds."""

    def setUp(self):
        super().setUp()
        self.storage = MemoryObjectStorage()

    def run_check(self, check):
        self.successResultOfCoroutine(check)


class FilesystemObjectStorageTests(ObjectStorageContract, AsyncTestCase):
    """The filesystem store keeps the contract, doing its I/O in threads."""

    def setUp(self):
        from twisted.internet import reactor

        self.root = self.mktemp()
        self.storage = FilesystemObjectStorage(reactor, self.root)

    def run_check(self, check):
        return Deferred.fromCoroutine(check)

    async def test_files_under_root(self):
        """Keys are files below the root and no temporary file is left after a save."""
        await self.storage.save("plugin_packages/acme/echo", b"zip")
        await self.storage.save("plugin_packages/acme/echo", b"zip2")
        with open(os.path.join(self.root, "plugin_packages", "acme", "echo"), "rb") as f:
            self.assertEqual(f.read(), b"zip2")
        leftovers = [
            name for _, _, names in os.walk(self.root) for name in names
            if name.endswith(TEMPORARY_SUFFIX)
        ]
        self.assertEqual(leftovers, [])

    async def test_lists_files_written_by_others(self):
        """Files put below the root by another process are listed as keys; temporaries not."""
        os.makedirs(os.path.join(self.root, "cache", "sub"))
        for name in ("cache/sub/one", "cache/two", "cache/.x" + TEMPORARY_SUFFIX):
            with open(os.path.join(self.root, *name.split("/")), "wb") as f:
                f.write(b"x")
        self.assertEqual(await self.storage.list("cache"), ["cache/sub/one", "cache/two"])


class FilesystemFailureTests(AsyncTestCase):
    """A disk that refuses a save, a load or a delete: a clear error, and nothing left behind."""

    def setUp(self):
        from twisted.internet import reactor

        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.storage = FilesystemObjectStorage(reactor, self.root)

    def tree(self) -> list:
        """Every directory and file below the root, relative to it."""
        found = []
        for directory, names, files in os.walk(self.root):
            for name in names + files:
                found.append(os.path.relpath(os.path.join(directory, name), self.root))
        return sorted(found)

    async def test_failed_save_removes_the_directories_it_made(self):
        """A save that fails after making directories removes them and names the key and the reason."""
        key = "fresh/deeper/" + "n" * 300
        try:
            await self.storage.save(key, b"data")
        except ObjectStorageError as e:
            error = e
        else:
            self.fail("the save did not fail")
        self.assertIn("object storage cannot save fresh/deeper/nnn", error.message)
        self.assertIn("File name too long", error.message)
        self.assertEqual(self.tree(), [])

    async def test_failed_save_keeps_directories_it_did_not_make(self):
        """Directories that held keys before a failed save stay, with their keys."""
        await self.storage.save("kept/one", b"1")
        await _raises(self, ObjectStorageError, self.storage.save("kept/" + "n" * 300, b"2"))
        self.assertEqual(self.tree(), ["kept", os.path.join("kept", "one")])

    async def test_save_below_a_file(self):
        """A key whose directory is a file fails with 'Not a directory' and leaves the file alone."""
        with open(os.path.join(self.root, "blocked"), "wb") as f:
            f.write(b"not a directory")
        try:
            await self.storage.save("blocked/inner/key", b"data")
        except ObjectStorageError as e:
            self.assertIn("Not a directory", e.message)
        else:
            self.fail("the save did not fail")
        self.assertEqual(self.tree(), ["blocked"])
        await self.storage.save("other/key", b"data")
        self.assertEqual(await self.storage.load("other/key"), b"data")

    async def test_root_made_when_missing(self):
        """A root that does not exist yet is made by the first save."""
        from twisted.internet import reactor

        root = os.path.join(self.root, "new", "root")
        storage = FilesystemObjectStorage(reactor, root)
        await storage.save("a/b", b"x")
        self.assertEqual(await storage.load("a/b"), b"x")

    async def test_delete_removes_emptied_directories(self):
        """Deleting the last key of a directory removes the directories it leaves empty, never the root."""
        await self.storage.save("a/b/c", b"1")
        await self.storage.save("a/d", b"2")
        await self.storage.delete("a/b/c")
        self.assertEqual(self.tree(), ["a", os.path.join("a", "d")])
        await self.storage.delete("a/d")
        self.assertEqual(self.tree(), [])
        self.assertTrue(os.path.isdir(self.root))

    async def test_overlong_key_is_absent(self):
        """A key too long for the filesystem is not found, does not exist, and deleting it does nothing."""
        key = "assets/" + "a" * 10000
        await _raises(self, ObjectNotFoundError, self.storage.load(key))
        self.assertFalse(await self.storage.exists(key))
        await self.storage.delete(key)

    async def test_unreadable_key_is_storage_error(self):
        """A key the disk cannot read (a symbolic link loop) fails with an ObjectStorageError naming it."""
        os.makedirs(os.path.join(self.root, "assets"))
        loop = os.path.join(self.root, "assets", "loop")
        os.symlink(loop, loop)
        try:
            await self.storage.load("assets/loop")
        except ObjectStorageError as e:
            self.assertIn("object storage cannot load assets/loop: Too many levels of symbolic links", e.message)
        else:
            self.fail("the load did not fail")


class MeteredObjectStorageTests(ObjectStorageContract, SynchronousTestCase):
    """The metered store keeps the contract of the store it wraps, and counts each operation."""

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.metrics = DaemonMetrics(self.clock.seconds)
        self.storage = MeteredObjectStorage(MemoryObjectStorage(), self.metrics, "local")

    def run_check(self, check):
        self.successResultOfCoroutine(check)

    def test_counts_outcomes(self):
        """Successes and failures (a missing key, a refused key) count by operation, type and status."""
        self.successResultOf(self.storage.save("a/b", b"x"))
        self.successResultOf(self.storage.load("a/b"))
        self.failureResultOf(self.storage.load("a/missing"), ObjectNotFoundError)
        try:
            d = self.storage.load("../escape")
        except ValueError:
            pass
        else:
            self.failureResultOf(d, ValueError)
        counts = {key: sum(histogram[:-1]) for key, histogram in self.metrics.storage.items()}
        self.assertEqual(
            counts,
            {
                ("save", "local", "success"): 1,
                ("load", "local", "success"): 1,
                ("load", "local", "error"): 2,
            },
        )
