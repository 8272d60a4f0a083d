"""
twisted.web's HTTP channel and request with the daemon's front door
(:mod:`difydaemon.api.admission`): what every request that twisted.web
serves -- lent by the dispatch channel, handed over to it, or on a site
without that channel -- passes before its body is read.

:class:`DaemonHTTPChannel`

- bounds the head: a request line over
  :data:`~difydaemon.api.admission.MAX_REQUEST_LINE` answers 414, a head over
  :data:`~difydaemon.api.admission.MAX_HEAD_SIZE` or with more than
  :data:`~difydaemon.api.admission.MAX_HEADERS` header lines answers 431
  (twisted.web closed silently or answered 400);
- gives a head :data:`~difydaemon.api.admission.HEAD_TIMEOUT` seconds from
  its first byte, and does not count its later bytes as activity (they
  restarted twisted.web's idle timer, so a client trickling a byte every
  few seconds held a connection forever);
- refuses with 400 a head that two readers could frame differently
  (request smuggling): a bare LF line end (twisted.web waited for a CRLF
  that never came), a folded header line (twisted.web unfolded it), as
  well as the shapes twisted.web already refuses (two ``Content-Length``,
  ``Content-Length`` with ``Transfer-Encoding``, a bad chunk size), now with
  the front door's envelope and ``Connection: close``;
- admits the request once its head is read (canonical target, key, body
  bound), and otherwise answers at once and closes, its body unread;
- gives the body its route's pace (:mod:`difydaemon.api.pace`): a body that
  falls behind answers 408 and the connection closes;
- with a ``before_body`` check (the site's), holds the body unread until
  it has passed: an ``/e/`` call for an unknown hook answers its 404 first;
- can serve a single request on a connection lent by
  :class:`~difydaemon.api.dispatch_channel.DispatchChannel`.

:class:`DaemonRequest` routes on the canonical target the admission saw,
and counts its body against the admitted bound as it arrives (a chunked
body has no declared length).

The pace, the hold and the refusals are driven here; what they decide is
pure (:mod:`~difydaemon.api.admission`, :mod:`~difydaemon.api.pace`).
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from difydaemon.api.admission import (
    BAD_REQUEST,
    BODY_TIMED_OUT,
    HEAD_TIMED_OUT,
    HEAD_TIMEOUT,
    HEADERS_TOO_LARGE,
    MAX_HEAD_SIZE,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    URI_TOO_LONG,
    Admitted,
    Refused,
    refusal_response,
)
from difydaemon.api.pace import BodyClock
from difydaemon.observability.metrics import http_method

log = Logger()


class DaemonRequest(Request):
    """
    A twisted.web request admitted by :class:`DaemonHTTPChannel`.

    :ivar admission: the :class:`~difydaemon.api.admission.Admitted` verdict
        on its head, or None on a channel without a front door.
    """

    admission: Admitted | None = None
    _body_received = 0

    def handleContentChunk(self, data: bytes) -> None:
        admission = self.admission
        if admission is not None:
            received = self._body_received + len(data)
            self._body_received = received
            if received > admission.body_limit:
                self.channel.refuse(admission.oversize)
                return
        self.content.write(data)

    #: ``reactor.seconds()`` when the request's head and body were read
    received_at = None
    #: the request's server span (a :class:`~difydaemon.observability.otel.TracedSpan`)
    #: when the site traces, else None; the site ends it when it logs the answer
    span = None

    def process(self) -> None:
        factory = self.channel.factory if self.channel is not None else None
        reactor = getattr(factory, "reactor", None)
        if reactor is not None:
            self.received_at = reactor.seconds()
        tracing = getattr(factory, "tracing", None)
        if tracing is not None:
            span = self.span = tracing.start_request(http_method(self.method), self.requestHeaders)
            # a client that leaves first never has its answer logged
            self.notifyFinish().addErrback(span.client_gone)
        admission = self.admission
        if admission is not None:
            # twisted.web splits this path on "/" and decodes each segment,
            # which gives back exactly the segments the key check saw
            self.path = admission.target.encoded_path()
        super().process()


class DaemonHTTPChannel(HTTPChannel):
    """
    twisted.web's channel behind the front door.

    :ivar front_door: the :class:`~difydaemon.api.admission.FrontDoor`
        (set by the site), or None to admit every request as twisted.web does.
    :ivar returned: called (once) when a lent request has been answered and
        the connection stays open; None when nothing is lent.
    :ivar head_timeout: seconds a request head may take from its first byte.
    :ivar before_body: called with an admitted request's
        :class:`~difydaemon.api.admission.Admitted` verdict when a body
        follows its head; returns None, or a Deferred firing with a
        :class:`~difydaemon.api.admission.Refused` (answered instead of
        reading the body) or None (read it).  Set by the site.
    :ivar key_header: the header whose first value the front door checks
        (the SRI connector's channel checks ``Authorization``).
    """

    #: no line is longer than a whole head (LineReceiver's bound)
    MAX_LENGTH = MAX_HEAD_SIZE
    front_door = None
    returned = None
    head_timeout = HEAD_TIMEOUT
    before_body = None
    key_header = b"x-api-key"

    def __init__(self) -> None:
        super().__init__()
        self._refused = False
        self._head_call = None
        # lines and bytes (line ends included) of the head being read
        self._head_lines = 0
        self._head_size = 0
        # the body being read against its pace, and the call that checks it
        self._body_clock: BodyClock | None = None
        self._pace_call = None
        # body bytes read while ``before_body`` decides (None: not deciding)
        self._held: list | None = None
        self._held_size = 0
        self._lost = False

    # -- reading ---------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if not self.line_mode:
            # a body, or requests pipelined behind the one being answered
            HTTPChannel.dataReceived(self, data)
            return
        if self._head_call is None:
            # a head's first bytes are activity; its deadline covers the rest
            self.resetTimeout()
        LineReceiver.dataReceived(self, data)
        if self.line_mode and (self._buffer or self._head_lines) and not self.transport.disconnecting:
            self._head_pending()

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if line and self.persistent:
            self._head_lines += 1
            self._head_size += len(line) + 2
            if self._head_lines == 1 and len(line) > MAX_REQUEST_LINE:
                self.refuse(URI_TOO_LONG)
                return
            if self._head_size > MAX_HEAD_SIZE or self._head_lines > MAX_HEADERS + 1:
                self.refuse(HEADERS_TOO_LARGE)
                return
            if b"\n" in line or b"\r" in line:
                # a bare LF (or CR) ends a line for some readers and not for others
                self.refuse(BAD_REQUEST)
                return
            if self._head_lines > 1 and line[0] in b" \t":
                # obsolete line folding: twisted.web would join it to the line
                # before, a proxy in front may read it as a header of its own
                self.refuse(BAD_REQUEST)
                return
        super().lineReceived(line)

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's 400, as the front door's refusal (envelope, ``Connection: close``)."""
        self.refuse(BAD_REQUEST)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line longer than a whole head: LineReceiver would close without a word."""
        self.refuse(URI_TOO_LONG if self._head_lines == 0 else HEADERS_TOO_LARGE)

    def _head_pending(self) -> None:
        """Part of a head has arrived: bound what is buffered, and start its deadline."""
        buffer = self._buffer
        pending = len(buffer)
        if b"\n" in buffer and b"\r\n" not in buffer and not self._busyReceiving:
            # LineReceiver splits on CRLF only: a head of bare LFs would wait
            # for its deadline (re-entered, the buffer holds whole lines, and
            # maybe a body, not yet split: lineReceived sees those)
            self.refuse(BAD_REQUEST)
        # a pending line may still lack its final "\n"
        elif self._head_lines == 0 and pending > MAX_REQUEST_LINE + 1:
            self.refuse(URI_TOO_LONG)
        elif self._head_size + pending > MAX_HEAD_SIZE + 1:
            self.refuse(HEADERS_TOO_LARGE)
        elif self._head_call is None and self.head_timeout is not None:
            self._head_call = self.callLater(self.head_timeout, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_call = None
        self.refuse(HEAD_TIMED_OUT)

    def _cancel_head_call(self) -> None:
        call, self._head_call = self._head_call, None
        if call is not None and call.active():
            call.cancel()

    def allHeadersReceived(self) -> None:
        self._cancel_head_call()
        self._head_lines = 0
        self._head_size = 0
        self.resetTimeout()
        front_door = self.front_door
        if front_door is not None:
            request = self.requests[-1]
            keys = request.requestHeaders.getRawHeaders(self.key_header)
            verdict = front_door.admit(self._command, self._path, keys[0] if keys else None, self.length)
            if type(verdict) is Refused:
                self.refuse(verdict)
                return
            request.admission = verdict
            if self.length != 0 and self._start_body(verdict):
                return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._stop_pace()
        if not self._refused:
            super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        held = self._held
        if held is not None:
            # before_body is deciding: nothing of the body is read yet
            held.append(data)
            self._held_size += len(data)
            if self._held_size > self.requests[-1].admission.body_limit:
                self.refuse(self.requests[-1].admission.oversize)
            return
        clock = self._body_clock
        if clock is not None:
            clock.advance(len(data))
        super().rawDataReceived(data)

    # -- the body: its pace, and the check before it -----------------------------------

    def _start_body(self, admitted: Admitted) -> bool:
        """
        A body follows an admitted head: start its pace, and hold it while
        ``before_body`` decides.

        :return: whether the decision (now or later) finishes the head's
            handling, which must then not be done again.
        """
        self._body_clock = BodyClock(admitted.pace, self.site.reactor.seconds())
        self._pace_call = self.callLater(admitted.pace.grace, self._check_pace)
        before_body = self.before_body
        if before_body is None:
            return False
        decision = before_body(admitted)
        if decision is None:
            return False
        self._held = []
        self._pause_reading()
        decision.addCallbacks(self._body_decided, self._body_check_failed)
        return True

    def _body_decided(self, refused) -> None:
        held, self._held = self._held, None
        self._held_size = 0
        if self._lost or self._refused:
            return
        self._resume_reading()
        if refused is not None:
            self.refuse(refused)
            return
        HTTPChannel.allHeadersReceived(self)
        if held:
            self.rawDataReceived(b"".join(held))

    def _body_check_failed(self, failure) -> None:
        # the resource makes the same check and answers the error itself
        log.failure("checking a request before its body failed", failure)
        self._body_decided(None)

    def _pause_reading(self) -> None:
        pause = getattr(self.transport, "pause_reading", None)
        if pause is not None:
            pause()  # a lent connection: the lender reads
        else:
            self.transport.pauseProducing()

    def _resume_reading(self) -> None:
        resume = getattr(self.transport, "resume_reading", None)
        if resume is not None:
            resume()
        else:
            self.transport.resumeProducing()

    def _check_pace(self) -> None:
        self._pace_call = None
        clock = self._body_clock
        if clock is None or self._refused:
            return
        left = clock.check(self.site.reactor.seconds())
        if left is None:
            self.refuse(BODY_TIMED_OUT)
        else:
            self._pace_call = self.callLater(left, self._check_pace)

    def _stop_pace(self) -> None:
        self._body_clock = None
        call, self._pace_call = self._pace_call, None
        if call is not None and call.active():
            call.cancel()

    # -- refusing ----------------------------------------------------------------------

    def refuse(self, refused: Refused) -> None:
        """Answer ``refused`` at once and close the connection, leaving the rest of the request unread."""
        if self._refused:
            return
        self._refused = True
        self._cancel_head_call()
        self._stop_pace()
        # the abort timer below is the connection's last one
        self.setTimeout(None)
        self.persistent = False
        transport = self.transport
        log.info(
            "refused {method} {target} from {peer}: {status} {reason}",
            method=getattr(self, "_command", b"-"),
            target=getattr(self, "_path", b"-"),
            peer=str(transport.getPeer()),
            status=refused.status,
            reason=refused.reason,
        )
        transport.write(refusal_response(getattr(self, "_version", b"HTTP/1.1"), refused, self.site.date()))
        if self.abortTimeout is not None and self._abortingCall is None:
            # a client that does not read the answer must not keep the connection
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)
        self.loseConnection()

    def connectionLost(self, reason) -> None:
        self._lost = True
        self._cancel_head_call()
        self._stop_pace()
        super().connectionLost(reason)

    # -- lending --------------------------------------------------------------------------

    def requestDone(self, request) -> None:
        super().requestDone(request)
        returned = self.returned
        if returned is not None and self.persistent and not self.requests:
            self.returned = None
            # The idle timeout belongs to the lender again.
            self.setTimeout(None)
            returned()
