"""
An object storage that counts its operations for ``/metrics``
(``storage_operations_total`` and ``storage_operation_duration_seconds``).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import implementer

from difydaemon.interfaces import IObjectStorage


@implementer(IObjectStorage)
class MeteredObjectStorage:
    """
    Wraps another :class:`~difydaemon.interfaces.IObjectStorage`; every
    operation is counted once it ends, with ``success`` or ``error``.

    :param storage: the store that does the work.
    :param metrics: a :class:`~difydaemon.observability.metrics.DaemonMetrics`.
    :param storage_type: the ``storage_type`` label (``PLUGIN_STORAGE_TYPE``).
    """

    def __init__(self, storage, metrics, storage_type: str) -> None:
        self._storage = storage
        self._metrics = metrics
        self._type = storage_type

    def _metered(self, operation: str, deferred: Deferred) -> Deferred:
        metrics = self._metrics
        started = metrics.clock()

        def ended(result, status):
            metrics.storage_operation(operation, self._type, status, metrics.clock() - started)
            return result

        deferred.addCallbacks(ended, ended, callbackArgs=("success",), errbackArgs=("error",))
        return deferred

    def _call(self, operation: str, *args) -> Deferred:
        try:
            deferred = getattr(self._storage, operation)(*args)
        except Exception:
            # a refused key raises at once in some stores: count it too
            self._metrics.storage_operation(operation, self._type, "error", 0.0)
            raise
        return self._metered(operation, deferred)

    def save(self, key: str, data: bytes):
        """Store ``data`` under ``key``."""
        return self._call("save", key, data)

    def load(self, key: str):
        """The bytes under ``key``."""
        return self._call("load", key)

    def exists(self, key: str):
        """Whether ``key`` is stored."""
        return self._call("exists", key)

    def delete(self, key: str):
        """Remove ``key``."""
        return self._call("delete", key)

    def list(self, prefix: str):
        """The keys below ``prefix``."""
        return self._call("list", prefix)
