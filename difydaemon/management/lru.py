"""A small least-recently-used cache, bounded by entries or by weight (bytes)."""

from __future__ import annotations

from collections import OrderedDict


def _one(value) -> int:
    return 1


class LRUCache:
    """
    A bounded mapping that forgets the least recently used entry first.

    :param capacity: the most total weight it keeps; 0 keeps nothing.
    :param weigh: ``weigh(value) -> int``, the weight of one entry (its
        size in bytes, say); every entry weighs 1 by default, so
        ``capacity`` counts entries.  An entry heavier than ``capacity`` is
        never kept.
    """

    def __init__(self, capacity: int, weigh=_one) -> None:
        self._capacity = capacity
        self._weigh = weigh
        self._entries: OrderedDict = OrderedDict()  # key -> (value, weight)
        self._weight = 0

    def get(self, key, default=None):
        """The value of ``key`` (now most recently used), or ``default``."""
        try:
            self._entries.move_to_end(key)
        except KeyError:
            return default
        return self._entries[key][0]

    def put(self, key, value) -> None:
        """Remember ``key``; may forget the oldest entries."""
        self.discard(key)
        weight = self._weigh(value)
        if weight > self._capacity:
            return
        self._entries[key] = (value, weight)
        self._weight += weight
        while self._weight > self._capacity:
            _, (_, dropped) = self._entries.popitem(last=False)
            self._weight -= dropped

    def discard(self, key) -> None:
        """Forget ``key`` if present."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._weight -= entry[1]

    @property
    def weight(self) -> int:
        """The total weight of the entries held."""
        return self._weight

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)
