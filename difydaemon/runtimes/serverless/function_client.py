"""
The HTTP client of every ``/invoke`` call: one pool of kept-alive
connections to the daemon's functions, a request written in one ``send``
and a response read by :class:`~.http1.ResponseDecoder`.

It offers the one call of a treq client the invoke client makes
(``post(url, data, headers, unbuffered)``), answering a response with
``code``, ``phrase``, ``headers.getRawHeaders`` and ``deliverBody``, so
:class:`~.invoke.InvokeClient` runs on it or on ``StubTreq`` alike.

A connection goes back to the pool only when its response ended cleanly
and may carry another request; a body cut short by its reader (a deadline,
an oversized line, a caller leaving) closes it.  Its sockets set
``TCP_NODELAY`` and, on Linux, re-arm ``TCP_QUICKACK`` at every read: the
SDK writes each event and its blank line as two chunks, and a delayed ACK
of the first holds the second back by about 40 ms on a kept-alive
connection.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from difydaemon.immediate_write import write_now
from difydaemon.runtimes.serverless.http1 import (
    MalformedResponse,
    ResponseDecoder,
    ResponseEnd,
    ResponseHead,
    encode_post_from,
    post_line,
)

log = Logger()

#: seconds to open a connection to a function
CONNECT_TIMEOUT = 5.0
#: seconds an idle kept-alive connection stays usable (Go's 120 s would
#: outlive the idle timeouts of most function hosts; a stale connection
#: costs one retry)
IDLE_CONNECTION_TIMEOUT = 60.0
#: idle connections kept per function host at most (the Agent's default of
#: 2 would reopen a connection for most calls past two in flight)
MAX_IDLE_PER_HOST = 64
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
#: how a read that ends a chunked response ends (the SDK's events hold no
#: CR): after it the function sends nothing until the next request, which
#: carries the ACK, so the re-arm (a system call) is skipped for it
_LAST_CHUNK = b"\r\n0\r\n\r\n"
#: how every complete body ends: one Failure for all (a Failure costs more
#: to build than the rest of a response's end; readers only look at it)
_BODY_DONE = Failure(ResponseDone("Response body fully received"))


class ResponseHeaders:
    """The headers of a response, read as twisted.web's ``Headers`` are."""

    __slots__ = ("_head",)

    def __init__(self, head: ResponseHead) -> None:
        self._head = head

    def getRawHeaders(self, name: bytes, default=None):
        """Every value of ``name`` (any case), or ``default``."""
        values = self._head.values(name.lower())
        return values or default


class _BodyTransport:
    """What a body reader sees as its transport: hanging up closes the connection."""

    __slots__ = ("_connection",)

    def __init__(self, connection: FunctionConnection) -> None:
        self._connection = connection

    def loseConnection(self) -> None:
        self._connection.body_abandoned()

    abortConnection = loseConnection


class FunctionResponse:
    """
    One response, as the invoke client reads it (a subset of ``IResponse``).

    Body bytes arriving before :meth:`deliverBody` are kept for it.
    """

    __slots__ = ("code", "phrase", "headers", "_connection", "_reader", "_pending", "_end")

    def __init__(self, head: ResponseHead, connection: FunctionConnection) -> None:
        self.code = head.code
        self.phrase = head.phrase
        self.headers = ResponseHeaders(head)
        self._connection = connection
        self._reader = None
        self._pending: list[bytes] = []
        self._end: Failure | None = None

    def deliverBody(self, protocol) -> None:
        """Hand the body to ``protocol``: ``dataReceived`` then ``connectionLost(ResponseDone)``."""
        if self._reader is not None:
            raise RuntimeError("the body of a response is delivered once")
        self._reader = protocol
        protocol.makeConnection(_BodyTransport(self._connection))
        pending, self._pending = self._pending, []
        for data in pending:
            if self._reader is None:
                return
            protocol.dataReceived(data)
        if self._end is not None and self._reader is not None:
            end, self._end = self._end, None
            self._reader = None
            protocol.connectionLost(end)

    def body_data(self, data: bytes) -> None:
        if self._reader is None:
            if self._end is None:
                self._pending.append(data)
            return
        self._reader.dataReceived(data)

    def body_end(self, reason: Failure) -> None:
        reader, self._reader = self._reader, None
        if reader is None:
            self._end = reason
            return
        reader.connectionLost(reason)


class FunctionConnection(Protocol):
    """
    One connection to a function, carrying one request at a time.

    :param pool: told when the connection is free again or gone.
    :param key: the pool's key of the connection's host.
    """

    def __init__(self, pool: FunctionHTTPClient, key: tuple) -> None:
        self._pool = pool
        self.key = key
        self._decoder: ResponseDecoder | None = None
        self._waiting: Deferred | None = None
        self._response: FunctionResponse | None = None
        self.idle_since = 0.0
        self._gone = False
        self._lost: list[Deferred] = []
        # the socket whose delayed ACKs are turned off at every read (None: not TCP, or not Linux)
        self._socket = None

    def connectionMade(self) -> None:
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)
        handle = getattr(self.transport, "getHandle", None)
        if _TCP_QUICKACK is not None and handle is not None:
            # looked up once: the re-arm runs at every read of every call
            self._socket = handle()
        self._quick_ack()

    def _quick_ack(self) -> None:
        sock = self._socket
        if sock is None:
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except (OSError, AttributeError):
            pass

    def request(self, data: bytes) -> Deferred:
        """Send a whole request; Deferred[FunctionResponse] at its head (cancelling closes the connection)."""
        self._decoder = ResponseDecoder()
        self._response = None
        self._waiting = waiting = Deferred(self._cancel_waiting)
        write_now(self.transport, data)
        return waiting

    def _cancel_waiting(self, waiting: Deferred) -> None:
        if self._waiting is waiting:
            self._waiting = None
        self._hang_up()

    def dataReceived(self, data: bytes) -> None:
        if not data.endswith(_LAST_CHUNK):
            self._quick_ack()
        decoder = self._decoder
        if decoder is None or decoder.done:
            # nothing was asked: a function talking out of turn is not reused
            self._hang_up()
            return
        try:
            events = decoder.feed(data)
        except MalformedResponse as exc:
            self._fail(Failure(exc))
            return
        for event in events:
            kind = type(event)
            if kind is bytes:
                if self._response is not None:
                    self._response.body_data(event)
            elif kind is ResponseHead:
                self._response = FunctionResponse(event, self)
                waiting, self._waiting = self._waiting, None
                if waiting is not None:
                    waiting.callback(self._response)
            elif kind is ResponseEnd:
                self._ended(event.reusable and not decoder.extra)
                return
            if self._gone or self._decoder is not decoder:
                return  # a reader hung up

    def _ended(self, reusable: bool) -> None:
        response, self._response = self._response, None
        self._decoder = None
        if not reusable:
            self.transport.loseConnection()
        else:
            self._pool.release(self)
        if response is not None:
            response.body_end(_BODY_DONE)

    def body_abandoned(self) -> None:
        """The body's reader stopped early: the rest is not read, the connection not reused."""
        self._response = None
        self._hang_up()

    def _hang_up(self) -> None:
        self._decoder = None
        if not self._gone:
            self.transport.abortConnection()

    def _fail(self, reason: Failure) -> None:
        waiting, self._waiting = self._waiting, None
        response, self._response = self._response, None
        self._decoder = None
        if not self._gone:
            self.transport.abortConnection()
        if waiting is not None:
            waiting.errback(reason)
        if response is not None:
            response.body_end(reason)

    def connectionLost(self, reason: Failure = None) -> None:
        self._gone = True
        self._pool.forget(self)
        decoder = self._decoder
        if decoder is not None and self._response is not None:
            try:
                events = decoder.connection_lost()
            except MalformedResponse:
                events = None
            if events:
                for event in events:
                    if type(event) is ResponseEnd:
                        response, self._response = self._response, None
                        self._decoder = None
                        response.body_end(_BODY_DONE)
        lost = reason if reason is not None and not reason.check(ConnectionDone) else Failure(
            ConnectionLost("the function closed the connection")
        )
        self._fail(lost)
        waiters, self._lost = self._lost, []
        for waiter in waiters:
            waiter.callback(None)

    def when_lost(self) -> Deferred:
        """Fires when the connection is closed."""
        if self._gone:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._lost.append(waiter)
        return waiter


class _ConnectionFactory(Factory):
    def __init__(self, pool: FunctionHTTPClient, key: tuple) -> None:
        self._pool = pool
        self._key = key

    def buildProtocol(self, addr):
        return FunctionConnection(self._pool, self._key)


class _Target:
    """A URL's pool key, its checked request line and ``Host`` header, and its endpoint."""

    __slots__ = ("key", "line", "endpoint")

    def __init__(self, key, line, endpoint) -> None:
        self.key, self.line, self.endpoint = key, line, endpoint


class FunctionHTTPClient:
    """
    The pool of connections to functions, and the ``post`` the invoke client calls.

    :param reactor: connects and gives the time.
    :param connect_timeout: seconds to open a connection.
    :param idle_timeout: seconds an idle connection stays usable.
    :param max_idle_per_host: idle connections kept per host.
    :param endpoint_for: ``(scheme, host, port)`` -> the client endpoint to
        connect with (tests); TCP or TLS with ``connect_timeout`` by default.
    """

    persistent = True

    def __init__(self, reactor, connect_timeout: float = CONNECT_TIMEOUT,
                 idle_timeout: float = IDLE_CONNECTION_TIMEOUT, max_idle_per_host: int = MAX_IDLE_PER_HOST,
                 endpoint_for=None) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._endpoint_for = endpoint_for or self._network_endpoint
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle_per_host
        self._idle: dict[tuple, list[FunctionConnection]] = {}
        # a function's URL and action make a handful of distinct targets
        self._targets: dict[str, _Target] = {}

    def post(self, url: str, data: bytes, headers: dict, unbuffered: bool = True) -> Deferred:
        """POST ``data`` to ``url``: Deferred[FunctionResponse] at the response's head."""
        try:
            target = self._target(url)
            request = encode_post_from(target.line, [(name, values[0]) for name, values in headers.items()], data)
        except ValueError as exc:
            return _failed(exc)
        connection = self._checkout(target.key)
        if connection is not None:
            return connection.request(request)
        connecting = target.endpoint.connect(_ConnectionFactory(self, target.key))
        return connecting.addCallback(lambda connection: connection.request(request))

    def _target(self, url: str) -> _Target:
        found = self._targets.get(url)
        if found is not None:
            return found
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        host_header = host if ":" not in host else f"[{host}]"
        if port != default:
            host_header += f":{port}"
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        key = (parts.scheme, host, port)
        found = _Target(key, post_line(host_header.encode("idna"), target.encode("ascii")), self._endpoint_for(*key))
        if len(self._targets) > 1024:
            self._targets.clear()
        self._targets[url] = found
        return found

    def _network_endpoint(self, scheme: str, host: str, port: int):
        endpoint = HostnameEndpoint(self._reactor, host.encode("idna"), port, timeout=self._connect_timeout)
        if scheme == "https":
            from twisted.internet.endpoints import wrapClientTLS
            from twisted.internet.ssl import optionsForClientTLS

            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint

    def _checkout(self, key: tuple) -> FunctionConnection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        stale_before = self._reactor.seconds() - self._idle_timeout
        while idle:
            connection = idle.pop()
            if connection.idle_since > stale_before:
                return connection
            connection.transport.loseConnection()
        return None

    def release(self, connection: FunctionConnection) -> None:
        """A connection is free again: kept for the next call, or closed when the pool is full."""
        idle = self._idle.setdefault(connection.key, [])
        now = self._reactor.seconds()
        # the longest idle are at the front: close those gone stale
        while idle and idle[0].idle_since <= now - self._idle_timeout:
            idle.pop(0).transport.loseConnection()
        if len(idle) >= self._max_idle:
            connection.transport.loseConnection()
            return
        connection.idle_since = now
        idle.append(connection)

    def forget(self, connection: FunctionConnection) -> None:
        """A connection is gone."""
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def idle_connections(self) -> int:
        """How many connections wait in the pool."""
        return sum(len(idle) for idle in self._idle.values())

    def closeCachedConnections(self) -> Deferred:
        """Close every idle connection (at shutdown); fires once they are closed."""
        waiting = []
        for idle in list(self._idle.values()):
            for connection in list(idle):
                waiting.append(connection.when_lost())
                connection.transport.loseConnection()
        self._idle.clear()
        return DeferredList(waiting).addCallback(lambda _: None)


def _failed(exc: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(Failure(exc))
    return d


def function_http_client(reactor, connect_timeout: float = CONNECT_TIMEOUT):
    """The one client of every ``/invoke`` call, and its pool (closed at shutdown): the same object."""
    client = FunctionHTTPClient(reactor, connect_timeout)
    return client, client
