"""
Sending bytes on a TCP connection in the turn they are written.

``transport.write`` only buffers: the reactor sends on its next turn, after
telling epoll twice that the socket has something to send (once to watch it
for writing, once to stop).  A whole request to a function, or the last
bytes of an answer to Dify, written to a connection with nothing waiting
would sit out that turn for nothing.
"""

from __future__ import annotations

from twisted.internet import tcp

# plain TCP only: a TLS connection's bytes must go through its TLS layer
_PLAIN_TCP = (tcp.Client, tcp.Server)


def write_now(transport, data: bytes) -> None:
    """
    Write ``data`` at once when nothing waits before it on a plain TCP
    connection; anything not sent then (a full socket buffer, an error, any
    other transport) goes the usual way, through ``write``, in order.
    """
    if (
        type(transport) in _PLAIN_TCP
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport.TLS
        and not transport._tempDataBuffer
        and len(transport.dataBuffer) == transport.offset
    ):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            data = data[sent:]
        if not data:
            return
    transport.write(data)
