"""
Handing the memory start-up freed back to the system, once.

Starting the daemon (imports, the database's migrations, the wiring)
allocates and frees megabytes of blocks.  glibc keeps the freed pages of
its heap resident when anything still in use lies above them, so the idle
daemon held them for nothing: ``malloc_trim(0)`` once the daemon is ready
returns them (``bench/daemon_memory.py``: about 1.3 MB less when idle and
1 MB less after warm-up).  Elsewhere (musl, macOS) there is no
``malloc_trim`` and nothing happens.
"""

from __future__ import annotations

import ctypes

from twisted.logger import Logger

log = Logger()


def release_free_heap(libc=None) -> bool:
    """
    Return the heap's free pages to the system (glibc's ``malloc_trim(0)``).

    :param libc: the C library (the process's own symbols by default), or
        anything with a ``malloc_trim`` attribute taking the padding.
    :return: True if memory was returned, False if none could be or the C
        library has no ``malloc_trim``.
    """
    if libc is None:
        libc = ctypes.CDLL(None)
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    released = bool(trim(0))
    log.debug("malloc_trim released memory: {released}", released=released)
    return released
