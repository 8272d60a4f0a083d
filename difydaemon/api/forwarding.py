"""
Forwarding a call to the replica that holds a debug plugin: dispatch calls
(``/plugin/<tenant>/dispatch/...``) and public endpoint calls (``/e/...``).

A debug plugin is connected to one replica's TCP port.  A call for it that
reaches another replica is sent on, over HTTP, to the holder that the
membership names (its plugin claim), and the holder's answer is relayed
back as it comes: each chunk is written on as soon as it is read, so
Server-Sent Events pass through a hop without being held back.  An
endpoint call keeps its method, path, query, headers and body, and its
``Host`` travels as ``X-Original-Host`` (which the holder shows the plugin);
its answer keeps its status and headers.

Every forwarded call carries :data:`HOP_HEADER`: a replica never forwards a
call that carries it (no ping-pong while claims change), and answers at once
that it cannot serve it.  The call carries the daemon's own ``X-Api-Key``
(replicas share ``SERVER_KEY``).  The client has a connect timeout and a read
timeout (between two reads), uses no proxy and follows no redirect.  A
holder that cannot be reached is skipped for the next one; when none can,
or when the holder goes away mid-stream, the caller gets an error at once
(an error item on a stream).
"""

from __future__ import annotations

from twisted.internet import error as net_error
from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from difydaemon import errors
from difydaemon.api import envelope, sse
from difydaemon.api.answers import answer_json as _answer

log = Logger()

#: The header a forwarded call carries: the id of the replica that sent it.
HOP_HEADER = b"X-Difydaemon-Forwarded-By"

#: Request headers a forwarded call keeps (the key is the daemon's own).
FORWARDED_HEADERS = (b"content-type", b"x-plugin-id", b"x-plugin-unique-identifier", b"traceparent", b"tracestate")

#: Headers of one connection, not of the call: never forwarded nor relayed back.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"host", b"date", b"server",
})

#: What a connect failure looks like: the next holder is worth a try.
_UNREACHABLE = (net_error.ConnectError, net_error.TimeoutError, net_error.DNSLookupError)


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written at once (no cooperator turn)."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def hop_refusal(identifier: str, forwarded_by: bytes) -> bytes:
    """The answer to a forwarded call for a plugin this replica does not hold."""
    by = forwarded_by.decode("utf-8", "replace")
    return envelope.from_exception(
        errors.InternalServerError(
            f"failed to get plugin runtime: plugin {identifier} is not connected to this replica"
            f" (the call was forwarded by node {by} and is not forwarded again)"
        )
    )


class _Call:
    """
    One forwarded call: the caller's request, the holders left to try, and
    what to cancel when the caller leaves or the holder stalls.
    """

    def __init__(self, forwarder, request, identifier: str, target: bytes, headers: Headers, body: bytes,
                 nodes: list, whole_answer: bool = False) -> None:
        self.forwarder = forwarder
        self.request = request
        self.identifier = identifier
        self.method = request.method
        self.target = target
        self.headers = headers
        self.body = body
        #: relay every header of the answer (an endpoint's), not only its type
        self.whole_answer = whole_answer
        self.nodes = list(nodes)
        self.node = None
        self.pending = None
        self.body_protocol = None
        self.timer = None
        self.gone = False
        self.done = False
        self.streaming = False

    # -- timers ---------------------------------------------------------------

    def arm(self) -> None:
        """(Re)start the read timeout."""
        reactor = self.forwarder.reactor
        if self.timer is not None and self.timer.active():
            self.timer.reset(self.forwarder.read_timeout)
        else:
            self.timer = reactor.callLater(self.forwarder.read_timeout, self.stalled)

    def disarm(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def stalled(self) -> None:
        """Nothing came from the holder for the read timeout."""
        self.timer = None
        log.warn("node {node_id} sent nothing for {seconds:g} s on a forwarded call of {identifier}",
                 node_id=self.node.node_id, seconds=self.forwarder.read_timeout, identifier=self.identifier)
        self.stall_reason = f"no answer for {self.forwarder.read_timeout:g} s"
        if self.pending is not None:
            self.pending.cancel()
        elif self.body_protocol is not None and self.body_protocol.transport is not None:
            self.body_protocol.transport.stopProducing()

    stall_reason = None

    # -- the caller -------------------------------------------------------------

    def client_gone(self, failure) -> None:
        """The caller left: stop the forwarded call."""
        self.gone = True
        self.disarm()
        if self.pending is not None:
            self.pending.cancel()
        elif self.body_protocol is not None and self.body_protocol.transport is not None:
            self.body_protocol.transport.stopProducing()

    def fail(self, message: str) -> None:
        """Answer an error envelope (nothing was relayed yet)."""
        self.done = True
        self.disarm()
        if not self.gone:
            _answer(self.request, 500, envelope.from_exception(errors.InternalServerError(message)))

    # -- sending ----------------------------------------------------------------

    def send_next(self, why: str | None = None) -> None:
        if self.gone:
            return
        if not self.nodes:
            self.fail(
                f"failed to get plugin runtime: plugin {self.identifier} is held by node {self.node.node_id}"
                f" at {self.node.url}, which cannot be reached: {why}"
            )
            return
        self.node = node = self.nodes.pop(0)
        self.pending = self.forwarder.agent.request(
            self.method, node.url.encode("utf-8") + self.target, self.headers, BytesProducer(self.body)
        )
        self.arm()
        self.pending.addCallbacks(self.answered, self.not_answered)

    def not_answered(self, failure) -> None:
        self.pending = None
        self.disarm()
        if self.gone:
            return
        if failure.check(*_UNREACHABLE):
            log.info("node {node_id} holding {identifier} cannot be reached: {reason}",
                     node_id=self.node.node_id, identifier=self.identifier, reason=failure.getErrorMessage())
            self.send_next(failure.getErrorMessage())
            return
        reason = self.stall_reason or _reason(failure)
        self.fail(
            f"failed to get plugin runtime: the call forwarded to node {self.node.node_id} at {self.node.url}"
            f" failed: {reason}"
        )

    def answered(self, response) -> None:
        self.pending = None
        if self.gone:
            response.deliverBody(_Discard())
            return
        request = self.request
        request.setResponseCode(response.code)
        if self.whole_answer:
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in HOP_BY_HOP:
                    request.responseHeaders.setRawHeaders(name, values)
        content_type = response.headers.getRawHeaders(b"content-type")
        if content_type:
            request.setHeader(b"content-type", content_type[0])
            self.streaming = content_type[0].startswith(sse.CONTENT_TYPE)
        self.body_protocol = _BodyRelay(self)
        response.deliverBody(self.body_protocol)

    def relay(self, data: bytes) -> None:
        self.arm()
        if not self.gone:
            self.request.write(data)

    def ended(self, reason) -> None:
        self.done = True
        self.disarm()
        self.body_protocol = None
        if self.gone:
            return
        request = self.request
        if not reason.check(ResponseDone):
            why = self.stall_reason or _reason(reason)
            log.warn("forwarded call of {identifier} to node {node_id} broke: {reason}",
                     identifier=self.identifier, node_id=self.node.node_id, reason=why)
            if self.streaming:
                request.write(sse.error_item(
                    -500,
                    f"the replica holding plugin {self.identifier} (node {self.node.node_id}) went away"
                    f" mid-stream: {why}",
                    errors.InternalServerError.error_type,
                ))
            elif self.whole_answer and request.transport is not None:
                # a cut answer must not look whole to the caller
                request.transport.abortConnection()
                return
        request.finish()


def _reason(failure) -> str:
    value = failure.value
    inner = getattr(value, "reasons", None)
    if inner:
        return "; ".join(r.getErrorMessage() or type(r.value).__name__ for r in inner)
    return failure.getErrorMessage() or type(value).__name__


class _BodyRelay(Protocol):
    """Writes each piece of the holder's answer to the caller as it comes."""

    def __init__(self, call: _Call) -> None:
        self._call = call

    def dataReceived(self, data: bytes) -> None:
        self._call.relay(data)

    def connectionLost(self, reason=None) -> None:
        self._call.ended(reason)


class _Discard(Protocol):
    def dataReceived(self, data: bytes) -> None:
        pass


class CallForwarder:
    """
    Sends dispatch and endpoint calls on to the replica holding their debug plugin.

    :param reactor: the reactor.
    :param holders: ``(identifier) -> Deferred[list of NodeInfo]``: the
        other live replicas claiming the plugin (the
        :class:`~difydaemon.coordination.replica.Replica`'s ``holders``).
    :param node_id: this replica (the hop header's value).
    :param server_key: ``SERVER_KEY``, which every replica shares.
    :param connect_timeout: seconds to connect to a holder.
    :param read_timeout: seconds between two reads of the holder's answer
        (a stalled holder; its own sessions end by their own timeout
        before this).
    :param max_connections: kept-alive connections per holder.
    :param agent: the IAgent to send with (tests); one of its own otherwise.
    """

    def __init__(self, reactor, holders, node_id: str, server_key: str, connect_timeout: float = 3.0,
                 read_timeout: float = 660.0, max_connections: int = 32, agent=None) -> None:
        self.reactor = reactor
        self._holders = holders
        self.node_id = node_id
        self._key = server_key.encode("utf-8")
        self.read_timeout = read_timeout
        self.pool = None
        if agent is None:
            self.pool = HTTPConnectionPool(reactor, persistent=True)
            self.pool.maxPersistentPerHost = max_connections
            agent = Agent(reactor, connectTimeout=connect_timeout, pool=self.pool)
        self.agent = agent

    def headers_for(self, request) -> Headers:
        """The headers of the forwarded call."""
        headers = Headers()
        for name in FORWARDED_HEADERS:
            values = request.requestHeaders.getRawHeaders(name)
            if values:
                headers.setRawHeaders(name, values[:1])
        headers.setRawHeaders(b"x-api-key", [self._key])
        headers.setRawHeaders(HOP_HEADER, [self.node_id.encode("utf-8")])
        return headers

    def holders(self, identifier: str):
        """Deferred[list of NodeInfo]: the other live replicas holding a plugin."""
        return self._holders(identifier)

    def forward(self, request, identifier: str, departure, local) -> None:
        """
        Forward a dispatch ``request`` to a replica holding ``identifier``;
        call ``local()`` instead when no other replica holds it (this one
        may, soon: a debug plugin reconnecting).  Tells ``departure`` (the
        dispatch request's) whom to stop when the caller leaves.
        """
        request.content.seek(0)
        body = request.content.read()
        d = self._holders(identifier)
        d.addCallbacks(self._found, self._not_found, callbackArgs=(request, identifier, body, departure, local),
                       errbackArgs=(request, departure))
        d.addErrback(lambda f: log.failure("forwarding a dispatch call failed", f))

    def forward_endpoint(self, request, identifier: str, body: bytes, nodes: list) -> None:
        """
        Forward a public endpoint call (``/e/...``) to the first of
        ``nodes`` that answers; its answer is relayed whole.

        :param body: the call's body, as read.
        """
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in HOP_BY_HOP and name.lower() != HOP_HEADER.lower():
                headers.setRawHeaders(name, values)
        if not headers.hasHeader(b"x-original-host"):
            host = request.getHeader(b"host")
            if host:
                headers.setRawHeaders(b"x-original-host", [host])
        headers.setRawHeaders(HOP_HEADER, [self.node_id.encode("utf-8")])
        call = _Call(self, request, identifier, request.uri, headers, body, nodes, whole_answer=True)
        request.notifyFinish().addErrback(call.client_gone)
        call.send_next()

    def _found(self, nodes, request, identifier, body, departure, local) -> None:
        if departure.gone:
            return
        if not nodes:
            request.content.seek(0)
            local()
            return
        target = b"/plugin/" + b"/".join(request.postpath)
        call = _Call(self, request, identifier, target, self.headers_for(request), body, nodes)
        departure.relay = call
        call.send_next()

    def _not_found(self, failure, request, departure) -> None:
        if departure.gone:
            return
        if isinstance(failure.value, errors.DaemonError):
            _answer(request, 500, envelope.from_exception(failure.value))
            return
        log.failure("looking for the holder of a plugin failed", failure)
        _answer(request, 500, envelope.from_exception(errors.InternalServerError("failed to find the plugin's replica")))
