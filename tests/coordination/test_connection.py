"""
The Redis connection's wire bits and states with fakes: StringTransport for
the bytes, MemoryReactorClock for timeouts and retries.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from difydaemon.coordination.redis.connection import CommandProtocol, ConnectionSettings, RedisConnection
from difydaemon.errors import CoordinationUnavailableError
from difydaemon.testing.cases import SynchronousTestCase


def command(*args) -> bytes:
    """A command as RESP bytes."""
    out = b"*%d\r\n" % len(args)
    for arg in args:
        data = str(arg).encode()
        out += b"$%d\r\n%s\r\n" % (len(data), data)
    return out


class FakeEndpoint:
    """Connects to StringTransports, or fails while ``refuse`` is set."""

    def __init__(self) -> None:
        self.refuse = False
        self.connections: list = []

    def connect(self, factory):
        if self.refuse:
            return fail(ConnectionRefusedError("test refusal"))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)


class HandshakeTests(SynchronousTestCase):
    """What a connection says first, and when it gives up on a reply."""

    def connect(self, **settings):
        self.clock = MemoryReactorClock()
        protocol = CommandProtocol(self.clock, ConnectionSettings(**settings))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_auth_select_ping(self):
        """With a user, a password and a database the connection sends AUTH user pass, SELECT db, PING, each after the last reply."""
        protocol, transport = self.connect(username="alice", password="secret", db=2)
        self.assertEqual(transport.value(), command("AUTH", "alice", "secret"))
        transport.clear()
        protocol.dataReceived(b"+OK\r\n")
        self.assertEqual(transport.value(), command("SELECT", 2))
        transport.clear()
        protocol.dataReceived(b"+OK\r\n")
        self.assertEqual(transport.value(), command("PING"))
        self.assertNoResult(protocol.ready)
        protocol.dataReceived(b"+PONG\r\n")
        self.assertIs(self.successResultOf(protocol.ready), protocol)

    def test_password_only(self):
        """Without a user AUTH carries the password alone; without a database no SELECT is sent."""
        protocol, transport = self.connect(password="secret")
        self.assertEqual(transport.value(), command("AUTH", "secret"))
        transport.clear()
        protocol.dataReceived(b"+OK\r\n")
        self.assertEqual(transport.value(), command("PING"))

    def test_refused_password(self):
        """A refused AUTH fails the handshake with a message that names the step, not the password, and drops the connection."""
        protocol, transport = self.connect(username="alice", password="secret")
        protocol.dataReceived(b"-WRONGPASS invalid username-password pair or user is disabled.\r\n")
        error = self.failureResultOf(protocol.ready, CoordinationUnavailableError).value
        self.assertTrue(error.reason.startswith("could not authenticate: WRONGPASS"), error.reason)
        self.assertNotIn("secret", error.message)
        self.assertTrue(transport.disconnecting)

    def test_replica_refused(self):
        """Behind Sentinel a server whose ROLE is not master is refused."""
        protocol, transport = self.connect(require_master=True)
        self.assertEqual(transport.value(), command("ROLE"))
        protocol.dataReceived(b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:10\r\n")
        self.clock.advance(0)
        error = self.failureResultOf(protocol.ready, CoordinationUnavailableError).value
        self.assertIn("not a master", error.reason)
        self.assertTrue(transport.disconnecting)

    def test_master_accepted(self):
        """Behind Sentinel a master is accepted."""
        protocol, transport = self.connect(require_master=True)
        protocol.dataReceived(b"*3\r\n$6\r\nmaster\r\n:0\r\n*0\r\n")
        self.clock.advance(0)
        self.assertIs(self.successResultOf(protocol.ready), protocol)

    def test_no_reply(self):
        """A server that does not answer within the reply timeout fails the handshake with 'no reply' and is dropped."""
        protocol, transport = self.connect(reply_timeout=2.0)
        self.clock.advance(1.9)
        self.assertNoResult(protocol.ready)
        self.clock.advance(0.1)
        error = self.failureResultOf(protocol.ready, CoordinationUnavailableError).value
        self.assertIn("no reply", error.reason)
        self.assertTrue(transport.disconnecting)

    def test_reply_split_everywhere(self):
        """A reply arriving a byte at a time is read as one."""
        protocol, transport = self.connect()
        for byte in b"+PONG\r\n":
            protocol.dataReceived(bytes([byte]))
        self.successResultOf(protocol.ready)
        d = protocol.execute_command("GET", "k")
        reply = b'$13\r\n{"a":[1,"b"]}\r\n'
        for byte in reply:
            protocol.dataReceived(bytes([byte]))
            self.clock.advance(0)
        self.assertEqual(self.successResultOf(d), '{"a":[1,"b"]}')


class RedisConnectionTests(SynchronousTestCase):
    """Lazy connecting, failing fast while down, reconnecting with a backoff."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.endpoint = FakeEndpoint()
        self.connection = RedisConnection(
            self.clock,
            self.endpoint,
            ConnectionSettings(password="secret", reply_timeout=5.0),
            max_retry_delay=2.0,
            jitter=lambda: 0.0,
        )
        self.addCleanup(self.connection.close)

    def execute(self, *args):
        """One command through the connection, as a Deferred."""
        return Deferred.fromCoroutine(self.connection.execute(*args))

    def answer(self, *lines: bytes):
        """Feed the latest connection its server's replies."""
        protocol, _ = self.endpoint.connections[-1]
        for line in lines:
            protocol.dataReceived(line)
            # txredisapi reads what follows a bulk reply on the next turn
            self.clock.advance(0)

    def test_lazy(self):
        """Nothing connects until the first command."""
        self.assertEqual((self.endpoint.connections, self.clock.getDelayedCalls()), ([], []))
        d = self.execute("GET", "k")
        self.assertEqual(len(self.endpoint.connections), 1)
        self.assertNoResult(d)
        self.answer(b"+OK\r\n", b"+PONG\r\n")
        _, transport = self.endpoint.connections[-1]
        self.assertTrue(transport.value().endswith(command("GET", "k")))
        self.answer(b"$-1\r\n")
        self.assertIsNone(self.successResultOf(d))

    def test_first_attempt_refused_then_fail_fast(self):
        """A refused first attempt fails the waiting command; later commands fail at once until a retry connects."""
        self.endpoint.refuse = True
        error = self.failureResultOf(self.execute("PING"), CoordinationUnavailableError).value
        self.assertIn("could not connect", error.reason)
        self.failureResultOf(self.execute("PING"), CoordinationUnavailableError)
        self.endpoint.refuse = False
        self.clock.advance(2.0)
        self.answer(b"+OK\r\n", b"+PONG\r\n")
        d = self.execute("PING")
        self.answer(b"+PONG\r\n")
        self.assertEqual(self.successResultOf(d), "PONG")

    def test_lost_connection(self):
        """A lost connection fails its pending command and every later one at once, until it is back."""
        d0 = self.execute("PING")
        self.answer(b"+OK\r\n", b"+PONG\r\n", b"+PONG\r\n")
        self.successResultOf(d0)
        pending = self.execute("GET", "k")
        protocol, _ = self.endpoint.connections[-1]
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIn("connection lost", self.failureResultOf(pending, CoordinationUnavailableError).value.reason)
        error = self.failureResultOf(self.execute("GET", "k"), CoordinationUnavailableError).value
        self.assertIn("connection lost", error.reason)
        self.assertFalse(self.connection.usable)
        self.clock.advance(2.0)
        self.answer(b"+OK\r\n", b"+PONG\r\n")
        self.assertTrue(self.connection.usable)

    def test_refused_handshakes_back_off(self):
        """Connections refused at the handshake (a wrong password) are retried further and further apart, up to the cap."""
        d = self.execute("PING")
        delays = []
        for _ in range(6):
            self.answer(b"-WRONGPASS invalid username-password pair\r\n")
            protocol, _ = self.endpoint.connections[-1]
            protocol.connectionLost(Failure(ConnectionDone()))
            calls = self.clock.getDelayedCalls()
            self.assertEqual(len(calls), 1)
            delays.append(calls[0].getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.failureResultOf(d, CoordinationUnavailableError)
        self.assertEqual([round(delay, 6) for delay in delays], [0.2, 0.4, 0.8, 1.6, 2.0, 2.0])

    def test_close(self):
        """After close every command fails at once and nothing reconnects."""
        d = self.execute("PING")
        self.answer(b"+OK\r\n", b"+PONG\r\n", b"+PONG\r\n")
        self.successResultOf(d)
        self.connection.close()
        error = self.failureResultOf(self.execute("PING"), CoordinationUnavailableError).value
        self.assertEqual(error.reason, "the connection is closed")
