"""
The table of absurd requests of tests/api/test_absurd_input.py through the
whole daemon, over real sockets, on the embedded SQLite database and on
the real PostgreSQL (a fresh database per test, dropped afterwards): the
integers a route binds must fit their SQL parameters, and a NUL, which
PostgreSQL refuses in a query, must never reach it.
"""

from __future__ import annotations

import attrs
import orjson
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from difydaemon.api.admission import MAX_REQUEST_LINE, URI_TOO_LONG
from difydaemon.testing.http import RawHTTPClient, parse_response
from tests.api.test_absurd_input import absurd_cases, request_bytes, wrong_answer
from tests.daemon_postgres import fresh_database
from tests.test_end_to_end import DaemonCase
from tests.test_tap import KEY


class AbsurdInputMixin:
    """The table through a started daemon; ``start()`` picks the database."""

    async def start(self) -> None:
        raise NotImplementedError

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """(status, body) of one request on its own connection."""
        client = RawHTTPClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        client.transport.write(request)
        await client.closed
        return parse_response(client.received)

    async def test_every_case(self):
        """Every absurd request gets its route's 400 / -400 or not-found answer, never an internal error."""
        await self.start()
        wrong = []
        for case in absurd_cases():
            if len(f"{case.method} {case.path} HTTP/1.1") > MAX_REQUEST_LINE:
                # over a socket the front door refuses such a head before any route
                case = attrs.evolve(case, status=414, code=None, body_is=URI_TOO_LONG.body)
            status, body = await self.exchange(request_bytes(case, KEY))
            wrong.append(wrong_answer(case, status, body))
        self.assertEqual([w for w in wrong if w is not None], [])
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_dispatch_tenant_with_nul(self):
        """A dispatch to a tenant with a NUL is a bad request target, not a failed database lookup."""
        await self.start()
        body = orjson.dumps({"user_id": "u", "data": {"provider": "p", "tool": "t", "tool_parameters": {}}})
        status, answer = await self.exchange(
            b"POST /plugin/a%00b/dispatch/tool/invoke HTTP/1.1\r\nHost: d\r\nX-Api-Key: " + KEY.encode()
            + b"\r\nX-Plugin-ID: acme/echo\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        self.assertEqual(status, 400, answer)
        self.assertEqual(orjson.loads(orjson.loads(answer)["message"])["error_type"], "PluginDaemonBadRequestError")
        self.assertEqual(self.flushLoggedErrors(), [])


class SQLiteAbsurdInputTests(AbsurdInputMixin, DaemonCase):
    """The daemon on its embedded SQLite database."""

    async def start(self) -> None:
        await self._start()


class PostgresAbsurdInputTests(AbsurdInputMixin, DaemonCase):
    """The daemon on the real PostgreSQL, in a database of its own."""

    async def start(self) -> None:
        await self._start(**await fresh_database(self, "difydaemon_absurd_"))
