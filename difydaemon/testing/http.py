"""
HTTP for tests: a treq client for real-reactor tests that leaves the
reactor clean, a raw client that sees every byte as it arrives, and a
reader of chunked bodies.
"""

from __future__ import annotations

from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site


def http_client(test, reactor) -> HTTPClient:
    """
    A treq client whose connections close after each response, so a trial
    test ends with no open sockets.  ``test`` gets a cleanup that closes
    whatever is still cached.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    test.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


def http_chunks(body: bytes) -> list[bytes]:
    """
    The chunks of a chunked HTTP/1.1 body, up to its last chunk or to the
    last whole chunk received so far.
    """
    chunks = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0 or len(rest) < size + 2:
            break
        chunks.append(rest[:size])
        body = rest[size + 2:]
    return chunks


def parse_response(raw: bytes) -> tuple[int, bytes]:
    """(status, body) of one whole HTTP/1.1 response, its body sized or chunked."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"\r\ntransfer-encoding: chunked" in head.lower():
        body = b"".join(http_chunks(body))
    return status, body


class RawHTTPClient(Protocol):
    """
    One client connection that writes what it is given and keeps every
    byte it receives, for tests that look at the exact bytes and at when
    they come.

    :ivar received: every byte received so far.
    :ivar closed: fires (with None) once the connection is closed.
    """

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred = Deferred()
        self._waiters: list = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        waiting, self._waiters = self._waiters, []
        for marker, waiter in waiting:
            if marker in self.received:
                waiter.callback(self.received)
            else:
                self._waiters.append((marker, waiter))

    def connectionLost(self, reason) -> None:
        self.closed.callback(None)

    def until(self, marker: bytes) -> Deferred:
        """Fires with everything received once ``marker`` has been received."""
        waiter: Deferred = Deferred()
        if marker in self.received:
            waiter.callback(self.received)
        else:
            self._waiters.append((marker, waiter))
        return waiter


class LoopbackServing:
    """
    A fake HTTP server's real ports: :meth:`listen` serves ``self.resource()``
    on ``self.reactor`` (no form parsing, no access log), :meth:`stop`
    closes every port and aborts open connections (the "server is down" case).
    """

    def listen(self, port: int = 0, interface: str = "127.0.0.1") -> Deferred:
        """Serve on ``interface:port`` (0: any free port). Deferred[IListeningPort]."""
        from difydaemon.testing.openai import _ConnectionTrackingFactory

        site = Site(self.resource(), parsePOSTFormSubmission=False)
        site.log = lambda request: None
        factory = _ConnectionTrackingFactory(site)
        d = TCP4ServerEndpoint(self.reactor, port, interface=interface).listen(factory)

        def listening(listening_port):
            self.__dict__.setdefault("_listening", []).append((listening_port, factory))
            return listening_port

        return d.addCallback(listening)

    def stop(self) -> Deferred:
        """Stop every port :meth:`listen` opened and abort their connections; fires when all are closed."""
        listening, self._listening = self.__dict__.get("_listening", []), []
        waits = []
        for port, factory in listening:
            waits.append(maybeDeferred(port.stopListening))
            waits.append(factory.close_all())
        return DeferredList(waits, fireOnOneErrback=True, consumeErrors=True).addCallback(lambda _: None)
