"""CachedObjectStorage: the contract, and reads of immutable keys that never reach the store twice."""

from twisted.internet.defer import fail
from zope.interface import implementer

from difydaemon.errors import ObjectStorageError
from difydaemon.interfaces import IObjectStorage
from difydaemon.storage.cache import ByteBoundedLRU, CachedObjectStorage
from difydaemon.storage.memory import MemoryObjectStorage
from difydaemon.storage.paths import StoragePaths
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.storage import FailingObjectStorage
from tests.storage.test_storage import ObjectStorageContract

ASSET = "assets/" + "a" * 64 + ".svg"


@implementer(IObjectStorage)
class CountingStorage:
    """Passes every call to a memory store, counting loads; ``down`` makes every call fail as an outage does."""

    def __init__(self) -> None:
        self.memory = MemoryObjectStorage()
        self.loads = 0
        self.down = False

    def _gone(self):
        return fail(ObjectStorageError("object storage cannot reach the store: Could not connect"))

    def save(self, key, data):
        return self._gone() if self.down else self.memory.save(key, data)

    def load(self, key):
        self.loads += 1
        return self._gone() if self.down else self.memory.load(key)

    def exists(self, key):
        return self._gone() if self.down else self.memory.exists(key)

    def delete(self, key):
        return self._gone() if self.down else self.memory.delete(key)

    def list(self, prefix):
        return self._gone() if self.down else self.memory.list(prefix)


class CachedContractTests(ObjectStorageContract, SynchronousTestCase):
    """The cached store keeps the IObjectStorage contract, on immutable and other keys alike."""

    def setUp(self):
        super().setUp()
        # "media", "k", "a" ... of the contract are cached: every path is exercised
        self.storage = CachedObjectStorage(
            MemoryObjectStorage(), ["plugin_packages", "media", "a", "dir", "empty", "k", "never"]
        )

    def run_check(self, check):
        self.successResultOfCoroutine(check)


class CachedReadTests(SynchronousTestCase):
    """Reads of immutable keys are answered from memory once the node has the bytes."""

    def setUp(self):
        super().setUp()
        self.inner = CountingStorage()
        self.storage = CachedObjectStorage(self.inner, StoragePaths().immutable_prefixes(), capacity=100, max_object=40)

    def test_second_read_needs_no_store(self):
        """An asset read once is answered again, at once, while the store is down."""
        self.successResultOf(self.inner.memory.save(ASSET, b"<svg/>"))
        self.assertEqual(self.successResultOf(self.storage.load(ASSET)), b"<svg/>")
        self.inner.down = True
        self.assertEqual(self.successResultOf(self.storage.load(ASSET)), b"<svg/>")
        self.assertTrue(self.successResultOf(self.storage.exists(ASSET)))
        self.assertEqual(self.inner.loads, 1)
        self.assertEqual((self.storage.hits, self.storage.misses), (1, 1))

    def test_saved_here_is_never_read(self):
        """A package this node saved is read back without asking the store (write-through)."""
        self.successResultOf(self.storage.save("plugin/acme/echo:1@x", b"zip"))
        self.inner.down = True
        self.assertEqual(self.successResultOf(self.storage.load("plugin/acme/echo:1@x")), b"zip")
        self.assertEqual(self.inner.loads, 0)

    def test_failed_save_is_not_cached(self):
        """A save the store refused leaves nothing in the cache."""
        self.inner.down = True
        self.failureResultOf(self.storage.save(ASSET, b"x"), ObjectStorageError)
        self.failureResultOf(self.storage.load(ASSET), ObjectStorageError)

    def test_other_keys_pass_through(self):
        """Keys outside the immutable prefixes are always read from the store."""
        self.successResultOf(self.storage.save("persistence/t/p/k", b"1"))
        self.successResultOf(self.storage.load("persistence/t/p/k"))
        self.inner.down = True
        self.failureResultOf(self.storage.load("persistence/t/p/k"), ObjectStorageError)

    def test_delete_forgets(self):
        """A deleted key is no longer answered from memory."""
        self.successResultOf(self.storage.save(ASSET, b"x"))
        self.successResultOf(self.storage.delete(ASSET))
        self.assertFalse(self.successResultOf(self.storage.exists(ASSET)))

    def test_large_objects_not_kept(self):
        """An object above the per-object bound is read from the store every time."""
        self.successResultOf(self.storage.save("plugin_packages/big", b"x" * 41))
        self.successResultOf(self.storage.load("plugin_packages/big"))
        self.assertEqual(self.inner.loads, 1)
        self.inner.down = True
        self.failureResultOf(self.storage.load("plugin_packages/big"), ObjectStorageError)

    def test_start_reaches_the_store(self):
        """start() runs the start-up checks of the store behind, when it has some."""
        started = []
        self.inner.start = lambda: started.append(True) or fail(ObjectStorageError("no bucket"))
        self.failureResultOf(self.storage.start(), ObjectStorageError)
        self.assertEqual(started, [True])
        self.successResultOf(CachedObjectStorage(FailingObjectStorage(MemoryObjectStorage()), []).start())


class ByteBoundedLRUTests(SynchronousTestCase):
    """The cache holds at most its capacity in bytes, least recently used out first."""

    def test_eviction_by_bytes(self):
        """Adding past the capacity drops the least recently used entries."""
        lru = ByteBoundedLRU(capacity=10, max_entry=10)
        lru.put("a", b"1234")
        lru.put("b", b"1234")
        lru.get("a")
        lru.put("c", b"1234")
        self.assertEqual((lru.get("a"), lru.get("b"), lru.get("c")), (b"1234", None, b"1234"))
        self.assertEqual(lru.size, 8)

    def test_replacing_counts_once(self):
        """Putting a key again replaces its bytes in the count."""
        lru = ByteBoundedLRU(capacity=10, max_entry=10)
        lru.put("a", b"12345678")
        lru.put("a", b"12")
        self.assertEqual(lru.size, 2)
