"""
The live serverless sessions shared by replicas, in the coordination
layer's key-value store (:class:`~difydaemon.interfaces.IServerlessSessions`).

A serverless function calls back to whatever ``DIFY_PLUGIN_DAEMON_URL``
reaches, usually a load balancer: the transaction of a session opened by
replica A may land on replica B.  Each session is therefore one key
``serverless-session:<id>`` of the store (on Redis:
``<REDIS_KEY_PREFIX>:difydaemon:kv:serverless-session:<id>``) holding the
session's JSON, expiring with the session's lifetime so that a replica
killed mid-call leaves nothing behind for long (Go: CBOR under
``session_info:<id>``, 30 min).

While Redis is down every method fails at once with
:class:`~difydaemon.errors.CoordinationUnavailableError`: a transaction
answers that error rather than waiting, and a dispatch cannot register its
session (it fails before calling the function, whose callbacks could not be
served anyway).
"""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.logger import Logger
from zope.interface import implementer

from difydaemon.interfaces import IServerlessSessions
from difydaemon.runtimes.serverless.sessions import ServerlessSession

log = Logger()

#: The store's key of a session is this followed by the session id.
KEY_PREFIX = "serverless-session:"
#: Session ids are uuid4 (36 characters); a longer "id" from a body is not
#: looked up (nobody's key, and no reason to send megabytes to Redis).
MAX_SESSION_ID_LENGTH = 128


def session_key(session_id: str) -> str:
    """The store's key of a session."""
    return KEY_PREFIX + session_id


@implementer(IServerlessSessions)
class SharedServerlessSessions:
    """
    The live sessions in an IKeyValueStore (Redis for replicas; in memory
    it behaves like :class:`~difydaemon.runtimes.serverless.sessions.MemoryServerlessSessions`).

    :param kv: the IKeyValueStore.
    """

    def __init__(self, kv) -> None:
        self._kv = kv

    def register(self, session, ttl):
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        return self._kv.set(session_key(session.session_id), session.to_json(), ttl)

    def lookup(self, session_id):
        if not session_id or len(session_id) > MAX_SESSION_ID_LENGTH:
            return succeed(None)
        return self._kv.get(session_key(session_id)).addCallback(_session_of)

    def forget(self, session_id):
        if not session_id or len(session_id) > MAX_SESSION_ID_LENGTH:
            return succeed(None)
        return self._kv.delete(session_key(session_id)).addCallback(lambda _: None)


def _session_of(value):
    """The session a stored value holds; None (logged) for one that is not a session."""
    if value is None:
        return None
    try:
        return ServerlessSession.from_json(value)
    except (TypeError, KeyError) as e:
        log.warn("a stored serverless session is not one ({problem}); ignoring it", problem=repr(e))
        return None
