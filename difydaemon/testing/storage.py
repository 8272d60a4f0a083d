"""
:class:`FailingObjectStorage`: an IObjectStorage whose saves below chosen
prefixes fail as they do on a full or read-only disk, for unit tests of
what a failed save must roll back.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from difydaemon.errors import ObjectStorageError
from difydaemon.interfaces import IObjectStorage


@implementer(IObjectStorage)
class FailingObjectStorage:
    """
    Passes every call to ``inner``, except the saves of keys below
    ``prefixes``: those fail with the
    :class:`~difydaemon.errors.ObjectStorageError` a full disk gives, and
    store nothing.

    :param inner: the IObjectStorage that holds what is stored.
    :param prefixes: key prefixes (``"assets"`` covers ``assets/...``);
        ``""`` covers every key.
    :param reason: the system's reason in the error message.
    :ivar prefixes: the prefixes in force; set it to change them (``()``
        refuses nothing).
    :ivar refused: every key whose save was refused, in order.
    """

    def __init__(self, inner, prefixes=("",), reason: str = "No space left on device") -> None:
        self._inner = inner
        self.prefixes = tuple(prefixes)
        self._reason = reason
        self.refused: list[str] = []

    def _covers(self, key: str) -> bool:
        return any(prefix == "" or key == prefix or key.startswith(prefix + "/") for prefix in self.prefixes)

    def save(self, key: str, data: bytes) -> Deferred:
        if self._covers(key):
            self.refused.append(key)
            return fail(ObjectStorageError(f"object storage cannot save {key}: {self._reason}"))
        return self._inner.save(key, data)

    def load(self, key: str) -> Deferred:
        return self._inner.load(key)

    def exists(self, key: str) -> Deferred:
        return self._inner.exists(key)

    def delete(self, key: str) -> Deferred:
        return self._inner.delete(key)

    def list(self, prefix: str) -> Deferred:
        return self._inner.list(prefix)
