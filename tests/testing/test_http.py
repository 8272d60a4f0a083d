"""The raw HTTP helpers of difydaemon.testing.http."""

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.http import RawHTTPClient, http_chunks, parse_response


class ChunkTests(SynchronousTestCase):
    """Reading chunked bodies and whole responses."""

    def test_chunks(self):
        """Each chunk is read, up to the last one; what follows it is ignored."""
        self.assertEqual(http_chunks(b"3\r\nabc\r\na\r\n0123456789\r\n0\r\n\r\nrest"), [b"abc", b"0123456789"])

    def test_partial_chunks(self):
        """A body cut anywhere gives the whole chunks before the cut."""
        body = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        for cut in range(len(body) + 1):
            whole = [b"abc"] if cut >= 8 else []
            if cut >= 15:
                whole.append(b"de")
            self.assertEqual(http_chunks(body[:cut]), whole, cut)

    def test_parse_response(self):
        """A sized and a chunked response give their status and body."""
        self.assertEqual(parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}"), (404, b"{}"))
        self.assertEqual(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"), (200, b"hi")
        )


class RawHTTPClientTests(SynchronousTestCase):
    """The raw client keeps every byte and tells when a marker arrives."""

    def test_until_and_closed(self):
        """until() fires once its marker has arrived, even across reads; closed fires on disconnection."""
        client = RawHTTPClient()
        client.makeConnection(StringTransport())
        waiting = client.until(b"first")
        client.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nfi")
        self.assertNoResult(waiting)
        client.dataReceived(b"rst")
        self.assertEqual(self.successResultOf(waiting), b"HTTP/1.1 200 OK\r\n\r\nfirst")
        self.assertEqual(self.successResultOf(client.until(b"OK")), client.received)
        self.assertNoResult(client.closed)
        client.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(client.closed)
