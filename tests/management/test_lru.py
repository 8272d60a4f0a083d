"""Tests for the least-recently-used cache."""

from difydaemon.management.lru import LRUCache
from difydaemon.testing.cases import SynchronousTestCase


class CountedTests(SynchronousTestCase):
    """Without a weight, capacity counts entries."""

    def test_oldest_forgotten(self):
        """Past capacity the least recently used entry goes, not the one just read."""
        cache = LRUCache(2)
        cache.put("a", 1)
        cache.put("b", 2)
        self.assertEqual(cache.get("a"), 1)
        cache.put("c", 3)
        self.assertIsNone(cache.get("b"))
        self.assertEqual((cache.get("a"), cache.get("c"), len(cache)), (1, 3, 2))

    def test_zero_keeps_nothing(self):
        """A capacity of 0 keeps nothing."""
        cache = LRUCache(0)
        cache.put("a", 1)
        self.assertEqual(len(cache), 0)


class WeightedTests(SynchronousTestCase):
    """With a weight, capacity bounds the total weight."""

    def test_bounded_by_weight(self):
        """Entries go, oldest first, until the total weight fits the capacity."""
        cache = LRUCache(10, weigh=len)
        cache.put("a", b"xxxx")
        cache.put("b", b"yyyy")
        cache.put("c", b"zzzz")
        self.assertNotIn("a", cache)
        self.assertEqual(cache.weight, 8)
        self.assertEqual(cache.get("c"), b"zzzz")

    def test_heavier_than_capacity_not_kept(self):
        """An entry heavier than the whole capacity is not kept and evicts nothing."""
        cache = LRUCache(10, weigh=len)
        cache.put("a", b"xx")
        cache.put("big", b"x" * 11)
        self.assertNotIn("big", cache)
        self.assertEqual((cache.get("a"), cache.weight), (b"xx", 2))

    def test_replace_and_discard_keep_weight_true(self):
        """Replacing or discarding an entry takes its old weight off the total."""
        cache = LRUCache(10, weigh=len)
        cache.put("a", b"xxxx")
        cache.put("a", b"xx")
        self.assertEqual(cache.weight, 2)
        cache.discard("a")
        cache.discard("a")
        self.assertEqual((cache.weight, len(cache)), (0, 0))
