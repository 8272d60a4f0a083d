"""
:class:`MemoryObjectStorage`: IObjectStorage in a dictionary, for tests.
Every method returns an already-fired Deferred.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from difydaemon.errors import ObjectNotFoundError
from difydaemon.interfaces import IObjectStorage
from difydaemon.storage.keys import check_key, check_prefix


@implementer(IObjectStorage)
class MemoryObjectStorage:
    """IObjectStorage in memory; ``objects`` is the key -> bytes mapping."""

    def __init__(self) -> None:
        self.objects = {}

    def save(self, key: str, data: bytes) -> Deferred:
        try:
            check_key(key)
        except ValueError:
            return fail()
        self.objects[key] = bytes(data)
        return succeed(None)

    def load(self, key: str) -> Deferred:
        try:
            check_key(key)
        except ValueError:
            return fail()
        if key not in self.objects:
            return fail(ObjectNotFoundError(f"object {key} not found"))
        return succeed(self.objects[key])

    def exists(self, key: str) -> Deferred:
        try:
            check_key(key)
        except ValueError:
            return fail()
        return succeed(key in self.objects)

    def delete(self, key: str) -> Deferred:
        try:
            check_key(key)
        except ValueError:
            return fail()
        self.objects.pop(key, None)
        return succeed(None)

    def list(self, prefix: str) -> Deferred:
        try:
            check_prefix(prefix)
        except ValueError:
            return fail()
        below = prefix + "/" if prefix else ""
        return succeed(sorted(key for key in self.objects if key.startswith(below)))
