"""Tests for difydaemon.runtimes.serverless.sessions: the live serverless sessions."""

from __future__ import annotations

import attrs
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from difydaemon.interfaces import IServerlessSessions
from difydaemon.invocation.session import InvocationSession
from difydaemon.runtimes.serverless.sessions import MemoryServerlessSessions, ServerlessSession
from difydaemon.testing.cases import SynchronousTestCase
from tests.persistence.contract import contract


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
    """
    What every IServerlessSessions does.  The case provides
    ``self.sessions``, ``self.ttl`` (seconds, long enough for a few round
    trips), ``self.run_check(coroutine)`` and ``await self.wait(seconds)``.
    """

    @contract
    async def test_interface(self):
        """The implementation provides IServerlessSessions."""
        self.assertTrue(verifyObject(IServerlessSessions, self.sessions))

    @contract
    async def test_register_lookup_forget(self):
        """A registered session is found by its id until it is forgotten."""
        self.assertIsNone(await self.sessions.lookup("s-1"))
        await self.sessions.register(session(), self.ttl)
        self.assertEqual(await self.sessions.lookup("s-1"), session())
        self.assertIsNone(await self.sessions.lookup("s-2"))
        await self.sessions.forget("s-1")
        self.assertIsNone(await self.sessions.lookup("s-1"))
        await self.sessions.forget("s-1")

    @contract
    async def test_sessions_apart(self):
        """Two sessions are registered and forgotten apart."""
        await self.sessions.register(session("s-1"), self.ttl)
        await self.sessions.register(session("s-2"), self.ttl)
        await self.sessions.forget("s-1")
        self.assertIsNone(await self.sessions.lookup("s-1"))
        self.assertEqual(await self.sessions.lookup("s-2"), session("s-2"))

    @contract
    async def test_expiry(self):
        """A session not forgotten is gone after its ttl."""
        await self.sessions.register(session(), self.ttl)
        await self.wait(self.ttl * 0.1)
        self.assertIsNotNone(await self.sessions.lookup("s-1"))
        await self.wait(self.ttl)
        self.assertIsNone(await self.sessions.lookup("s-1"))

    @contract
    async def test_bad_ttl(self):
        """A ttl that is not positive is refused before anything is stored."""
        with self.assertRaises(ValueError):
            self.sessions.register(session(), 0)
        self.assertIsNone(await self.sessions.lookup("s-1"))

    @contract
    async def test_odd_ids(self):
        """An empty or absurdly long session id names no session, and forgetting it is no error."""
        self.assertIsNone(await self.sessions.lookup(""))
        self.assertIsNone(await self.sessions.lookup("s" * 100_000))
        await self.sessions.forget("s" * 100_000)


class MemoryServerlessSessionsTests(ServerlessSessionsContract, SynchronousTestCase):
    """The in-memory implementation."""

    ttl = 60

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.sessions = MemoryServerlessSessions(self.clock)

    def run_check(self, check):
        self.successResultOfCoroutine(check)

    async def wait(self, seconds):
        self.clock.advance(seconds)


class ServerlessSessionTests(SynchronousTestCase):
    """The session value."""

    def test_json_round_trip(self):
        """A session survives its JSON form (what a shared implementation stores)."""
        self.assertEqual(ServerlessSession.from_json(session().to_json()), session())

    def test_of_an_invocation_session(self):
        """A session made from a dispatch request carries each field where it belongs, in both value objects."""
        runtime = type("Runtime", (), {"declaration": session().declaration})()
        request = dict(session().session_request, data={"user_id": "u", "type": "tool"})
        invocation = InvocationSession.of("t", "acme/echo", request, runtime)
        self.assertEqual(
            (invocation.tenant_id, invocation.user_id, invocation.plugin_id, invocation.access_type,
             invocation.declaration, invocation.session_request, invocation.runtime),
            ("t", "u", "acme/echo", "tool", session().declaration, request, runtime),
        )
        self.assertEqual(
            ServerlessSession.of(invocation, session().plugin_unique_identifier),
            attrs.evolve(session(), session_request=request),
        )
