"""FailingObjectStorage: refuses the saves it is told to, passes on the rest."""

from zope.interface.verify import verifyObject

from difydaemon.errors import ObjectStorageError
from difydaemon.interfaces import IObjectStorage
from difydaemon.storage.memory import MemoryObjectStorage
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.storage import FailingObjectStorage


class FailingObjectStorageTests(SynchronousTestCase):
    """The fake full disk of the unit tests."""

    def test_provides_interface(self):
        """It provides IObjectStorage."""
        self.assertTrue(verifyObject(IObjectStorage, FailingObjectStorage(MemoryObjectStorage())))

    def test_refuses_saves_below_prefixes(self):
        """A save below a prefix fails with an ObjectStorageError naming key and reason, and stores nothing."""
        inner = MemoryObjectStorage()
        storage = FailingObjectStorage(inner, ["assets"], reason="Read-only file system")
        failure = self.failureResultOf(storage.save("assets/a.svg", b"x"), ObjectStorageError)
        self.assertEqual(failure.value.message, "object storage cannot save assets/a.svg: Read-only file system")
        self.assertEqual(inner.objects, {})
        self.assertEqual(storage.refused, ["assets/a.svg"])

    def test_passes_other_calls_on(self):
        """Saves elsewhere, loads, exists, list and delete reach the inner store."""
        inner = MemoryObjectStorage()
        storage = FailingObjectStorage(inner, ["assets"])
        self.successResultOf(storage.save("assetsx/a", b"1"))
        self.assertEqual(self.successResultOf(storage.load("assetsx/a")), b"1")
        self.assertTrue(self.successResultOf(storage.exists("assetsx/a")))
        self.assertEqual(self.successResultOf(storage.list("assetsx")), ["assetsx/a"])
        self.successResultOf(storage.delete("assetsx/a"))
        self.assertEqual(inner.objects, {})

    def test_empty_prefix_refuses_every_save(self):
        """By default every save is refused."""
        storage = FailingObjectStorage(MemoryObjectStorage())
        self.failureResultOf(storage.save("any/key", b"x"), ObjectStorageError)
