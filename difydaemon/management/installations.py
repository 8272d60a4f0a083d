"""
A cache of installations in front of the database, for the dispatch hot path.

Dispatch resolves ``(tenant_id, X-Plugin-ID)`` to an installation on every
call; the Go daemon caches that row in Redis for 30 minutes.  Here the cache
lives in the process and is invalidated by every install, upgrade and
uninstall (which all go through this process), with a TTL as a safety net.
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
        # bumped by invalidate(), so that a query running meanwhile is not cached
        self._versions: dict = {}

    def get(self, tenant_id: str, plugin_id: str):
        """Deferred[Installation | None], from memory when fresh."""
        key = (tenant_id, plugin_id)
        entry = self._entries.get(key)
        now = self._reactor.seconds()
        if entry is not None and entry[0] > now:
            return succeed(entry[1])
        version = self._versions.get(key, 0)

        def remember(installation):
            if self._versions.get(key, 0) == version:
                if key not in self._entries and len(self._entries) >= self._capacity:
                    self._entries.pop(next(iter(self._entries)))
                self._entries[key] = (now + self._ttl, installation)
            return installation

        return self._persistence.get_installation(tenant_id, plugin_id).addCallback(remember)

    def invalidate(self, tenant_id: str, plugin_id: str) -> None:
        """Forget what is known of one tenant's plugin."""
        key = (tenant_id, plugin_id)
        self._entries.pop(key, None)
        self._versions[key] = self._versions.get(key, 0) + 1
