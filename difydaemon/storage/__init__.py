"""
The object store (``http-api.md`` §5.3), behind
:class:`~difydaemon.interfaces.IObjectStorage`.

- :class:`FilesystemObjectStorage` ``(reactor, root, threadpool=None)``: the default.
- :class:`MemoryObjectStorage` ``()``: a dictionary, for tests.
- :class:`~difydaemon.storage.s3.S3ObjectStorage`: an S3-compatible bucket
  (``PLUGIN_STORAGE_TYPE=aws_s3``; imports botocore, so import it from its
  module).
- :class:`~difydaemon.storage.cache.CachedObjectStorage`: a per-node memory
  cache of immutable keys in front of a shared store.
- :class:`~difydaemon.storage.paths.StoragePaths`: the key prefixes.
"""

from difydaemon.storage.filesystem import FilesystemObjectStorage
from difydaemon.storage.memory import MemoryObjectStorage

__all__ = ["FilesystemObjectStorage", "MemoryObjectStorage"]
