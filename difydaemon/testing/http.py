"""An HTTP client for real-reactor tests that leaves the reactor clean."""

from __future__ import annotations

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool


def http_client(test, reactor) -> HTTPClient:
    """
    A treq client whose connections close after each response, so a trial
    test ends with no open sockets.  ``test`` gets a cleanup that closes
    whatever is still cached.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    test.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))
