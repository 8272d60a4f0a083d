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
- admits the request once its head is read (canonical target, key, body
  bound), and otherwise answers at once and closes, its body unread;
- can serve a single request on a connection lent by
  :class:`~difydaemon.api.dispatch_channel.DispatchChannel`.

:class:`DaemonRequest` routes on the canonical target the admission saw,
and counts its body against the admitted bound as it arrives (a chunked
body has no declared length).
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.web.http import HTTPChannel
from twisted.web.server import Request

from difydaemon.api.admission import (
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
            over = received - admission.body_limit
            if over > 0:
                if not admission.truncate:
                    self.channel.refuse(admission.oversize)
                    return
                data = data[: max(0, len(data) - over)]
                if not data:
                    return
        self.content.write(data)

    #: ``reactor.seconds()`` when the request's head and body were read
    received_at = None

    def process(self) -> None:
        reactor = getattr(self.channel.factory, "reactor", None) if self.channel is not None else None
        if reactor is not None:
            self.received_at = reactor.seconds()
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
    """

    #: no line is longer than a whole head (LineReceiver's bound)
    MAX_LENGTH = MAX_HEAD_SIZE
    front_door = None
    returned = None
    head_timeout = HEAD_TIMEOUT

    def __init__(self) -> None:
        super().__init__()
        self._refused = False
        self._head_call = None
        # lines and bytes (line ends included) of the head being read
        self._head_lines = 0
        self._head_size = 0

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
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line longer than a whole head: LineReceiver would close without a word."""
        self.refuse(URI_TOO_LONG if self._head_lines == 0 else HEADERS_TOO_LARGE)

    def _head_pending(self) -> None:
        """Part of a head has arrived: bound what is buffered, and start its deadline."""
        pending = len(self._buffer)
        # a pending line may still lack its final "\n"
        if self._head_lines == 0 and pending > MAX_REQUEST_LINE + 1:
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
            keys = request.requestHeaders.getRawHeaders(b"x-api-key")
            verdict = front_door.admit(self._command, self._path, keys[0] if keys else None, self.length)
            if type(verdict) is Refused:
                self.refuse(verdict)
                return
            request.admission = verdict
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self._refused:
            super().allContentReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    # -- refusing ----------------------------------------------------------------------

    def refuse(self, refused: Refused) -> None:
        """Answer ``refused`` at once and close the connection, leaving the rest of the request unread."""
        if self._refused:
            return
        self._refused = True
        self._cancel_head_call()
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
        self._cancel_head_call()
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
