"""
A plugin's memory limit: the manifest's ``resource.memory``, enforced.

The limit is set by the launcher (:mod:`difydaemon.runtimes.parent_death`)
as ``RLIMIT_DATA`` on the plugin's process before it ``exec``s Python, and
inherited by whatever the plugin spawns; or, where the daemon has a
delegated cgroup v2 memory controller, as a cgroup ``memory.max`` per
plugin process (:mod:`difydaemon.runtimes.cgroups`).  The rlimit stays the
fallback: a daemon in a container or under a service manager usually has
no such cgroup (this machine has none: cgroup v1 with the daemon in a
cgroup it may not subdivide), while an rlimit works everywhere the
launcher runs, needs no clean-up, and survives a SIGKILLed daemon.  ``RLIMIT_DATA`` rather than ``RLIMIT_AS``: since Linux
4.7 it counts the private writable memory a process maps (heap, anonymous
``mmap``), which is what a Python program grows by, while ``RLIMIT_AS``
also counts the reservations glibc and CPython make without touching them
(arenas, ``PROT_NONE`` guard regions), which would kill plugins far below
their real use.

Over the limit, ``malloc`` fails and Python raises ``MemoryError``.  The
SDK reports it as the session's error (``error_type`` ``MemoryError``) or
the process dies with it on stderr; either way the instance is killed (a
process that ran out of memory is in no state to be trusted), its callers
get :func:`memory_message`, and its restart gives that reason.
"""

from __future__ import annotations

#: The ``error_type`` the SDK gives a session whose call raised MemoryError.
MEMORY_ERROR_TYPE = "MemoryError"


#: The smallest ``resource.memory`` taken at its word.  A bare SDK plugin
#: maps about 60 MB of data before its first call (``VmData`` of the echo
#: plugin), so a smaller limit cannot be meant: the official packages write
#: 1048576 (1 MiB), which the Go daemon never enforced, and under an
#: ``RLIMIT_DATA`` of 1 MiB their Python cannot even load ``libpython``.
#: Twice that footprint leaves a real plugin room to start.
MINIMUM_MEMORY_LIMIT = 128 * 1048576
#: The largest ``resource.memory`` taken at its word: the launcher's
#: ``setrlimit`` takes a C long, and a larger number (a manifest may write
#: any JSON integer) raised OverflowError there, a traceback instead of a
#: plugin; so much memory is no limit anyway.
MAXIMUM_MEMORY_LIMIT = 2**63 - 1


def declared_memory(declaration: dict) -> int | None:
    """The manifest's ``resource.memory`` in bytes, or None when it is missing or not a positive integer."""
    resource = declaration.get("resource") if isinstance(declaration, dict) else None
    memory = resource.get("memory") if isinstance(resource, dict) else None
    if type(memory) is not int or memory <= 0:
        return None
    return memory


def memory_limit_of(declaration: dict) -> int | None:
    """
    The memory limit to enforce: the manifest's ``resource.memory`` in
    bytes, or None (nothing is enforced) when it is missing, not a positive
    integer, below :data:`MINIMUM_MEMORY_LIMIT` (a placeholder) or above
    :data:`MAXIMUM_MEMORY_LIMIT` (no limit).
    """
    memory = declared_memory(declaration)
    if memory is None or not MINIMUM_MEMORY_LIMIT <= memory <= MAXIMUM_MEMORY_LIMIT:
        return None
    return memory


def memory_message(plugin_id: str, limit: int) -> str:
    """What the callers of a plugin killed for memory are told."""
    return f"plugin {plugin_id} was killed: over its memory limit of {limit / 1048576:g} MB"


def ran_out_of_memory(stderr_tail: str) -> bool:
    """Whether a plugin's last stderr output says it died of MemoryError."""
    return "MemoryError" in stderr_tail
