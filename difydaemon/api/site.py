"""The daemon's twisted.web Site."""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web.server import Site

from difydaemon.api.admission import FrontDoor
from difydaemon.api.dispatch_channel import DateCache, DispatchChannel, DispatchGate
from difydaemon.api.web_channel import DaemonHTTPChannel, DaemonRequest
from difydaemon.observability.metrics import http_method, web_endpoint

#: one event per answered request (``difydaemon.api.access``)
access_log = Logger(namespace="difydaemon.api.access")

log = Logger()


class DaemonSite(Site):
    """
    A Site tuned for the dispatch path, behind the front door.

    - every request passes the ``front_door``
      (:mod:`difydaemon.api.admission`) once its head is read: canonical
      target, ``X-Api-Key``, body bound, head size and deadline;
    - with a ``gate``, connections start on a
      :class:`~difydaemon.api.dispatch_channel.DispatchChannel`, which serves
      dispatch requests itself and lends the connection to this Site's own
      twisted.web channel for any other request;
    - that channel is twisted.web's ``HTTPChannel`` itself (as a
      :class:`~difydaemon.api.web_channel.DaemonHTTPChannel`), not the
      wrapper that can switch to HTTP/2: the daemon serves no TLS, and so no
      ALPN that could ask for HTTP/2;
    - POST bodies are not parsed as forms (that costs every request; the two
      upload routes parse their multipart bodies themselves, in a thread);
    - every request is counted in the metrics and, but for dispatch calls,
      logged as an event (see :meth:`log`);
    - accepted connections run with ``TCP_NODELAY``: SSE items are small
      writes spaced by the plugin's pace, and Nagle's algorithm would hold
      each one back until the previous one is acknowledged, which a peer
      delays by up to ~40 ms;
    - with ``max_connections``, a connection accepted while that many are
      open is closed at once (``SERVER_MAX_CONNECTIONS``): a flood of idle
      connections costs a file descriptor each, and without a cap it ends
      with the daemon unable to accept Dify's, or to open a file.

    :param front_door: the checks made on every request head; None admits
        every request as plain twisted.web does.
    :param gate: the dispatch path's counter and resource; None serves
        every request through twisted.web.
    :param before_body: what twisted.web's channels ask before reading a
        body (:attr:`~difydaemon.api.web_channel.DaemonHTTPChannel.before_body`).
    :param max_connections: open connections at most; None for no cap.

    :ivar open_connections: connections open now.
    :param metrics: the :class:`~difydaemon.observability.metrics.DaemonMetrics`
        counting each request answered through twisted.web, or None.
    :param tracing: the :class:`~difydaemon.observability.otel.Tracing`
        giving each request a server span (``ENABLE_OTEL``), or None.
    """

    protocol = DaemonHTTPChannel
    requestFactory = DaemonRequest

    def __init__(
        self,
        resource,
        reactor=None,
        log_health: bool = True,
        gate: DispatchGate | None = None,
        front_door: FrontDoor | None = None,
        before_body=None,
        max_connections: int | None = None,
        metrics=None,
        tracing=None,
    ) -> None:
        super().__init__(resource, parsePOSTFormSubmission=False, reactor=reactor)
        if gate is not None and front_door is None:
            raise ValueError("the dispatch channel needs a front door")
        self.displayTracebacks = False
        self._log_health = log_health
        self._gate = gate
        self._front_door = front_door
        self._dates = DateCache()
        self._before_body = before_body
        self._max_connections = max_connections
        self.open_connections = 0
        self._full = False
        self._metrics = metrics
        #: read by each request as it starts (:class:`DaemonRequest`)
        self.tracing = tracing

    def date(self) -> bytes:
        """The ``Date`` header's value now."""
        return self._dates.at(self.reactor.seconds())

    def log(self, request) -> None:
        """
        Count the request in the metrics; then log it as an event (not
        dispatch calls: formatting one costs about 120 us of CPU, a third of
        what a whole dispatch may cost; ``/health/check`` only with
        ``HEALTH_API_LOG_ENABLED``).  The fields are plain values, so a JSON
        log (``LOG_OUTPUT_FORMAT=json``) can be queried by them; the query
        string is left out: it may hold what a log should not.
        """
        path = request.path
        received_at = getattr(request, "received_at", None)
        seconds = 0.0 if received_at is None else self.reactor.seconds() - received_at
        method = request.method.decode("ascii", "replace")
        metrics = self._metrics
        span = getattr(request, "span", None)
        if metrics is not None or span is not None:
            # the client picks the method and the path: only bounded labels
            # may reach the counts and the spans (the span takes the label
            # counted, "other" past MAX_ENDPOINTS, not the path itself)
            label = http_method(request.method)
            endpoint = web_endpoint(path, request.code)
            if metrics is not None:
                endpoint = metrics.http_request(label, endpoint, request.code, seconds)
            if span is not None:
                span.end_request(label, endpoint, request.code)
        if b"/dispatch/" in path:
            return
        if path == b"/health/check" and not self._log_health:
            return
        client = request.getClientAddress()
        access_log.info(
            "{method} {path} {status} {duration_ms:.1f} ms",
            method=method,
            path=path.decode("utf-8", "replace"),
            status=request.code,
            duration_ms=seconds * 1e3,
            client=getattr(client, "host", None),
        )
        # not Site.log as well: it would write a second, combined-log line
        # for the same request through the legacy log

    def buildProtocol(self, addr):
        if self._max_connections is not None and self.open_connections >= self._max_connections:
            # the listening port closes the socket when given no protocol
            if not self._full:
                # once per flood, not once per connection refused
                self._full = True
                log.warn("refusing connections: {count} open, the most allowed (SERVER_MAX_CONNECTIONS); "
                         "first refused: {peer}", peer=str(addr), count=self.open_connections)
            return None
        if self._gate is None:
            channel = self.build_web_protocol(addr)
        else:
            channel = DispatchChannel(
                self._front_door, self._gate, lambda: self.build_web_protocol(addr), self.reactor, self.timeOut,
                self._dates,
            )
            channel.factory = self
        self.open_connections += 1
        connection_lost = channel.connectionLost

        def counted(reason=None):
            self.open_connections -= 1
            self._full = False
            connection_lost(reason)

        channel.connectionLost = counted
        return channel

    def build_web_protocol(self, addr):
        """A twisted.web channel for one connection (or one lent request), with ``TCP_NODELAY``."""
        protocol = super().buildProtocol(addr)
        protocol.front_door = self._front_door
        protocol.before_body = self._before_body
        make_connection = protocol.makeConnection

        def with_no_delay(transport):
            set_no_delay = getattr(transport, "setTcpNoDelay", None)
            if set_no_delay is not None:
                try:
                    set_no_delay(True)
                except OSError:
                    pass  # not a TCP socket (e.g. in-memory transports)
            make_connection(transport)

        protocol.makeConnection = with_no_delay
        return protocol
