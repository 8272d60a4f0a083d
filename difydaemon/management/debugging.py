"""
Remote debugging keys (``http-api.md`` §2.7, ``runtimes.md`` §2.1).

A tenant has one key, a uuid4 made the first time it is asked for and kept
in the database.  Each request for it moves its expiry to two hours from
then; using it in a handshake does not.  Handshakes check keys here: valid
keys are remembered with their expiry, so a busy debug port costs one
database lookup per handshake at most, and none for a key that cannot be
one (not a UUID) or that is known.
"""

from __future__ import annotations

import uuid

from twisted.internet.defer import Deferred, succeed

from difydaemon.packaging.identifier import is_uuid

DEFAULT_TTL = 7200.0


def new_debugging_key() -> str:
    """A fresh random key."""
    return str(uuid.uuid4())


class DebuggingKeys:
    """
    Hands out keys and resolves them to tenants.

    :param reactor: for the clock.
    :param persistence: an IPersistence.
    :param ttl: seconds a key stays valid after it was last asked for.
    :param new_key: makes a fresh key (tests pass a predictable one).
    """

    def __init__(self, reactor, persistence, ttl: float = DEFAULT_TTL, new_key=new_debugging_key) -> None:
        self._reactor = reactor
        self._persistence = persistence
        self.ttl = ttl
        self._new_key = new_key
        # key -> (tenant_id, expiry in reactor seconds); tenant -> its key
        self._known: dict[str, tuple[str, float]] = {}
        self._key_of: dict[str, str] = {}
        #: called with the tenant id when its key was made or extended here:
        #: the other replicas must read it again
        self.on_invalidate = None

    async def key_for(self, tenant_id: str) -> str:
        """The tenant's key (made if needed), valid for ``ttl`` more seconds."""
        record = await self._persistence.get_or_create_debugging_key(
            tenant_id, self._new_key(), self.ttl
        )
        self._remember(record)
        if self.on_invalidate is not None:
            self.on_invalidate(tenant_id)
        return record.key

    def forget(self, tenant_id: str) -> None:
        """Forget what is known of a tenant's key (another replica changed it)."""
        key = self._key_of.pop(tenant_id, None)
        if key is not None:
            self._known.pop(key, None)

    def clear(self) -> None:
        """Forget every key (invalidations may have been missed)."""
        self._known.clear()
        self._key_of.clear()

    def tenant_of(self, key: str) -> Deferred:
        """
        Deferred[str | None]: the tenant of an unexpired key.  Known keys
        answer from memory; anything that is not a UUID is refused without
        a lookup.
        """
        known = self._known.get(key)
        if known is not None:
            if known[1] > self._reactor.seconds():
                return succeed(known[0])
            self._forget(key)
        if not isinstance(key, str) or not is_uuid(key):
            return succeed(None)

        def found(record):
            if record is None:
                return None
            self._remember(record)
            return record.tenant_id

        return self._persistence.get_debugging_key(key).addCallback(found)

    def _remember(self, record) -> None:
        old = self._key_of.get(record.tenant_id)
        if old is not None and old != record.key:
            self._known.pop(old, None)
        self._key_of[record.tenant_id] = record.key
        self._known[record.key] = (record.tenant_id, record.expires_at.timestamp())

    def _forget(self, key: str) -> None:
        tenant_id, _ = self._known.pop(key)
        if self._key_of.get(tenant_id) == key:
            del self._key_of[tenant_id]
