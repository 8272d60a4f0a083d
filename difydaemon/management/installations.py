"""
A cache of installations in front of the database, for the dispatch hot path.

Dispatch resolves ``(tenant_id, X-Plugin-ID)`` to an installation on every
call; the Go daemon caches that row in Redis for 30 minutes.  Here the cache
lives in the process and is invalidated by every install, upgrade and
uninstall: those made here at once, those made through another replica when
its message arrives (``on_invalidate`` publishes ours), with a TTL as a
safety net.
"""

from __future__ import annotations

from twisted.internet.defer import succeed


class InstallationCache:
    """
    ``get(tenant_id, plugin_id)`` with a per-entry time to live.

    :param reactor: for the clock.
    :param persistence: an IPersistence.
    :param ttl: seconds an entry (found or not found) is trusted.
    :param capacity: entries kept at most; the oldest go first.
    """

    def __init__(self, reactor, persistence, ttl: float = 1800.0, capacity: int = 10000) -> None:
        self._reactor = reactor
        self._persistence = persistence
        self._ttl = ttl
        self._capacity = capacity
        self._entries: dict = {}
        # bumped by forget(), so that a query running meanwhile is not cached
        self._versions: dict = {}
        #: called with ``(tenant_id, plugin_id)`` by :meth:`invalidate`: the
        #: other replicas must forget the entry too
        self.on_invalidate = None
        # bumped by clear()
        self._generation = 0

    def get(self, tenant_id: str, plugin_id: str):
        """Deferred[Installation | None], from memory when fresh."""
        key = (tenant_id, plugin_id)
        entry = self._entries.get(key)
        now = self._reactor.seconds()
        if entry is not None and entry[0] > now:
            return succeed(entry[1])
        version = self._versions.get(key, 0)
        generation = self._generation

        def remember(installation):
            if self._versions.get(key, 0) == version and self._generation == generation:
                if key not in self._entries and len(self._entries) >= self._capacity:
                    self._entries.pop(next(iter(self._entries)))
                self._entries[key] = (now + self._ttl, installation)
            return installation

        return self._persistence.get_installation(tenant_id, plugin_id).addCallback(remember)

    def invalidate(self, tenant_id: str, plugin_id: str) -> None:
        """One tenant's plugin changed here: forget it, and have every replica forget it."""
        self.forget(tenant_id, plugin_id)
        if self.on_invalidate is not None:
            self.on_invalidate(tenant_id, plugin_id)

    def forget(self, tenant_id: str, plugin_id: str) -> None:
        """Forget what is known of one tenant's plugin (in this process only)."""
        key = (tenant_id, plugin_id)
        self._entries.pop(key, None)
        self._versions[key] = self._versions.get(key, 0) + 1

    def clear(self) -> None:
        """Forget everything (invalidations may have been missed)."""
        self._entries.clear()
        # nor is a query running now cached
        self._generation += 1
