"""
:class:`ConnectionPool`: database connections opened on demand and replaced
when they break.

txpostgres' own pool opens a fixed set of connections once and never
replaces one: after a database restart it lends dead connections forever.
This pool knows nothing of the driver.  It opens a connection when a caller
needs one and none is idle, lends each connection to one caller at a time,
and closes every connection it is told is broken, so that the next caller
gets a fresh one.  While the database is down, a failed connect fails every
caller waiting for a connection at once instead of letting each one wait
for its own connect to fail.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.logger import Logger

log = Logger()


class PoolClosedError(Exception):
    """The pool has been closed; it lends nothing any more."""


class ConnectionPool:
    """
    At most ``size`` connections, opened when needed.

    :param reactor: gives the time (connection ages).
    :param open_connection: ``() -> Deferred[connection]`` (or a
        connection); its failure is the caller's.
    :param close_connection: ``(connection) -> None``; must not raise.
    :param size: connections open at most (idle and lent together).
    :param max_idle: idle connections kept; more are closed when returned.
    :param max_lifetime: seconds after which a connection is closed instead
        of being lent again; 0 for no limit.
    """

    def __init__(
        self, reactor, open_connection, close_connection, size: int, max_idle: int | None = None,
        max_lifetime: float = 0,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self._reactor = reactor
        self._open_connection = open_connection
        self._close_connection = close_connection
        self.size = size
        self.max_idle = size if max_idle is None else max(0, max_idle)
        self.max_lifetime = max_lifetime
        self._idle: list = []
        self._opened_at: dict = {}
        self._waiting: deque = deque()
        #: connections open or being opened, idle and lent
        self.open_count = 0
        self.closed = False

    @property
    def idle_count(self) -> int:
        """Connections open and not lent."""
        return len(self._idle)

    @property
    def waiting_count(self) -> int:
        """Callers waiting for a connection."""
        return len(self._waiting)

    def _expired(self, connection) -> bool:
        if not self.max_lifetime:
            return False
        opened = self._opened_at.get(connection)
        return opened is not None and self._reactor.seconds() - opened >= self.max_lifetime

    def acquire(self) -> Deferred:
        """
        Deferred[connection]: an idle one, a new one, or the next one
        returned.  Give it back with :meth:`release`, exactly once.
        """
        if self.closed:
            return fail(PoolClosedError("the connection pool is closed"))
        while self._idle:
            connection = self._idle.pop()
            if not self._expired(connection):
                return succeed(connection)
            self._drop(connection)
        if self.open_count < self.size:
            return self._open()
        waiter = Deferred()
        self._waiting.append(waiter)
        return waiter

    def _open(self) -> Deferred:
        self.open_count += 1
        d = maybeDeferred(self._open_connection)

        def opened(connection):
            self._opened_at[connection] = self._reactor.seconds()
            if self.closed:
                # closed while connecting: nobody may use it
                self._drop(connection)
                raise PoolClosedError("the connection pool is closed")
            return connection

        def failed(failure):
            self.open_count -= 1
            # The database is most likely unreachable: everyone waiting
            # learns it now rather than after a connect of their own.
            while self._waiting:
                self._waiting.popleft().errback(failure)
            return failure

        return d.addCallbacks(opened, failed)

    def release(self, connection, reusable: bool = True) -> None:
        """
        Take ``connection`` back.  A connection that is not ``reusable``
        (it broke, or its state is unknown) is closed and a caller waiting
        gets a new one.
        """
        if not reusable or self.closed or self._expired(connection):
            self._drop(connection)
            if self._waiting and not self.closed:
                self._open().chainDeferred(self._waiting.popleft())
            return
        if self._waiting:
            self._waiting.popleft().callback(connection)
            return
        if len(self._idle) >= self.max_idle:
            self._drop(connection)
            return
        self._idle.append(connection)

    def lost(self, connection) -> None:
        """
        ``connection`` was found dead while idle (the server closed it):
        close it now, so that nobody is lent it.
        """
        if connection in self._idle:
            self._idle.remove(connection)
            self._drop(connection)

    def discard_idle(self) -> int:
        """
        Close every idle connection (one was found broken: the others most
        likely died with it).  Returns how many were closed.
        """
        idle, self._idle = self._idle, []
        for connection in idle:
            self._drop(connection)
        return len(idle)

    def _drop(self, connection) -> None:
        self.open_count -= 1
        self._opened_at.pop(connection, None)
        try:
            self._close_connection(connection)
        except Exception:
            log.failure("closing a database connection failed")

    def close(self) -> None:
        """
        Close idle connections now and lent ones when they come back; fail
        every waiting caller and every later :meth:`acquire`.
        """
        self.closed = True
        self.discard_idle()
        while self._waiting:
            self._waiting.popleft().errback(PoolClosedError("the connection pool is closed"))
