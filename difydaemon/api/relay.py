"""
The life of an HTTP response that waits on one plugin session: the
session's handle, the backstop timeout and the client's disconnection.

Dispatch (:mod:`difydaemon.api.dispatch`) and public endpoints
(:mod:`difydaemon.api.endpoint`) answer differently (SSE or JSON, raw
HTTP) but end their sessions the same way; this is that shared part.
"""

from __future__ import annotations


class SessionRelay:
    """
    A response waiting on a plugin session.

    Subclasses implement :meth:`session_timed_out` (what the response says
    when the backstop timeout fires).

    :ivar handle: the open session's handle (``close()`` abandons it), or
        None.
    :ivar closed: True once the response is finished or the client has
        gone.
    :ivar retry_call: a pending look for a runtime, cancelled with the
        timeout.
    """

    __slots__ = ("_reactor", "handle", "closed", "retry_call", "_timer")

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self.handle = None
        self.closed = False
        self.retry_call = None
        self._timer = None

    def opened(self, handle, timeout: float | None) -> None:
        """The session is open; time it out after ``timeout`` seconds (None: never)."""
        if self.closed:
            # the session ended while it was being opened
            return
        self.handle = handle
        if timeout is not None:
            self._timer = self._reactor.callLater(timeout, self.timed_out)

    def client_gone(self, failure) -> None:
        """The client disconnected: abandon the session or the wait."""
        if self.closed:
            return
        self.closed = True
        self._stop_timers()
        self._abandon()

    def timed_out(self) -> None:
        """The backstop timeout fired: abandon the session and say so."""
        self._timer = None
        if not self.closed:
            self._abandon()
            self.session_timed_out()

    def session_timed_out(self) -> None:
        """Answer the client after the backstop timeout."""
        raise NotImplementedError

    def _abandon(self) -> None:
        handle, self.handle = self.handle, None
        if handle is not None:
            handle.close()

    def _stop_timers(self) -> None:
        call, self.retry_call = self.retry_call, None
        if call is not None and call.active():
            call.cancel()
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
