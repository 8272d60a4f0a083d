"""Tests for difydaemon.runtimes.serverless.function_client: the pool of kept-alive connections to functions."""

from __future__ import annotations

from unittest import SkipTest

from twisted.internet.defer import CancelledError, succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.server import Site

from difydaemon.http_body import BodyLost, BodyStream, StopReading
from difydaemon.runtimes.serverless import function_client
from difydaemon.runtimes.serverless.function_client import FunctionHTTPClient, function_http_client
from difydaemon.runtimes.serverless.http1 import MalformedResponse
from difydaemon.runtimes.serverless.invoke import InvokeClient
from difydaemon.runtimes.serverless.response import Chunk, Failed, Finished
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from tests.runtimes.serverless.functions import FakeFunction, Reply

URL = "http://fn.example:9000/invoke?action=invoke_tool"
HEADERS = {b"Content-Type": [b"application/json"], b"Dify-Plugin-Session-ID": [b"s-1"]}
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
SID = "0e8d1f9a-1111-4222-8333-444455556666"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def session_line(kind: str, data: bytes) -> bytes:
    return b'{"event":"session","session_id":"%s","data":{"type":"%s","data":%s}}\n' % (SID.encode(), kind.encode(), data)


class _RecordingSocket:
    """A socket that records the options set on it."""

    def __init__(self, options):
        self._options = options

    def setsockopt(self, level, option, value):
        self._options.append((level, option, value))


class _Endpoint:
    """Connects at once over a StringTransport; remembers every connection."""

    def __init__(self):
        self.connections = []

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return succeed(protocol)


class _Connections:
    """The endpoints the client asked for, and what was written on them."""

    def __init__(self):
        self.endpoints = {}

    def __call__(self, scheme, host, port):
        return self.endpoints.setdefault((scheme, host, port), _Endpoint())

    @property
    def all(self):
        return [c for endpoint in self.endpoints.values() for c in endpoint.connections]

    def lose(self, index, reason=None):
        protocol, transport = self.all[index]
        protocol.connectionLost(Failure(reason or ConnectionDone()))


class FunctionHTTPClientTests(SynchronousTestCase):
    """One request at a time per connection; a connection reused only when its response ended cleanly."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.net = _Connections()
        self.client = FunctionHTTPClient(self.clock, endpoint_for=self.net, idle_timeout=60.0, max_idle_per_host=2)

    def respond(self, index, data):
        protocol, _ = self.net.all[index]
        protocol.dataReceived(data)

    def read(self, response):
        pieces = []
        reader = BodyStream(pieces.append)
        response.deliverBody(reader)
        return pieces, reader

    def test_request_and_response(self):
        """The request goes out in one write; the response's status, headers and body come back."""
        d = self.client.post(URL, b"{}", HEADERS)
        protocol, transport = self.net.all[0]
        self.assertEqual(
            transport.value(),
            b"POST /invoke?action=invoke_tool HTTP/1.1\r\nHost: fn.example:9000\r\nContent-Type: application/json\r\n"
            b"Dify-Plugin-Session-ID: s-1\r\nContent-Length: 2\r\n\r\n{}",
        )
        self.assertEqual(list(self.net.endpoints), [("http", "fn.example", 9000)])
        self.assertNoResult(d)
        self.respond(0, b"HTTP/1.1 201 Made\r\nX-Amzn-RequestId: r-1\r\n" + CHUNKED_HEAD[17:] + chunk(b"a"))
        response = self.successResultOf(d)
        self.assertEqual((response.code, response.phrase), (201, b"Made"))
        self.assertEqual(response.headers.getRawHeaders(b"X-Amzn-RequestId"), [b"r-1"])
        self.assertIsNone(response.headers.getRawHeaders(b"x-amzn-errortype"))
        pieces, reader = self.read(response)
        self.respond(0, chunk(b"b") + b"0\r\n\r\n")
        self.assertEqual(pieces, [b"a", b"b"])
        self.successResultOf(reader.done)

    def test_delayed_acks_off_until_the_last_read(self):
        """Every read re-arms TCP_QUICKACK except the one that ends a chunked response (the next request carries its ACK)."""
        if function_client._TCP_QUICKACK is None:
            raise SkipTest("TCP_QUICKACK is Linux's")
        d = self.client.post(URL, b"{}", HEADERS)
        protocol, _ = self.net.all[0]
        armed = []
        protocol._socket = _RecordingSocket(armed)
        self.respond(0, CHUNKED_HEAD + chunk(b"a"))
        pieces, reader = self.read(self.successResultOf(d))
        self.respond(0, chunk(b"\n\n"))
        self.assertEqual(len(armed), 2)
        self.respond(0, chunk(b"b") + b"0\r\n\r\n")
        self.assertEqual(len(armed), 2)
        self.successResultOf(reader.done)
        self.assertEqual(pieces, [b"a", b"\n\n", b"b"])

    def test_connection_reused(self):
        """A connection whose response ended cleanly carries the next request: one connection for many calls."""
        for _ in range(3):
            d = self.client.post(URL, b"{}", HEADERS)
            self.respond(0, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            pieces, reader = self.read(self.successResultOf(d))
            self.successResultOf(reader.done)
            self.assertEqual(pieces, [b"ok"])
        self.assertEqual(len(self.net.all), 1)
        self.assertEqual(self.client.idle_connections(), 1)

    def test_concurrent_calls_open_connections(self):
        """Calls in flight together each get a connection; only ``max_idle_per_host`` stay afterwards."""
        calls = [self.client.post(URL, b"{}", HEADERS) for _ in range(3)]
        self.assertEqual(len(self.net.all), 3)
        for index, d in enumerate(calls):
            self.respond(index, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            self.read(self.successResultOf(d))
        self.assertEqual(self.client.idle_connections(), 2)
        self.assertTrue(self.net.all[2][1].disconnecting)

    def test_connection_close_not_reused(self):
        """A response saying ``Connection: close`` closes its connection; the next call opens another."""
        d = self.client.post(URL, b"{}", HEADERS)
        self.respond(0, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.read(self.successResultOf(d))
        self.assertTrue(self.net.all[0][1].disconnecting)
        self.client.post(URL, b"{}", HEADERS)
        self.assertEqual(len(self.net.all), 2)

    def test_reader_stops_early(self):
        """A body reader that stops reading closes the connection, which is not reused."""
        d = self.client.post(URL, b"{}", HEADERS)
        self.respond(0, CHUNKED_HEAD)

        def sink(data):
            raise StopReading()

        reader = BodyStream(sink)
        self.successResultOf(d).deliverBody(reader)
        self.respond(0, chunk(b"x"))
        self.successResultOf(reader.done)
        self.assertTrue(self.net.all[0][1].disconnected)
        self.respond(0, chunk(b"late"))  # ignored
        self.net.lose(0)
        self.assertEqual(self.client.idle_connections(), 0)
        self.client.post(URL, b"{}", HEADERS)
        self.assertEqual(len(self.net.all), 2)

    def test_lost_before_head(self):
        """A connection lost before the response's head fails the call with the transport error."""
        d = self.client.post(URL, b"{}", HEADERS)
        self.net.lose(0, ConnectionLost("reset"))
        self.assertTrue(self.failureResultOf(d).check(ConnectionLost))

    def test_lost_mid_body(self):
        """A connection lost in the middle of a body fails its reader with BodyLost."""
        d = self.client.post(URL, b"{}", HEADERS)
        self.respond(0, CHUNKED_HEAD + chunk(b"part"))
        pieces, reader = self.read(self.successResultOf(d))
        self.net.lose(0)
        self.assertEqual(pieces, [b"part"])
        self.assertTrue(self.failureResultOf(reader.done).check(BodyLost))
        self.assertEqual(self.client.idle_connections(), 0)

    def test_body_until_close(self):
        """A body with no length ends when the connection closes, as a whole body."""
        d = self.client.post(URL, b"{}", HEADERS)
        self.respond(0, b"HTTP/1.1 200 OK\r\n\r\nall of it")
        pieces, reader = self.read(self.successResultOf(d))
        self.net.lose(0)
        self.successResultOf(reader.done)
        self.assertEqual(pieces, [b"all of it"])

    def test_body_before_reader(self):
        """Body bytes and the end that arrive before the reader is given are handed to it then."""
        d = self.client.post(URL, b"{}", HEADERS)
        response = []
        d.addCallback(response.append)
        self.respond(0, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        pieces, reader = self.read(response[0])
        self.assertEqual(pieces, [b"abc"])
        self.successResultOf(reader.done)

    def test_cancel_before_head(self):
        """Cancelling a call before its head closes the connection; the later loss is harmless."""
        d = self.client.post(URL, b"{}", HEADERS)
        d.cancel()
        self.assertTrue(self.failureResultOf(d).check(CancelledError))
        self.assertTrue(self.net.all[0][1].disconnected)
        self.net.lose(0)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_malformed_response(self):
        """A response that is not HTTP fails the call and closes the connection."""
        d = self.client.post(URL, b"{}", HEADERS)
        self.respond(0, b"SSH-2.0-OpenSSH\r\n\r\n")
        self.assertTrue(self.failureResultOf(d).check(MalformedResponse))
        self.assertTrue(self.net.all[0][1].disconnected)

    def test_unasked_bytes_close(self):
        """An idle connection that receives bytes is closed and leaves the pool."""
        d = self.client.post(URL, b"{}", HEADERS)
        self.respond(0, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.read(self.successResultOf(d))
        self.respond(0, b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(self.net.all[0][1].disconnected)
        self.net.lose(0)
        self.assertEqual(self.client.idle_connections(), 0)

    def test_stale_connection_not_reused(self):
        """A connection idle past the idle timeout is closed instead of reused."""
        d = self.client.post(URL, b"{}", HEADERS)
        self.respond(0, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.read(self.successResultOf(d))
        self.clock.advance(61)
        self.client.post(URL, b"{}", HEADERS)
        self.assertTrue(self.net.all[0][1].disconnecting)
        self.assertEqual(len(self.net.all), 2)

    def test_bad_header_refused(self):
        """A header value that would smuggle a header fails the call before connecting."""
        d = self.client.post(URL, b"{}", {b"Dify-Plugin-Session-ID": [b"x\r\nEvil: 1"]})
        self.assertTrue(self.failureResultOf(d).check(ValueError))
        self.assertEqual(self.net.all, [])

    def test_close_cached_connections(self):
        """Shutdown closes the idle connections and fires once they are gone."""
        client, pool = function_http_client(self.clock)
        self.assertIs(client, pool)
        d = self.client.post(URL, b"{}", HEADERS)
        self.respond(0, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.read(self.successResultOf(d))
        closed = self.client.closeCachedConnections()
        self.assertTrue(self.net.all[0][1].disconnecting)
        self.assertNoResult(closed)
        self.net.lose(0)
        self.successResultOf(closed)
        self.assertEqual(self.client.idle_connections(), 0)


class InvokeOverPoolTests(SynchronousTestCase):
    """The invoke client on the pool: what the SDK sends becomes outcomes, and the connection is reused."""

    def test_session_then_reuse(self):
        """A session's chunks and end are relayed; the body's rest is drained and the connection reused."""
        clock = MemoryReactorClock()
        net = _Connections()
        client = InvokeClient(clock, FunctionHTTPClient(clock, endpoint_for=net))
        for round_ in range(2):
            outcomes = []
            d = client.invoke("http://fn.example/", "invoke_tool", SID, {"session_id": SID}, outcomes.append)
            protocol, _ = net.all[0]
            protocol.dataReceived(
                CHUNKED_HEAD + chunk(session_line("stream", b'{"n":1}')) + chunk(b"\n")
                + chunk(session_line("end", b"null"))
            )
            self.assertEqual([type(o) for o in outcomes], [Chunk, Finished])
            protocol.dataReceived(chunk(b"\n") + b"0\r\n\r\n")
            self.successResultOf(d)
        self.assertEqual(len(net.all), 1)

    def test_lost_mid_stream(self):
        """A function dying mid-stream fails the session with the inner error, once."""
        clock = MemoryReactorClock()
        net = _Connections()
        client = InvokeClient(clock, FunctionHTTPClient(clock, endpoint_for=net))
        outcomes = []
        d = client.invoke("http://fn.example/", "invoke_tool", SID, {"session_id": SID}, outcomes.append)
        net.all[0][0].dataReceived(CHUNKED_HEAD + chunk(session_line("stream", b'{"n":1}')))
        net.lose(0, ConnectionLost("killed"))
        self.successResultOf(d)
        self.assertEqual([type(o) for o in outcomes], [Chunk, Failed])
        self.assertIn("failed to read response body", outcomes[1].message)



class _CountingSite(Site):
    """A Site that counts the connections it served."""

    connections = 0

    def buildProtocol(self, addr):
        self.connections += 1
        return super().buildProtocol(addr)


class LoopbackTests(AsyncTestCase):
    """The pool against a real HTTP server on loopback."""

    async def test_requests_reuse_one_connection(self):
        """Sequential calls to a real server go over one kept-alive connection, each request sent at once."""
        from twisted.internet import reactor

        function = FakeFunction([Reply(body=[session_line("end", b"null")])])
        site = _CountingSite(function)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = FunctionHTTPClient(reactor)
        self.addCleanup(client.closeCachedConnections)
        key = ("http", "127.0.0.1", port.getHost().port)
        url = f"http://127.0.0.1:{key[2]}/invoke?action=invoke_tool"
        for call in range(3):
            idle = list(client._idle.get(key, []))
            d = client.post(url, b'{"a":1}', HEADERS)
            if call:
                # sent in this turn: nothing left for the reactor to write
                self.assertEqual(len(idle), 1)
                self.assertNotIn(idle[0].transport, reactor.getWriters())
            response = await d
            pieces = []
            reader = BodyStream(pieces.append)
            response.deliverBody(reader)
            await reader.done
            self.assertEqual((response.code, b"".join(pieces)), (200, session_line("end", b"null")))
        self.assertEqual([request[3] for request in function.requests], [b'{"a":1}'] * 3)
        self.assertEqual((site.connections, client.idle_connections()), (1, 1))
