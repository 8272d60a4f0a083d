"""Tests for difydaemon.immediate_write: bytes sent in the turn they are written."""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport

from difydaemon.immediate_write import write_now
from difydaemon.testing.cases import SynchronousTestCase


class _Reactor:
    """Records which descriptors the connection asks to be watched for writing."""

    def __init__(self):
        self.writers = set()

    def addReader(self, reader):
        pass

    def removeReader(self, reader):
        pass

    def addWriter(self, writer):
        self.writers.add(writer)

    def removeWriter(self, writer):
        self.writers.discard(writer)


class WriteNowTests(SynchronousTestCase):
    """A plain TCP connection with nothing waiting sends at once; anything else is written as usual."""

    def setUp(self):
        ours, self.peer = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(self.peer.close)
        self.peer.settimeout(5)
        self.reactor = _Reactor()
        self.transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), None, 1, self.reactor)
        self.transport.repstr = "<server>"  # set by a real listening port

    def test_sent_in_this_turn(self):
        """With nothing buffered, the bytes reach the peer without the reactor watching the socket."""
        write_now(self.transport, b"answer")
        self.assertEqual(self.peer.recv(100), b"answer")
        self.assertEqual(len(self.reactor.writers), 0)

    def test_behind_buffered_bytes_keeps_order(self):
        """Bytes already waiting in the transport's buffer go first: the new ones wait behind them."""
        self.transport.write(b"first ")
        write_now(self.transport, b"second")
        self.assertIn(self.transport, self.reactor.writers)
        self.peer.setblocking(False)
        self.assertRaises(BlockingIOError, self.peer.recv, 100)
        self.transport.doWrite()
        self.peer.setblocking(True)
        self.assertEqual(self.peer.recv(100), b"first second")

    def test_other_transports_write_as_usual(self):
        """A transport that is not plain TCP (here a StringTransport) gets an ordinary write."""
        transport = StringTransport()
        write_now(transport, b"answer")
        self.assertEqual(transport.value(), b"answer")
