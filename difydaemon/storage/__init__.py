"""
The object store (``http-api.md`` §5.3), behind
:class:`~difydaemon.interfaces.IObjectStorage`.

- :class:`FilesystemObjectStorage` ``(reactor, root, threadpool=None)``: the default.
- :class:`MemoryObjectStorage` ``()``: a dictionary, for tests.
"""

from difydaemon.storage.filesystem import FilesystemObjectStorage
from difydaemon.storage.memory import MemoryObjectStorage

__all__ = ["FilesystemObjectStorage", "MemoryObjectStorage"]
