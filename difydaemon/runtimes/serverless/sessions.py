"""
The live serverless sessions (:class:`~difydaemon.interfaces.IServerlessSessions`).

A serverless plugin calls back into Dify over HTTP, naming its session in
the body; the Go daemon serves any session id it can find, without
authentication.  Here a transaction is served only for a session that is
live now (registered when its ``/invoke`` request went out, forgotten when
it ended), so the session id works as a capability that expires with the
session (``serverless.md`` §11.1).
"""

from __future__ import annotations

import attrs
from attrs import frozen
from twisted.internet.defer import succeed
from zope.interface import implementer

from difydaemon.interfaces import IServerlessSessions
from difydaemon.invocation.session import InvocationSession


@frozen
class ServerlessSession:
    """
    What a transaction needs to know of the session it belongs to: who
    asked, with which permissions, and the request that opened it (its
    ids and context are repeated in every answer).  JSON-friendly, so a
    shared implementation can store it.
    """

    tenant_id: str
    user_id: str
    plugin_id: str
    plugin_unique_identifier: str
    access_type: str
    declaration: dict
    session_request: dict

    @property
    def session_id(self) -> str:
        """The session's id."""
        return self.session_request["session_id"]

    @classmethod
    def of(cls, session: InvocationSession, plugin_unique_identifier: str) -> ServerlessSession:
        """The serverless session of an invocation session."""
        # positional, in field order: made on every serverless call, and
        # keywords cost an attrs __init__ of seven fields a third more
        return cls(
            session.tenant_id,
            session.user_id,
            session.plugin_id,
            plugin_unique_identifier,
            session.access_type,
            session.declaration,
            session.session_request,
        )

    def invocation_session(self, runtime) -> InvocationSession:
        """The invocation session whose answers ``runtime.send`` writes."""
        return InvocationSession(
            tenant_id=self.tenant_id,
            user_id=self.user_id,
            plugin_id=self.plugin_id,
            access_type=self.access_type,
            declaration=self.declaration,
            session_request=self.session_request,
            runtime=runtime,
        )

    def to_json(self) -> dict:
        """A JSON object of the session (for shared implementations)."""
        return attrs.asdict(self, recurse=False)

    @classmethod
    def from_json(cls, value: dict) -> ServerlessSession:
        """The session :meth:`to_json` gave."""
        return cls(**{field.name: value[field.name] for field in attrs.fields(cls)})


@implementer(IServerlessSessions)
class MemoryServerlessSessions:
    """
    The live sessions of this daemon, in memory; expiry is checked on lookup.

    :param reactor: gives the time.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._sessions: dict[str, tuple[ServerlessSession, float]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def register(self, session, ttl):
        if ttl <= 0:
            raise ValueError("ttl must be positive")
        self._sessions[session.session_id] = (session, self._reactor.seconds() + ttl)
        return succeed(None)

    def lookup(self, session_id):
        found = self._sessions.get(session_id)
        if found is None:
            return succeed(None)
        session, expires_at = found
        if self._reactor.seconds() >= expires_at:
            del self._sessions[session_id]
            return succeed(None)
        return succeed(session)

    def forget(self, session_id):
        self._sessions.pop(session_id, None)
        return succeed(None)
