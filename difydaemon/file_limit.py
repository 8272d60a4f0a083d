"""
The daemon's open-files limit (``RLIMIT_NOFILE``), raised at start.

Every HTTP connection, plugin pipe, debug socket and database connection
is a file descriptor.  Many systems start processes with a soft limit of
1024 and a far higher hard limit, which an unprivileged process may raise
its soft limit to: at 1024 a flood of idle connections would leave the
daemon unable to accept Dify's, spawn a plugin or open a file long before
``SERVER_MAX_CONNECTIONS`` (4096 by default) turns them away.

:func:`raise_open_files_limit` takes the ``resource`` module as a
parameter, so tests pass a fake.
"""

from __future__ import annotations

from attrs import frozen
from twisted.logger import Logger

log = Logger()


@frozen
class FileLimit:
    """
    The open-files limit before and after :func:`raise_open_files_limit`.

    :ivar before: the soft limit found.
    :ivar after: the soft limit now.
    :ivar hard: the hard limit.
    """

    before: int
    after: int
    hard: int


def raise_open_files_limit(resource=None) -> FileLimit | None:
    """
    Raise the soft ``RLIMIT_NOFILE`` to the hard limit, and log both.

    :param resource: the ``resource`` module (the default), or anything
        with its ``getrlimit``, ``setrlimit``, ``RLIMIT_NOFILE`` and
        ``RLIM_INFINITY``.
    :return: the limits, or None where there is none (no ``resource``
        module) or the system refused to raise it.
    """
    if resource is None:
        try:
            import resource
        except ImportError:  # not a POSIX system
            return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or hard == resource.RLIM_INFINITY:
        # nothing to raise; "unlimited" is no value Linux takes for this soft limit
        log.info("open files limit: {soft} (hard limit {hard})", soft=soft, hard=hard)
        return FileLimit(soft, soft, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        log.warn("open files limit stays {soft}: raising it to {hard} failed: {error}", soft=soft, hard=hard,
                 error=str(exc))
        return None
    log.info("open files limit raised from {soft} to {hard}", soft=soft, hard=hard)
    return FileLimit(soft, hard, hard)
