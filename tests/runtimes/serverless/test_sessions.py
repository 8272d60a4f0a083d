"""Tests for difydaemon.runtimes.serverless.sessions: the live serverless sessions."""

from __future__ import annotations

from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from difydaemon.interfaces import IServerlessSessions
from difydaemon.runtimes.serverless.sessions import MemoryServerlessSessions, ServerlessSession
from difydaemon.testing.cases import SynchronousTestCase


def session(session_id: str = "s-1") -> ServerlessSession:
    return ServerlessSession(
        tenant_id="t",
        user_id="u",
        plugin_id="acme/echo",
        plugin_unique_identifier="acme/echo:0.0.1@" + "a" * 64,
        access_type="tool",
        declaration={"resource": {"permission": {"storage": {"enabled": True, "size": 1024}}}},
        session_request={"session_id": session_id, "context": None, "event": "request", "data": {}},
    )


class ServerlessSessionsContract:
    """What every IServerlessSessions does; ``self.sessions`` and ``self.advance(seconds)`` come from the case."""

    def lookup(self, session_id):
        return self.successResultOf(self.sessions.lookup(session_id))

    def test_interface(self):
        """The implementation provides IServerlessSessions."""
        self.assertTrue(verifyObject(IServerlessSessions, self.sessions))

    def test_register_lookup_forget(self):
        """A registered session is found by its id until it is forgotten."""
        self.assertIsNone(self.lookup("s-1"))
        self.successResultOf(self.sessions.register(session(), 60))
        self.assertEqual(self.lookup("s-1"), session())
        self.assertIsNone(self.lookup("s-2"))
        self.successResultOf(self.sessions.forget("s-1"))
        self.assertIsNone(self.lookup("s-1"))
        self.successResultOf(self.sessions.forget("s-1"))

    def test_expiry(self):
        """A session not forgotten is gone after its ttl."""
        self.successResultOf(self.sessions.register(session(), 60))
        self.advance(59)
        self.assertIsNotNone(self.lookup("s-1"))
        self.advance(1)
        self.assertIsNone(self.lookup("s-1"))


class MemoryServerlessSessionsTests(ServerlessSessionsContract, SynchronousTestCase):
    """The in-memory implementation."""

    def setUp(self):
        self.clock = Clock()
        self.sessions = MemoryServerlessSessions(self.clock)

    def advance(self, seconds):
        self.clock.advance(seconds)


class ServerlessSessionTests(SynchronousTestCase):
    """The session value."""

    def test_json_round_trip(self):
        """A session survives its JSON form (what a shared implementation stores)."""
        self.assertEqual(ServerlessSession.from_json(session().to_json()), session())
