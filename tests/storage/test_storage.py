"""IObjectStorage: one contract for the filesystem and in-memory stores."""

import os

from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from difydaemon.errors import ObjectNotFoundError
from difydaemon.interfaces import IObjectStorage
from difydaemon.storage.filesystem import TEMPORARY_SUFFIX, FilesystemObjectStorage
from difydaemon.storage.memory import MemoryObjectStorage
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
