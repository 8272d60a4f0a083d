"""A small least-recently-used cache for asset bytes."""

from __future__ import annotations

from collections import OrderedDict


class LRUCache:
    """
    A bounded mapping that forgets the least recently used entry first.

    :param capacity: how many entries it keeps; 0 keeps none.
    """

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict = OrderedDict()

    def get(self, key, default=None):
        """The value of ``key`` (now most recently used), or ``default``."""
        try:
            self._entries.move_to_end(key)
        except KeyError:
            return default
        return self._entries[key]

    def put(self, key, value) -> None:
        """Remember ``key``; may forget the oldest entry."""
        if self._capacity <= 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def discard(self, key) -> None:
        """Forget ``key`` if present."""
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
