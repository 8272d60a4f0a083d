"""
Install tasks held under leases, so that a replica that dies does not leave
its tasks "running" for ever.

The replica that runs a task holds the lease ``task:<id>`` from before the
task's row is written until its outcome is; a
:class:`~difydaemon.coordination.leases.HeldLease` renews it every third of
its ttl.  Any replica may fail a pending or running task whose lease is
free: its holder is gone (killed, partitioned from Redis for longer than
the ttl).  A holder that loses its lease stops the task's jobs and stops
writing for it.

Alone, a daemon's leases are in memory: at its start every unfinished task
is orphaned (the previous run's), exactly what a single node did before.
"""

from __future__ import annotations

from difydaemon.coordination.leases import HeldLease

#: Seconds a task's lease lives without renewal (renewed every third).
TASK_LEASE_TTL = 15.0


def task_lease_name(task_id: str) -> str:
    """The lease of one install task."""
    return f"task:{task_id}"


class TaskLeases:
    """
    The leases of install tasks.

    :param reactor: the reactor.
    :param leases: an ILeaseService.
    :param ttl: seconds a lease lives without renewal.
    """

    def __init__(self, reactor, leases, ttl: float = TASK_LEASE_TTL) -> None:
        self._reactor = reactor
        self._leases = leases
        self.ttl = ttl

    async def hold(self, task_id: str, on_lost) -> HeldLease:
        """
        Take the lease of a new task.

        :raises CoordinationUnavailableError: Redis is down (the task must
            not start: nobody could tell it from an orphan).
        :raises RuntimeError: the lease is held (task ids are fresh; this
            is a bug).
        """
        lease = await HeldLease.acquire(self._reactor, self._leases, task_lease_name(task_id), self.ttl, on_lost)
        if lease is None:
            raise RuntimeError(f"the lease of new task {task_id} is held")
        return lease

    async def is_orphaned(self, task_id: str) -> bool:
        """
        Whether nobody holds the task's lease.

        :raises CoordinationUnavailableError: Redis is down.
        """
        return await self._leases.holder(task_lease_name(task_id)) is None
