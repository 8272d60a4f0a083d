"""
:class:`CachedObjectStorage`: a per-node memory cache in front of a
shared object store (S3), for the keys whose bytes never change.

Packages are named by their checksum and icons by the hash of their
content (:meth:`~difydaemon.storage.paths.StoragePaths.immutable_prefixes`),
so a copy held by one node is never stale: it can answer every later read
of the key without asking the store, and a read that hits answers with an
already-fired Deferred.  Icons, the packages that extract-asset, readme and
decode read, and a package this node uploaded (written through) are read
from the store at most once per node while they fit.  Other keys pass
through untouched.

A key deleted by another node may still be answered from here until it is
evicted; that is harmless for content-addressed keys, whose bytes are the
right ones for whoever still asks by that name, and the database, not the
store, says what is installed.  Absence is never cached: another node may
save the key a moment later.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from difydaemon.interfaces import IObjectStorage
from difydaemon.storage.keys import check_key

#: bytes kept in all (icons are small; a package is a few hundred kB to 50 MB)
CACHE_BYTES = 64 * 1024 * 1024
#: the largest object kept, so that one package cannot flush every icon
MAX_OBJECT_BYTES = 8 * 1024 * 1024


class ByteBoundedLRU:
    """key -> bytes, least recently used first out once ``capacity`` bytes are held."""

    def __init__(self, capacity: int, max_entry: int) -> None:
        self._entries: OrderedDict = OrderedDict()
        self._capacity = capacity
        self._max_entry = max_entry
        self.size = 0

    def get(self, key: str):
        """The bytes of ``key`` (now the most recent), or None."""
        data = self._entries.get(key)
        if data is not None:
            self._entries.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        """Keep ``data`` unless it is larger than one entry may be."""
        self.discard(key)
        if len(data) > self._max_entry or len(data) > self._capacity:
            return
        self._entries[key] = data
        self.size += len(data)
        while self.size > self._capacity:
            _, evicted = self._entries.popitem(last=False)
            self.size -= len(evicted)

    def discard(self, key: str) -> None:
        """Forget ``key``."""
        data = self._entries.pop(key, None)
        if data is not None:
            self.size -= len(data)

    def __contains__(self, key: str) -> bool:
        return key in self._entries


@implementer(IObjectStorage)
class CachedObjectStorage:
    """
    An IObjectStorage that answers reads of immutable keys from memory.

    :param inner: the shared IObjectStorage.
    :param immutable_prefixes: prefixes (without ``/``) whose keys never
        change their bytes.
    :param capacity: bytes kept in all.
    :param max_object: the largest object kept.
    """

    def __init__(self, inner, immutable_prefixes, capacity: int = CACHE_BYTES, max_object: int = MAX_OBJECT_BYTES):
        self._inner = inner
        self._prefixes = tuple(prefix.rstrip("/") + "/" for prefix in immutable_prefixes)
        self._cache = ByteBoundedLRU(capacity, max_object)
        #: reads answered from memory and from the store (an operator's figures)
        self.hits = 0
        self.misses = 0

    @property
    def inner(self):
        """The store behind the cache."""
        return self._inner

    def start(self) -> Deferred:
        """Start the store behind (its start-up checks), if it has any."""
        start = getattr(self._inner, "start", None)
        return start() if start is not None else succeed(None)

    def stop(self) -> None:
        """Stop the store behind (no more calls or retries), if it can be."""
        stop = getattr(self._inner, "stop", None)
        if stop is not None:
            stop()

    def _cacheable(self, key: str) -> bool:
        return key.startswith(self._prefixes)

    def save(self, key: str, data: bytes) -> Deferred:
        d = self._inner.save(key, data)
        if self._cacheable(key):
            data = bytes(data)

            def saved(result):
                self._cache.put(key, data)
                return result

            d.addCallback(saved)
        return d

    def load(self, key: str) -> Deferred:
        try:
            check_key(key)
        except ValueError:
            return fail()
        cached = self._cache.get(key)
        if cached is not None:
            self.hits += 1
            return succeed(cached)
        d = self._inner.load(key)
        if self._cacheable(key):
            self.misses += 1

            def loaded(data):
                self._cache.put(key, data)
                return data

            d.addCallback(loaded)
        return d

    def exists(self, key: str) -> Deferred:
        if key in self._cache:
            return succeed(True)
        return self._inner.exists(key)

    def delete(self, key: str) -> Deferred:
        self._cache.discard(key)
        return self._inner.delete(key)

    def list(self, prefix: str) -> Deferred:
        return self._inner.list(prefix)
