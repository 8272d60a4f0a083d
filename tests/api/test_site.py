"""
The daemon's Site: the cap on open connections (``SERVER_MAX_CONNECTIONS``),
on both HTTP stacks.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from difydaemon.api import site as site_module
from difydaemon.api.admission import FrontDoor
from difydaemon.api.dispatch_channel import DispatchGate
from difydaemon.api.site import DaemonSite
from difydaemon.testing.cases import SynchronousTestCase

ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


class Leaf(Resource):
    """Answers "ok" to everything."""

    isLeaf = True

    def render(self, request):
        return b"ok"


def site(lean: bool, cap: int | None) -> DaemonSite:
    """A site with the dispatch channel (lean) or twisted.web only, capped at ``cap`` connections."""
    gate = DispatchGate(object(), Leaf()) if lean else None
    return DaemonSite(Leaf(), reactor=MemoryReactorClock(), gate=gate, front_door=FrontDoor(b"k"),
                      max_connections=cap)


def connect(built):
    transport = StringTransport()
    built.makeConnection(transport)
    return transport


class ConnectionCapTests(SynchronousTestCase):
    """Over the cap a new connection gets no protocol (the port closes it at once); a closed one frees a place."""

    def test_cap(self):
        """With a cap of 2, the third connection is refused until one of the two closes, on both stacks."""
        for lean in (True, False):
            daemon = site(lean, 2)
            first = daemon.buildProtocol(ADDRESS)
            connect(first)
            second = daemon.buildProtocol(ADDRESS)
            connect(second)
            self.assertEqual(daemon.open_connections, 2)
            self.assertIsNone(daemon.buildProtocol(ADDRESS), lean)
            self.assertIsNone(daemon.buildProtocol(ADDRESS), lean)
            first.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(daemon.open_connections, 1)
            third = daemon.buildProtocol(ADDRESS)
            self.assertIsNotNone(third, lean)
            connect(third)
            self.assertIsNone(daemon.buildProtocol(ADDRESS), lean)

    def test_handed_over_and_lent_connections_count_once(self):
        """A connection handed over to twisted.web, or lent for a request, is still one connection."""
        daemon = site(True, 5)
        protocol = daemon.buildProtocol(ADDRESS)
        transport = connect(protocol)
        protocol.dataReceived(b"GET /a HTTP/1.1\r\n\r\n")
        self.assertTrue(transport.value().endswith(b"ok"))
        protocol.dataReceived(b"POST /b HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        self.assertIsNotNone(protocol._inner)
        self.assertEqual(daemon.open_connections, 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(daemon.open_connections, 0)

    def test_no_cap(self):
        """Without a cap, connections are only counted."""
        daemon = site(True, None)
        for _ in range(10):
            connect(daemon.buildProtocol(ADDRESS))
        self.assertEqual(daemon.open_connections, 10)

    def test_logged_once_per_flood(self):
        """Refusals are logged once while the cap is reached, again after a place was freed."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        daemon = site(False, 1)
        only = daemon.buildProtocol(ADDRESS)
        connect(only)
        for _ in range(3):
            daemon.buildProtocol(ADDRESS)
        only.connectionLost(Failure(ConnectionDone()))
        connect(daemon.buildProtocol(ADDRESS))
        daemon.buildProtocol(ADDRESS)
        refusals = [e for e in events if e.get("log_namespace") == site_module.__name__
                    and "refusing connections" in e.get("log_format", "")]
        self.assertEqual(len(refusals), 2)
