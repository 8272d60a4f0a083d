"""
The table of absurd requests of tests/api/test_absurd_input.py through the
whole daemon, over real sockets, on the embedded SQLite database and on
the real PostgreSQL (a fresh database per test, dropped afterwards): the
integers a route binds must fit their SQL parameters, and a NUL, which
PostgreSQL refuses in a query, must never reach it.
"""

from __future__ import annotations

import secrets

import orjson
import psycopg2
from psycopg2.extensions import parse_dsn
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from txpostgres import txpostgres

from tests.api.test_absurd_input import absurd_cases, request_bytes, wrong_answer
from tests.persistence.test_postgres import postgres_dsn
from tests.test_end_to_end import DaemonCase
from tests.test_tap import KEY


class _Exchange(Protocol):
    """Sends one request and keeps every byte until the server closes."""

    def __init__(self, request: bytes) -> None:
        self._request = request
        self._received: list[bytes] = []
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        self._received.append(data)

    def connectionLost(self, reason) -> None:
        self.done.callback(b"".join(self._received))


def parse_response(raw: bytes) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response, its body sized or chunked."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"\r\ntransfer-encoding: chunked" not in head.lower():
        return status, body
    parts = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return status, b"".join(parts)
        parts.append(body[:size])
        body = body[size + 2:]


class AbsurdInputMixin:
    """The table through a started daemon; ``start()`` picks the database."""

    async def start(self) -> None:
        raise NotImplementedError

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """(status, body) of one request on its own connection."""
        protocol = _Exchange(request)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), protocol)
        return parse_response(await protocol.done)

    async def test_every_case(self):
        """Every absurd request gets its route's 400 / -400 or not-found answer, never an internal error."""
        await self.start()
        wrong = []
        for case in absurd_cases():
            status, body = await self.exchange(request_bytes(case, KEY))
            wrong.append(wrong_answer(case, status, body))
        self.assertEqual([w for w in wrong if w is not None], [])
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_dispatch_tenant_with_nul(self):
        """A dispatch to a tenant with a NUL is 404 'plugin not found', not a failed database lookup."""
        await self.start()
        body = orjson.dumps({"user_id": "u", "data": {"provider": "p", "tool": "t", "tool_parameters": {}}})
        status, answer = await self.exchange(
            b"POST /plugin/a%00b/dispatch/tool/invoke HTTP/1.1\r\nHost: d\r\nX-Api-Key: " + KEY.encode()
            + b"\r\nX-Plugin-ID: acme/echo\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        self.assertEqual(status, 404, answer)
        self.assertEqual(orjson.loads(orjson.loads(answer)["message"])["error_type"], "PluginNotFoundError")
        self.assertEqual(self.flushLoggedErrors(), [])


class SQLiteAbsurdInputTests(AbsurdInputMixin, DaemonCase):
    """The daemon on its embedded SQLite database."""

    async def start(self) -> None:
        await self._start()


class PostgresAbsurdInputTests(AbsurdInputMixin, DaemonCase):
    """The daemon on the real PostgreSQL, in a database of its own."""

    async def start(self) -> None:
        name = "difydaemon_absurd_" + secrets.token_hex(6)
        dsn = parse_dsn(postgres_dsn())
        admin = txpostgres.Connection(reactor=reactor)
        try:
            await admin.connect(**dict(dsn, dbname="postgres"))
        except psycopg2.OperationalError as e:
            self.fail(f"PostgreSQL at {postgres_dsn()!r} is not reachable ({e}); this test is required")
        self.addCleanup(admin.close)
        await admin.runOperation(f"CREATE DATABASE {name}")
        self.addCleanup(admin.runOperation, f"DROP DATABASE {name} WITH (FORCE)")
        await self._start(
            DB_TYPE="postgresql",
            DB_HOST=dsn.get("host", "127.0.0.1"),
            DB_PORT=dsn.get("port", "5432"),
            DB_USERNAME=dsn.get("user", "postgres"),
            DB_PASSWORD=dsn.get("password", ""),
            DB_DATABASE=name,
        )
