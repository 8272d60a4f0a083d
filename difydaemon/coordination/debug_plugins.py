"""
Debug plugins' installations outliving the replica that held them.

A debug plugin is installed for its tenant (a ``plugin_installations`` row
of runtime type ``remote``) by the replica whose debug port it connected
to, and uninstalled when its connection closes.  A replica killed with
SIGKILL uninstalls nothing: its plugins' rows would stay, listed by every
replica, until each plugin reconnected.  Its claims on them (in
:class:`~difydaemon.interfaces.IMembership`) expire by themselves with its
membership, 15 s after its last heartbeat.

:class:`DebugInstallationSweeper`, on every replica, removes the rows of
debug installations that no live replica claims.  It is fenced so that it
never removes a live one:

- an installation counts as orphaned only when two sweeps at least
  ``grace`` seconds apart (a ttl: every live holder re-claims its plugins
  every ttl / 3) both found no live replica claiming its identifier;
- writers of a debug installation hold the lease
  ``debug-install:<tenant>:<plugin_id>``
  (:class:`DebugInstallGuard`): the installing replica takes it before it
  writes the rows and claims the identifier before it lets go; the sweeper
  takes it too, and under it looks again at the claims and at the row
  before removing anything.  So a plugin that reconnects to a live replica
  (reusing its old row) is either claimed before the sweeper looks, or
  installs after the row is gone.

A replica cut off from Redis for longer than a ttl is indistinguishable
from a dead one: its debug plugins' rows are removed by the others and its
calls for them fail until the plugins reconnect.

Alone (in-memory coordination) the same sweeps remove the rows a previous
run of the daemon left behind when it was killed.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger

from difydaemon import errors
from difydaemon.coordination.leases import HeldLease
from difydaemon.coordination.membership import NODE_TTL

log = Logger()

#: The runtime type of debug installations.
REMOTE = "remote"
#: Seconds a replica waits for another writer of the same debug
#: installation (a sweep or another connection) before refusing.
LOCK_WAIT = 5.0
#: Seconds between two tries for a held lock.
LOCK_POLL = 0.05


def install_lock_name(tenant_id: str, plugin_id: str) -> str:
    """The lease held while a tenant's debug installation of ``plugin_id`` is written."""
    return f"debug-install:{tenant_id}:{plugin_id}"


class DebugInstallGuard:
    """
    The fencing of debug installations between replicas (see the module).

    :param reactor: the reactor.
    :param leases: an ILeaseService.
    :param membership: an IMembership.
    :param node_id: this replica.
    :param ttl: seconds a lease and a first claim live.
    :param wait: seconds :meth:`hold` waits for a held lease.
    """

    def __init__(self, reactor, leases, membership, node_id: str, ttl: float = NODE_TTL,
                 wait: float = LOCK_WAIT) -> None:
        self._reactor = reactor
        self._leases = leases
        self._membership = membership
        self.node_id = node_id
        self.ttl = ttl
        self.wait = wait

    def try_hold(self, tenant_id: str, plugin_id: str) -> Deferred:
        """Deferred[HeldLease | None]: the lease of that installation if it is free now."""
        return Deferred.fromCoroutine(
            HeldLease.acquire(self._reactor, self._leases, install_lock_name(tenant_id, plugin_id), self.ttl)
        )

    async def hold(self, tenant_id: str, plugin_id: str) -> HeldLease:
        """
        The lease of that installation, waiting up to ``wait`` seconds for it.

        :raises CoordinationUnavailableError: Redis is down (a debug plugin
            installed now could not be told from an orphan).
        :raises InternalServerError: still held after the wait.
        """
        deadline = self._reactor.seconds() + self.wait
        while True:
            lease = await self.try_hold(tenant_id, plugin_id)
            if lease is not None:
                return lease
            if self._reactor.seconds() >= deadline:
                raise errors.InternalServerError(
                    f"debug plugin {plugin_id} is being installed or removed by another replica; try again"
                )
            await deferLater(self._reactor, LOCK_POLL, lambda: None)

    def claim(self, plugin_unique_identifier: str) -> Deferred:
        """
        Claim the identifier for this replica for one ttl (the runtime's
        registration then keeps it claimed).  Deferred[None].
        """
        return self._membership.claim_plugin(plugin_unique_identifier, self.node_id, self.ttl)

    def holders(self, plugin_unique_identifier: str) -> Deferred:
        """Deferred[list of NodeInfo]: the live replicas claiming the identifier."""
        return self._membership.plugin_holders(plugin_unique_identifier)


class DebugInstallationSweeper(Service):
    """
    Every ``interval`` seconds, remove the debug installations that no live
    replica has claimed for ``grace`` seconds (see the module).

    :param reactor: the reactor.
    :param persistence: an IPersistence.
    :param guard: the :class:`DebugInstallGuard`.
    :param invalidate: ``(tenant_id, plugin_id) -> None``, the installation
        cache's invalidation (every replica's).
    :param owned_here: ``(tenant_id, plugin_id) -> bool``: a connection of
        this replica owns that installation (never removed).
    """

    def __init__(self, reactor, persistence, guard: DebugInstallGuard, invalidate, owned_here,
                 interval: float = NODE_TTL, grace: float = NODE_TTL) -> None:
        self._reactor = reactor
        self._persistence = persistence
        self._guard = guard
        self._invalidate = invalidate
        self._owned_here = owned_here
        self.interval = interval
        self.grace = grace
        # installation id -> when a sweep first found it unclaimed
        self._suspects: dict[str, float] = {}
        self._loop = LoopingCall(self._sweep_quietly)
        self._loop.clock = reactor

    def startService(self) -> None:
        super().startService()
        # not at once: the start of a daemon has better things to do
        self._loop.start(self.interval, now=False).addErrback(
            lambda f: log.failure("sweeping orphaned debug plugins failed", f)
        )

    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def _sweep_quietly(self) -> Deferred:
        d = Deferred.fromCoroutine(self.sweep())
        d.addErrback(self._sweep_failed)
        return d

    @staticmethod
    def _sweep_failed(failure) -> None:
        if failure.check(errors.DaemonError):
            # Redis or the database is away: the next sweep looks again
            log.warn("cannot look for orphaned debug plugins: {reason}", reason=failure.value.message)
        else:
            log.failure("sweeping orphaned debug plugins failed", failure)

    async def sweep(self) -> int:
        """One sweep; how many installations it removed."""
        now = self._reactor.seconds()
        installations = await self._persistence.list_installations_by_runtime_type(REMOTE)
        suspects: dict[str, float] = {}
        removed = 0
        for installation in installations:
            if self._owned_here(installation.tenant_id, installation.plugin_id):
                continue
            if await self._guard.holders(installation.plugin_unique_identifier):
                continue
            first_seen = self._suspects.get(installation.id, now)
            if now - first_seen < self.grace:
                suspects[installation.id] = first_seen
                continue
            if await self._remove(installation):
                removed += 1
            else:
                suspects[installation.id] = first_seen
        self._suspects = suspects
        return removed

    async def _remove(self, installation) -> bool:
        """Remove one orphan under its lease, if it still is one; whether it was removed."""
        tenant_id, plugin_id = installation.tenant_id, installation.plugin_id
        lease = await self._guard.try_hold(tenant_id, plugin_id)
        if lease is None:
            return False  # being written: not an orphan now
        try:
            if await self._guard.holders(installation.plugin_unique_identifier):
                return False
            current = await self._persistence.get_installation_by_id(tenant_id, installation.id)
            if current is None or current.runtime_type != REMOTE or (
                current.plugin_unique_identifier != installation.plugin_unique_identifier
            ):
                return False
            await self._persistence.uninstall_plugin(tenant_id, installation.id)
        finally:
            await lease.release()
        self._invalidate(tenant_id, plugin_id)
        log.info(
            "removed debug plugin {identifier} of tenant {tenant_id}: no live replica has held it for {grace:g} s",
            identifier=installation.plugin_unique_identifier, tenant_id=tenant_id, grace=self.grace,
        )
        return True
