"""
An HTTP/1.1 server protocol that serves the dispatch routes itself and lends
every other request to twisted.web.

Every Dify workflow step that calls a plugin is one ``POST
/plugin/<tenant>/dispatch/...``; twisted.web's ``HTTPChannel`` and
``Request`` cost about twice the CPU of the rest of a dispatch request
(``performance.md``; ``bench/dispatch_channel.py`` compares the two).  :class:`DispatchChannel`
frames such a request with a few ``bytes`` operations, passes its head
through the same front door as twisted.web's requests
(:class:`~difydaemon.api.admission.FrontDoor`: canonical target,
``X-Api-Key``, body bound -- a refusal is answered before the body is
read), and renders it with the same
:class:`~difydaemon.api.dispatch.DispatchResource` through a
:class:`DispatchRequest`: the few request methods the dispatch path uses,
writing the same bytes twisted.web writes.

Another route or method whose request is framed by its ``Content-Length``
(every management, health, ``/e/`` and upload call Dify's httpx client
makes) is *lent*: its bytes alone go to a fresh twisted.web channel of the
site, through a :class:`Lease` transport, and the connection comes back to
this channel once twisted.web has finished answering it.  Dify keeps one
pool of keep-alive connections for every call, so a connection that served
one management call must still serve the next dispatch call here.

Anything this channel cannot frame -- a chunked or ``Expect``-ing body, an
``Upgrade``, a head that is not plainly well formed -- is handed, with every
byte read so far, to a twisted.web channel for the rest of the connection's
life, so such requests and bad requests behave exactly as they do without
this channel.  The refusals of over-long heads (414, 431) are twisted.web's
too, made by :class:`~difydaemon.api.web_channel.DaemonHTTPChannel` with the
bytes handed over.  A head must be whole within
:data:`~difydaemon.api.admission.HEAD_TIMEOUT` of its first byte, and a
body must keep its route's pace (:mod:`difydaemon.api.pace`; 408 when it
falls behind), on this channel as on twisted.web's.  A head with a bare
LF, a folded line, two lengths or a transfer coding is never framed here:
twisted.web's channel refuses it with 400.

Framing is pure (:func:`split_request`, :func:`parse_head`); the channel
only buffers, lends, hands over and writes.
"""

from __future__ import annotations

import re
import warnings
from io import BytesIO

from attrs import define, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, datetimeToString
from twisted.web.server import NOT_DONE_YET
from twisted.web.server import version as SERVER_VERSION
from zope.interface import implementer

from difydaemon.api.admission import (
    BODY_TIMED_OUT,
    HEAD_TIMED_OUT,
    HEAD_TIMEOUT,
    MAX_HEAD_SIZE,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    Admitted,
    FrontDoor,
    Refused,
    refusal_response,
)
from difydaemon.api.pace import BodyClock, BodyPace
from difydaemon.immediate_write import write_now
from difydaemon.api.paths import RequestTarget, canonical_target
from difydaemon.observability.metrics import dispatch_endpoint

log = Logger()

#: Dispatch bodies larger than this go to twisted.web, which spools them to
#: a file (the front door bounds them all the same).
MAX_BODY_SIZE = 64 * 1024 * 1024
#: Bytes of pipelined requests read while one is answered before reading
#: stops (twisted.web's ``_optimisticEagerReadSize``).
EAGER_READ_SIZE = 0x4000

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"
#: twisted.web's answer to a resource that raised (tracebacks not shown).
PROCESSING_FAILED_BODY = (
    b"<html><head><title>Processing Failed</title></head><body><b>Processing Failed</b></body></html>"
)

# header lines after the request line: an RFC 9110 token, a colon, a value
_HEADER_LINES = re.compile(rb"(?:\r\n[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n\x00]*)*")
# request targets twisted.web serves without question (printable ASCII):
# what paths.canonical_target reads, told so by checked=True
_TARGET = re.compile(rb"/[\x21-\x7e]*")
_CANONICAL_NAMES = {
    b"content-type": b"Content-Type",
    b"content-length": b"Content-Length",
}


@define(slots=True)
class RequestHead:
    """
    The head of one dispatch request, as :func:`parse_head` read it.

    Not frozen: built on every request, and nobody mutates it.

    :ivar version: ``HTTP/1.1`` or ``HTTP/1.0``.
    :ivar dispatch: whether this is a dispatch call, served by the channel
        itself; any other request is lent to twisted.web.
    :ivar target: for a dispatch call, its canonical target
        (:func:`~difydaemon.api.paths.canonical_target`); None otherwise.
    :ivar postpath: for a dispatch call, the canonical path segments after
        ``plugin`` (``[tenant, b"dispatch", *route]``); None otherwise.
    :ivar headers: lower-cased name -> every value, in order.
    :ivar content_length: the body's length (0 without Content-Length).
    :ivar persistent: whether the connection stays open after the answer.
    """

    version: bytes
    dispatch: bool
    target: RequestTarget | None
    postpath: list | None
    headers: dict
    content_length: int
    persistent: bool


@frozen
class _Foreign:
    """The buffer starts with a request this channel cannot frame."""


#: :func:`split_request`: twisted.web must have this connection, for good.
FOREIGN = _Foreign()


@define(slots=True)
class Incomplete:
    """
    :func:`split_request`: the buffer does not hold a whole request yet.

    :ivar need: how many bytes the buffer must hold before framing it again
        is worth it (the whole request when its head is known).
    :ivar head: the request's head once it is whole, else None.
    """

    need: int
    head: RequestHead | None = None


def parse_head(head: bytes) -> RequestHead | None:
    """
    Read a request head (without its final blank line) if this channel can
    frame its request exactly as twisted.web would: HTTP/1.1 or 1.0, an
    origin-form target of printable ASCII, a request line and a head within
    the front door's bounds, well-formed ``name: value`` headers, at most
    one decimal ``Content-Length`` and no ``Transfer-Encoding``, ``Expect``
    or ``Upgrade``.

    :return: the head (:attr:`RequestHead.dispatch` tells whether it is a
        ``POST /plugin/<tenant>/dispatch/...`` in canonical form), or None
        for anything else (twisted.web decides what that is, a 400, 414 or
        431 included).
    """
    line_end = head.find(b"\r\n")
    if line_end < 0:
        line_end = len(head)
    if line_end > MAX_REQUEST_LINE:
        return None
    request_line = head[:line_end].split(b" ")
    if len(request_line) != 3:
        return None
    method, target, version = request_line
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        return None
    if _TARGET.fullmatch(target) is None:
        return None
    canonical = None
    postpath = None
    if method == b"POST":
        # the route in the form every router and the key check see; a
        # refused target is lent, and refused by twisted.web's front door
        canonical = canonical_target(target, checked=True)
        segments = getattr(canonical, "segments", ())
        if len(segments) >= 3 and segments[0] == b"plugin" and segments[2] == b"dispatch":
            postpath = list(segments[1:])
        else:
            canonical = None
    # every header line a token, a colon and a value without CR, LF or NUL
    # (so no folded lines); twisted.web refuses, or reads, anything else
    if _HEADER_LINES.fullmatch(head, line_end) is None:
        return None
    lines = head[line_end + 2:].split(b"\r\n") if line_end < len(head) else []
    if len(lines) > MAX_HEADERS:
        return None
    headers: dict = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.lower()] = [value.strip(b" \t")]
    if len(headers) != len(lines):
        # a name sent more than once: every value, in order
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers.setdefault(name.lower(), []).append(value.strip(b" \t"))
    if b"transfer-encoding" in headers or b"expect" in headers or b"upgrade" in headers:
        return None
    length = headers.get(b"content-length")
    if length is None:
        length = 0
    else:
        # twisted.web refuses a second Content-Length, or one not all digits
        if len(length) != 1 or not length[0].isdigit():
            return None
        length = int(length[0])
        if length > MAX_BODY_SIZE:
            return None
    persistent = False
    if version == b"HTTP/1.1":
        connection = headers.get(b"connection")
        # twisted.web looks for "close" among the first value's space-separated tokens
        persistent = not connection or b"close" not in connection[0].lower().split(b" ")
    return RequestHead(version, postpath is not None, canonical, postpath, headers, length, persistent)


def split_request(buffer: bytes):
    """
    Frame the first request of ``buffer``.

    :return: :class:`Incomplete`, :data:`FOREIGN` (a request this channel
        cannot frame), or ``(head, body, rest)`` where ``rest`` is what
        follows the request's body.
    """
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        # bytes that cannot become a head within bounds are twisted.web's to refuse
        # (a pending line may still lack its final "\n")
        size = len(buffer)
        if size > MAX_HEAD_SIZE + 1:
            return FOREIGN
        if buffer.count(b"\n") != buffer.count(b"\r\n"):
            # a bare LF would end the head for some readers: twisted.web refuses it
            return FOREIGN
        if size > MAX_REQUEST_LINE + 1:
            line_end = buffer.find(b"\r\n")
            if line_end < 0 or line_end > MAX_REQUEST_LINE:
                return FOREIGN
        return Incomplete(size + 1)
    # the head's size counts the request line and header lines with their line ends
    if end + 2 > MAX_HEAD_SIZE:
        return FOREIGN
    head = parse_head(buffer[:end])
    if head is None:
        return FOREIGN
    start = end + 4
    stop = start + head.content_length
    if len(buffer) < stop:
        return Incomplete(stop, head)
    return head, buffer[start:stop], buffer[stop:]


class DateCache:
    """The ``Date`` header's value, formatted once per second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = None
        self._value = b""

    def at(self, seconds: float) -> bytes:
        """The HTTP date of ``seconds`` since the epoch."""
        second = int(seconds)
        if second != self._second:
            self._value = datetimeToString(second)
            self._second = second
        return self._value


def response_head(version: bytes, code: int, headers) -> bytes:
    """
    A response's status line and headers as twisted.web writes them.

    :param headers: ``(canonical name, value)`` pairs, in order.
    """
    lines = [b"%s %d %s\r\n" % (version, code, RESPONSES.get(code, b"Unknown Status"))]
    for name, value in headers:
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    return b"".join(lines)


def _canonical(name: bytes) -> bytes:
    known = _CANONICAL_NAMES.get(name)
    if known is not None:
        return known
    return b"-".join([word.capitalize() for word in name.split(b"-")])


class RequestHeaders:
    """The request headers, read as twisted.web's ``Headers`` reads them."""

    __slots__ = ("_raw",)

    def __init__(self, raw: dict) -> None:
        self._raw = raw

    def getRawHeaders(self, name: bytes, default=None):
        """Every value of ``name`` (any case), or ``default``."""
        return self._raw.get(name.lower(), default)


class DispatchRequest:
    """
    One dispatch request served by :class:`DispatchChannel`: the part of
    twisted.web's ``IRequest`` that :class:`~difydaemon.api.dispatch.DispatchResource`
    and its relays use, with twisted.web's semantics (a write after the
    client left is dropped, ``finish`` then raises ``RuntimeError``;
    ``notifyFinish`` fires with None or errs back with the disconnection).

    The response is chunked unless a ``Content-Length`` header was set
    before the first write, or the request is HTTP/1.0.

    :ivar persistent: whether the connection stays open after this answer.
    """

    __slots__ = (
        "method",
        "clientproto",
        "persistent",
        "postpath",
        "requestHeaders",
        "content",
        "code",
        "finished",
        "startedWriting",
        "_channel",
        "_transport",
        "_headers",
        "_chunked",
        "_notifications",
        "_disconnected",
        "received_at",
        "span",
    )

    def __init__(self, channel: DispatchChannel, head: RequestHead, body: bytes) -> None:
        self.method = b"POST"
        self.clientproto = head.version
        self.persistent = head.persistent
        self.postpath = head.postpath
        self.requestHeaders = RequestHeaders(head.headers)
        self.content = BytesIO(body)
        self.code = 200
        self.finished = 0
        self.startedWriting = 0
        self._channel = channel
        self._transport = channel.transport
        # twisted.web sets these first; a closing HTTP/1.1 answer says so before them
        if head.persistent or head.version != b"HTTP/1.1":
            self._headers = {}
        else:
            self._headers = {b"connection": (b"Connection", b"close")}
        self._headers[b"server"] = (b"Server", SERVER_VERSION)
        self._headers[b"date"] = (b"Date", channel.date())
        self._chunked = False
        self._notifications = None
        self._disconnected = False
        #: ``reactor.seconds()`` when the request was read (its duration's start)
        self.received_at = 0.0
        #: the request's server span when the gate traces, else None
        self.span = None

    def setResponseCode(self, code: int) -> None:
        """The response's status."""
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        """Set (or replace) one response header."""
        key = name.lower()
        self._headers[key] = (_canonical(key), value)

    def write(self, data: bytes) -> None:
        """Write part of the body; the first write sends the head with it."""
        if self.finished:
            raise RuntimeError("Request.write called on a request after Request.finish was called.")
        if self._disconnected:
            return
        if data or not self.startedWriting:
            self._transport.write(self._framed(data))

    def _framed(self, data: bytes) -> bytes:
        """The bytes a write of ``data`` sends: the head first, chunk framing when chunked."""
        if self.startedWriting:
            if self._chunked and data:
                return b"%x\r\n%s\r\n" % (len(data), data)
            return data
        self.startedWriting = 1
        headers = self._headers
        if self.clientproto == b"HTTP/1.1" and b"content-length" not in headers:
            headers[b"transfer-encoding"] = (b"Transfer-Encoding", b"chunked")
            self._chunked = True
        head = response_head(self.clientproto, self.code, headers.values())
        if not data:
            return head
        if self._chunked:
            return b"%s%x\r\n%s\r\n" % (head, len(data), data)
        return head + data

    def finish(self) -> None:
        """End the response."""
        self.finish_with(b"")

    def finish_with(self, data: bytes) -> None:
        """
        Write ``data`` as the last of the body and end the response: what
        is left of it (the head too, for an answer written at once) goes in
        one send, in this reactor turn when the connection has nothing
        waiting -- the caller waits for the end of a response, not for the
        reactor's next turn (``write`` then ``finish`` would leave the last
        bytes in the transport's buffer until then).
        """
        if self._disconnected:
            raise RuntimeError(
                "Request.finish called on a request after its connection was lost; "
                "use Request.notifyFinish to keep track of this."
            )
        if self.finished:
            warnings.warn("Warning! request.finish called twice.", stacklevel=2)
            return
        last = self._framed(data) if data or not self.startedWriting else b""
        if self._chunked:
            last += b"0\r\n\r\n"
        if last:
            write_now(self._transport, last)
        self.finished = 1
        notifications, self._notifications = self._notifications, None
        if notifications:
            for waiter in notifications:
                waiter.callback(None)
        self._channel.request_done(self)

    def notifyFinish(self) -> Deferred:
        """Fires with None when the response is finished, or errs back if the client goes first."""
        waiter: Deferred = Deferred()
        if self._notifications is None:
            self._notifications = [waiter]
        else:
            self._notifications.append(waiter)
        return waiter

    def connection_lost(self, reason: Failure) -> None:
        """The client went away before the response was finished."""
        self._disconnected = True
        if self.span is not None:
            self.span.client_gone()
        notifications, self._notifications = self._notifications, None
        if notifications:
            for waiter in notifications:
                waiter.errback(reason)

    def respond(self, code: int, content_type: bytes, body: bytes) -> None:
        """Answer a whole body at once, with its length (as twisted.web renders bytes)."""
        self.code = code
        headers = self._headers
        headers[b"content-type"] = (b"Content-Type", content_type)
        headers[b"content-length"] = (b"Content-Length", b"%d" % len(body))
        self.finish_with(body)


@frozen
class DispatchGate:
    """
    What an admitted dispatch request passes through on its way to the
    dispatch resource, as :class:`~difydaemon.api.root.RootResource` does it.

    :ivar counter: the :class:`~difydaemon.api.root.RequestCounter` of
        ``/health/check``.
    :ivar resource: the :class:`~difydaemon.api.dispatch.DispatchResource`.
    :ivar metrics: the :class:`~difydaemon.observability.metrics.DaemonMetrics`
        counting each answered request, or None.
    :ivar tracing: the :class:`~difydaemon.observability.otel.Tracing`
        giving each request a server span, or None (``ENABLE_OTEL`` off).
    """

    counter: object
    resource: object
    metrics: object = None
    tracing: object = None


@implementer(IConsumer, IPushProducer)
class Lease:
    """
    The transport a twisted.web channel gets for one request lent by a
    :class:`DispatchChannel`: writes and closing go to the connection;
    reading stays with the lender, which has framed the request and feeds
    the channel nothing else, so the channel's pausing and resuming of its
    reading is the lender's business and ignored here.

    :ivar channel: the :class:`~difydaemon.api.web_channel.DaemonHTTPChannel`
        serving the request.
    :ivar producer: what the channel registered to hear that the
        connection's write buffer is full (the channel itself), or None.
    """

    def __init__(self, lender: DispatchChannel, transport) -> None:
        self._lender = lender
        self._transport = transport
        self.channel = None
        self.producer = None

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def writeSequence(self, data) -> None:
        self._transport.writeSequence(data)

    def loseConnection(self) -> None:
        self._lender.lease_closes(self)
        self._transport.loseConnection()

    def abortConnection(self) -> None:
        self._lender.lease_closes(self)
        self._transport.abortConnection()

    def getPeer(self):
        return self._transport.getPeer()

    def getHost(self):
        return self._transport.getHost()

    def setTcpNoDelay(self, enabled: bool) -> None:
        """The lender set it already."""

    def pause_reading(self) -> None:
        """The channel must read no more of its request for now (a check before its body)."""
        self._lender.pause_reading()

    def resume_reading(self) -> None:
        """The channel reads its request again."""
        self._lender.resume_reading()

    # -- IConsumer: the channel hearing about the write buffer ------------------

    def registerProducer(self, producer, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    # -- IPushProducer: the channel's reading, which the lender does ------------

    def pauseProducing(self) -> None:
        """Nothing more is fed to the channel than its request."""

    def resumeProducing(self) -> None:
        """The lender resumes reading once the request is answered."""

    def stopProducing(self) -> None:
        """The lender's connectionLost reaches the channel."""

    def __getattr__(self, name: str):
        # anything else a Request may ask of its transport (``disconnecting``...)
        return getattr(self._transport, name)


@implementer(IPushProducer)
class DispatchChannel(Protocol):
    """
    One HTTP connection: requests are served one at a time (pipelined ones
    wait their turn), dispatch requests here, others each by a fresh
    ``fallback()`` channel lent the connection for that request; the first
    request this channel cannot frame turns the connection over to a
    ``fallback()`` channel for good.

    :param front_door: the checks made on a dispatch request's head.
    :param gate: the counter and resource of the dispatch path.
    :param fallback: builds a twisted.web
        :class:`~difydaemon.api.web_channel.DaemonHTTPChannel`.
    :param reactor: for the timeouts and the ``Date`` header.
    :param timeout: seconds a connection may stay idle (the site's
        ``timeOut``); None for no limit.
    :param dates: the ``Date`` cache, shared by the site's connections.
    """

    #: seconds between closing a connection (idle, or refused) and aborting it
    abort_timeout = 15
    #: seconds a request head may take from its first byte
    head_timeout = HEAD_TIMEOUT

    def __init__(self, front_door: FrontDoor, gate: DispatchGate, fallback, reactor, timeout: float | None,
                 dates: DateCache | None = None):
        self._front_door = front_door
        self._gate = gate
        self._fallback = fallback
        self._reactor = reactor
        self._timeout = timeout
        self._dates = dates if dates is not None else DateCache()
        self._inner = None
        self._request: DispatchRequest | None = None
        # bytes read and not yet framed, and how many are needed before framing again
        self._parts: list[bytes] = []
        self._size = 0
        self._need = 0
        # bytes of a lent request's body still to pass to its channel
        self._lent_body = 0
        self._closing = False
        self._reading_paused = False
        self._writes_blocked = False
        self._producer_registered = False
        self._idle_call = None
        self._abort_call = None
        self._head_call = None
        self._last_activity = 0.0
        # a dispatch body being read against its pace, and the call that checks it
        self._body_clock: BodyClock | None = None
        self._body_version = b"HTTP/1.1"
        self._pace_call = None

    # -- IProtocol ------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        set_no_delay = getattr(transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            # SSE items are small writes spaced by the plugin's pace; Nagle's
            # algorithm would hold each back until the previous one is ACKed
            try:
                set_no_delay(True)
            except OSError:
                pass
        if IPushProducer.providedBy(transport) and hasattr(transport, "registerProducer"):
            transport.registerProducer(self, True)
            self._producer_registered = True
        if self._timeout:
            self._last_activity = self._reactor.seconds()
            self._idle_call = self._reactor.callLater(self._timeout, self._check_idle)

    def dataReceived(self, data: bytes) -> None:
        inner = self._inner
        if inner is not None:
            inner.dataReceived(data)
            return
        if self._closing:
            # twisted.web drops what follows a request that closes the connection
            return
        if self._idle_call is not None and self._head_call is None:
            # a head's first bytes are activity; its deadline covers the rest
            self._last_activity = self._reactor.seconds()
        lent_body = self._lent_body
        if lent_body:
            # the rest of a lent request's body goes straight to its channel
            if len(data) <= lent_body:
                self._lent_body = lent_body - len(data)
                self._request.channel.dataReceived(data)
                return
            self._lent_body = 0
            self._request.channel.dataReceived(data[:lent_body])
            data = data[lent_body:]
            if self._closing:
                return
        if self._parts or self._request is not None:
            self._parts.append(data)
            self._size += len(data)
            if self._body_clock is not None:
                self._body_clock.advance(len(data))
            if self._request is not None:
                if self._size > EAGER_READ_SIZE and not self._reading_paused:
                    self._reading_paused = True
                    self.transport.pauseProducing()
                return
            if self._size < self._need:
                return
            data = b"".join(self._parts)
            self._parts = []
            self._size = 0
        self._serve_from(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self._stop_idle_timer()
        self._stop_head_timer()
        self._stop_pace()
        abort, self._abort_call = self._abort_call, None
        if abort is not None and abort.active():
            abort.cancel()
        inner = self._inner
        if inner is not None:
            inner.connectionLost(reason)
            return
        request, self._request = self._request, None
        self._parts = []
        if type(request) is Lease:
            request.channel.connectionLost(reason)
        elif request is not None:
            self._gate.counter.leave(True)
            request.connection_lost(reason)

    # -- IPushProducer (the transport's write buffer) -------------------------------

    def pauseProducing(self) -> None:
        """The client is not reading: stop reading its requests (between requests)."""
        self._writes_blocked = True
        request = self._request
        if request is None:
            if not self._reading_paused and not self._closing:
                self._reading_paused = True
                self.transport.pauseProducing()
        elif type(request) is Lease and request.producer is not None:
            request.producer.pauseProducing()

    def resumeProducing(self) -> None:
        """The client reads again."""
        self._writes_blocked = False
        request = self._request
        if request is None:
            if self._reading_paused and not self._closing:
                self._reading_paused = False
                self.transport.resumeProducing()
        elif type(request) is Lease and request.producer is not None:
            request.producer.resumeProducing()

    def stopProducing(self) -> None:
        """The transport is going away; connectionLost does the rest."""

    # -- requests -----------------------------------------------------------------------

    def date(self) -> bytes:
        """The ``Date`` header's value now."""
        return self._dates.at(self._reactor.seconds())

    def _serve_from(self, buffer: bytes) -> None:
        """Serve every whole request at the start of ``buffer``; keep the rest."""
        while buffer:
            framed = split_request(buffer)
            if type(framed) is Incomplete:
                head = framed.head
                if head is None:
                    self._head_pending()
                else:
                    self._head_complete()
                    if not head.dispatch:
                        # lent now: twisted.web spools a large body (an upload)
                        # to a file as it arrives, rather than it piling up here
                        self._lend(buffer, framed.need - len(buffer))
                        return
                    admitted = self._admitted(head)
                    if admitted is None:
                        return
                    self._start_pace(head, admitted.pace, len(buffer) - (framed.need - head.content_length))
                self._parts = [buffer]
                self._size = len(buffer)
                self._need = framed.need
                return
            if framed is FOREIGN:
                self._hand_over(buffer)
                return
            head, body, rest = framed
            self._head_complete()
            self._stop_pace()
            if not head.dispatch:
                self._lend(buffer[:len(buffer) - len(rest)])
            elif self._admitted(head) is not None:
                self._serve(head, body)
            else:
                return
            buffer = rest
            if self._request is not None or self._closing:
                if buffer and not self._closing:
                    # pipelined: framed once this request is answered
                    self._parts = [buffer]
                    self._size = len(buffer)
                return

    def _admitted(self, head: RequestHead) -> Admitted | None:
        """The front door's admission of a dispatch request; if refused (None), the connection closes."""
        keys = head.headers.get(b"x-api-key")
        verdict = self._front_door.admit_target(b"POST", head.target, keys[0] if keys else None, head.content_length)
        if type(verdict) is Refused:
            self._refuse(head.version, verdict, head.target.path)
            return None
        return verdict

    def _refuse(self, version: bytes, refused: Refused, target: bytes) -> None:
        """Answer ``refused`` at once and close, leaving the rest of the request unread."""
        self._stop_head_timer()
        log.info(
            "refused POST {target} from {peer}: {status} {reason}",
            target=target,
            peer=str(self.transport.getPeer()),
            status=refused.status,
            reason=refused.reason,
        )
        self.transport.write(refusal_response(version, refused, self.date()))
        self._close()

    def _close(self) -> None:
        """Close the connection, and abort it if the client does not let it close."""
        self._closing = True
        self._parts = []
        self._size = 0
        self._stop_pace()
        if self.abort_timeout is not None and self._abort_call is None:
            self._abort_call = self._reactor.callLater(self.abort_timeout, self.transport.abortConnection)
        self._unregister()
        self.transport.loseConnection()

    def _serve(self, head: RequestHead, body: bytes) -> None:
        gate = self._gate
        gate.counter.enter(True)
        request = DispatchRequest(self, head, body)
        request.received_at = self._reactor.seconds()
        if gate.tracing is not None:
            request.span = gate.tracing.start_request("POST", request.requestHeaders)
        self._request = request
        try:
            answer = gate.resource.render(request)
            if answer is not NOT_DONE_YET:
                request.setHeader(b"content-length", b"%d" % len(answer))
                request.finish_with(answer)
        except Exception:
            log.failure("dispatch request failed")
            if not request.startedWriting and not request.finished and not request._disconnected:
                request.respond(500, b"text/html", PROCESSING_FAILED_BODY)

    def request_done(self, request: DispatchRequest) -> None:
        """The response to ``request`` is finished: go on with the next request."""
        if request is not self._request:
            return
        self._request = None
        gate = self._gate
        gate.counter.leave(True)
        metrics = gate.metrics
        span = request.span
        if metrics is not None or span is not None:
            endpoint = dispatch_endpoint(b"/".join(request.postpath[2:]))
            if metrics is not None:
                metrics.http_request("POST", endpoint, request.code, self._reactor.seconds() - request.received_at)
            if span is not None:
                span.end_request("POST", endpoint, request.code)
        self._next(request.persistent)

    def _next(self, persistent: bool) -> None:
        """After a response: close, or read and serve what follows."""
        if self._idle_call is not None:
            self._last_activity = self._reactor.seconds()
        if not persistent:
            self._closing = True
            self._parts = []
            self._size = 0
            self._unregister()
            self.transport.loseConnection()
            return
        if self._reading_paused and not self._writes_blocked:
            self._reading_paused = False
            self.transport.resumeProducing()
        parts = self._parts
        if parts:
            # pipelined requests read while this one was answered
            self._parts = []
            self._size = 0
            self._serve_from(b"".join(parts))

    # -- lending ------------------------------------------------------------------------

    def _lend(self, raw: bytes, body_to_come: int = 0) -> None:
        """
        Have a fresh twisted.web channel answer a request on this connection.

        :param raw: the request's bytes, or its first ones.
        :param body_to_come: how many bytes of its body are still to arrive.
        """
        lease = Lease(self, self.transport)
        self._request = lease
        self._lent_body = body_to_come
        channel = self._fallback()
        lease.channel = channel
        channel.returned = lambda: self._returned(lease)
        channel.makeConnection(lease)
        channel.dataReceived(raw)

    def _returned(self, lease: Lease) -> None:
        """twisted.web answered the lent request and keeps the connection open."""
        if lease is self._request:
            self._request = None
            self._next(True)

    def pause_reading(self) -> None:
        """A lent channel checks its request before reading its body: read nothing meanwhile."""
        if not self._reading_paused and not self._closing:
            self._reading_paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        """The lent channel reads its body now."""
        if self._reading_paused and not self._closing and not self._writes_blocked:
            self._reading_paused = False
            self.transport.resumeProducing()

    def lease_closes(self, lease: Lease) -> None:
        """The channel lent the connection closes it."""
        if lease is self._request:
            self._closing = True
            self._parts = []
            self._unregister()

    # -- handing over -------------------------------------------------------------------

    def _hand_over(self, buffer: bytes) -> None:
        """Give the connection, and ``buffer``, to a twisted.web channel."""
        self._stop_idle_timer()
        self._stop_head_timer()
        self._stop_pace()
        self._unregister()
        self._parts = []
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        inner = self._fallback()
        self._inner = inner
        inner.makeConnection(self.transport)
        if buffer:
            inner.dataReceived(buffer)

    def _unregister(self) -> None:
        if self._producer_registered:
            self._producer_registered = False
            self.transport.unregisterProducer()

    # -- idle timeout -------------------------------------------------------------------

    def _check_idle(self) -> None:
        self._idle_call = None
        if self._inner is not None or self._closing:
            return
        now = self._reactor.seconds()
        left = self._timeout - (now - self._last_activity)
        # a request being answered is not idleness (a head's first byte was activity, the rest is not)
        if self._request is not None or left > 0:
            self._idle_call = self._reactor.callLater(self._timeout if self._request is not None else left,
                                                      self._check_idle)
            return
        log.info("Timing out client: {peer}", peer=str(self.transport.getPeer()))
        self._close()

    def _stop_idle_timer(self) -> None:
        call, self._idle_call = self._idle_call, None
        if call is not None and call.active():
            call.cancel()

    # -- head deadline --------------------------------------------------------------------

    def _head_pending(self) -> None:
        """Part of a head has arrived: it must be whole within ``head_timeout``."""
        if self._head_call is None and self.head_timeout is not None:
            self._head_call = self._reactor.callLater(self.head_timeout, self._head_timed_out)

    def _head_complete(self) -> None:
        """A head is whole: its deadline is over, and the idle count starts again."""
        if self._head_call is not None:
            self._stop_head_timer()
            self._last_activity = self._reactor.seconds()

    def _head_timed_out(self) -> None:
        self._head_call = None
        log.info("Timing out a request head: {peer}", peer=str(self.transport.getPeer()))
        self.transport.write(refusal_response(b"HTTP/1.1", HEAD_TIMED_OUT, self.date()))
        self._close()

    def _stop_head_timer(self) -> None:
        call, self._head_call = self._head_call, None
        if call is not None and call.active():
            call.cancel()


    # -- body pace ------------------------------------------------------------------------

    def _start_pace(self, head: RequestHead, pace: BodyPace, received: int) -> None:
        """An admitted dispatch body is on its way: it must keep up with its route's pace."""
        self._stop_pace()
        clock = BodyClock(pace, self._reactor.seconds())
        clock.advance(received)
        self._body_clock = clock
        self._body_version = head.version
        self._pace_call = self._reactor.callLater(clock.pace.deadline(0.0, received), self._check_pace)

    def _check_pace(self) -> None:
        self._pace_call = None
        clock = self._body_clock
        if clock is None:
            return
        left = clock.check(self._reactor.seconds())
        if left is None:
            self._body_clock = None
            self.transport.write(refusal_response(self._body_version, BODY_TIMED_OUT, self.date()))
            log.info("Timing out a request body: {peer}", peer=str(self.transport.getPeer()))
            self._close()
        else:
            self._pace_call = self._reactor.callLater(left, self._check_pace)

    def _stop_pace(self) -> None:
        self._body_clock = None
        call, self._pace_call = self._pace_call, None
        if call is not None and call.active():
            call.cancel()
