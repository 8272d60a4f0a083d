"""
The open invocation sessions of one plugin connection or process.

A :class:`SessionTable` routes decoded session messages to their
:class:`~difydaemon.interfaces.ISessionListener`, times sessions out, and
fails every open session at once when the plugin behind it goes away, so
that no caller waits for an answer that cannot come (``runtimes.md`` §0.4,
§0.6 and §1.7).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from difydaemon import errors
from difydaemon.runtimes.codec import SessionMessage

TIMEOUT_ERROR_TYPE = errors.InternalServerError.error_type
TIMEOUT_MESSAGE = "killed by timeout"
#: the error_type of sessions a stop cuts off with a reason (the caller
#: sees the reason itself as the -500 message)
STOPPED_ERROR_TYPE = errors.InternalServerError.error_type
UNKNOWN_TYPE_ERROR_TYPE = "unknown_stream_message_type"


class _Session:
    __slots__ = ("session_id", "listener", "timer")

    def __init__(self, session_id, listener, timer) -> None:
        self.session_id = session_id
        self.listener = listener
        self.timer = timer


class SessionHandle:
    """
    The caller's hold on one open session.

    :meth:`close` abandons it (the HTTP client went away): the listener is
    removed and told nothing more.
    """

    __slots__ = ("session_id", "_table", "_session")

    def __init__(self, table: SessionTable, session: _Session) -> None:
        self.session_id = session.session_id
        self._table = table
        self._session = session

    @property
    def is_open(self) -> bool:
        """Whether the session still receives messages."""
        return self._table._sessions.get(self.session_id) is self._session

    def close(self) -> None:
        """Stop routing to the listener; calling it again does nothing."""
        if self.is_open:
            self._table._finish(self._session)
            self._table._notify_if_drained()


class SessionTable:
    """
    Open sessions by id, each with its listener and its timeout.

    Exactly one of the listener's ``end`` or ``error`` is called, once and
    last; messages that arrive afterwards for the same id (the ``end`` the
    SDK sends after every ``error``, chunks after a timeout) find no session
    and are dropped.

    :param reactor: an ``IReactorTime`` for the timeouts.
    :param default_timeout: seconds before an open session fails with
        "killed by timeout" (``PLUGIN_MAX_EXECUTION_TIMEOUT``); None for
        none.
    :param on_empty: called (no arguments) each time the last open session
        ends (the owner's idle and scale-down clocks start then).
    """

    log = Logger()

    def __init__(self, reactor, default_timeout: float | None, on_empty=None) -> None:
        self._reactor = reactor
        self._default_timeout = default_timeout
        self._on_empty = on_empty
        self._sessions: dict[str, _Session] = {}
        self._drain_waiters: list[Deferred] = []

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def open(self, session_id: str, listener, timeout: float | None = None) -> SessionHandle:
        """
        Route the messages of ``session_id`` to ``listener`` from now on.

        :param timeout: seconds, instead of the table's default.
        :raises ValueError: if that session id is already open.
        """
        if session_id in self._sessions:
            raise ValueError(f"session {session_id} is already open")
        if timeout is None:
            timeout = self._default_timeout
        session = _Session(session_id, listener, None)
        if timeout is not None:
            session.timer = self._reactor.callLater(timeout, self._expire, session)
        self._sessions[session_id] = session
        return SessionHandle(self, session)

    def deliver(self, item: SessionMessage) -> None:
        """Hand one session message to its listener."""
        session = self._sessions.get(item.session_id)
        if session is None:
            self.log.debug(
                "dropped {kind} message for unknown session {session_id}",
                kind=item.kind,
                session_id=item.session_id,
            )
            return
        kind = item.kind
        listener = session.listener
        try:
            if kind == "stream":
                listener.stream(item.data, item.raw_data)
                return
            if kind == "invoke":
                listener.invoke(item.data)
                return
        except Exception:
            self.log.failure(
                "session listener failed on {kind} of session {session_id}",
                kind=kind,
                session_id=item.session_id,
            )
            return
        self._finish(session)
        if kind == "end":
            self._call(session, "end")
        elif kind == "error":
            error_type, message, args = plugin_error_fields(item.data)
            self._call(session, "error", error_type, message, args)
        else:
            self._call(
                session,
                "error",
                UNKNOWN_TYPE_ERROR_TYPE,
                f"unknown stream message type: {kind}",
                None,
            )
        self._notify_if_drained()

    def fail_all(self, error_type: str, message: str) -> None:
        """Fail every open session now with the same error."""
        sessions = list(self._sessions.values())
        for session in sessions:
            self._finish(session)
        for session in sessions:
            self._call(session, "error", error_type, message, None)
        self._notify_if_drained()

    def drained(self) -> Deferred:
        """A Deferred that fires (with None) once no session is open."""
        waiter: Deferred = Deferred()
        if self._sessions:
            self._drain_waiters.append(waiter)
        else:
            waiter.callback(None)
        return waiter

    def _expire(self, session: _Session) -> None:
        session.timer = None
        if self._sessions.get(session.session_id) is not session:
            return
        self._finish(session)
        self._call(session, "error", TIMEOUT_ERROR_TYPE, TIMEOUT_MESSAGE, None)
        self._notify_if_drained()

    def _finish(self, session: _Session) -> None:
        del self._sessions[session.session_id]
        timer = session.timer
        if timer is not None:
            session.timer = None
            timer.cancel()

    def _notify_if_drained(self) -> None:
        if self._sessions:
            return
        if self._drain_waiters:
            waiters, self._drain_waiters = self._drain_waiters, []
            for waiter in waiters:
                waiter.callback(None)
        if self._on_empty is not None:
            try:
                self._on_empty()
            except Exception:
                self.log.failure("the on_empty hook of a session table failed")

    def _call(self, session: _Session, method: str, *args) -> None:
        try:
            getattr(session.listener, method)(*args)
        except Exception:
            self.log.failure(
                "session listener failed on {method} of session {session_id}",
                method=method,
                session_id=session.session_id,
            )


class SessionDrain:
    """
    Waits for the open sessions of some tables to finish, up to a deadline,
    then calls ``done()`` once.

    A runtime that stops uses one: a later :meth:`limit` can only bring the
    deadline forward (an uninstall's long drain overtaken by a daemon
    shutdown must not keep the shutdown waiting) and can give the reason
    the sessions still open at the deadline are failed with, so that their
    callers read why instead of seeing their streams cut.

    :param reactor: an ``IReactorTime``.
    :param tables: the :class:`SessionTable` objects to drain.
    :param done: called with no arguments when the drain is over.
    """

    def __init__(self, reactor, tables, done) -> None:
        self._reactor = reactor
        self._open = [table for table in tables if len(table)]
        self._done = done
        self._timer = None
        self._reason: str | None = None
        #: whether ``done`` has been called
        self.finished = False

    @property
    def open_sessions(self) -> int:
        """How many sessions are still open."""
        return sum(len(table) for table in self._open)

    def start(self, timeout: float | None, reason: str | None = None) -> None:
        """Begin: finish at once when nothing is open, else wait (see :meth:`limit`)."""
        if not self._open:
            self._finish()
            return
        for table in list(self._open):
            table.drained().addCallback(self._table_drained, table)
        self.limit(timeout, reason)

    def limit(self, timeout: float | None, reason: str | None = None) -> None:
        """
        Finish at the latest ``timeout`` seconds from now (None: no new
        limit); sessions still open then are failed with ``reason`` when
        one was given, and left to their runtime otherwise.
        """
        if self.finished:
            return
        if reason is not None:
            self._reason = reason
        if timeout is None:
            return
        timer = self._timer
        if timer is not None:
            if timer.getTime() <= self._reactor.seconds() + timeout:
                return
            timer.cancel()
        self._timer = self._reactor.callLater(timeout, self._expired)

    def _table_drained(self, _, table) -> None:
        if table in self._open:
            self._open.remove(table)
            if not self._open:
                self._finish()

    def _expired(self) -> None:
        self._timer = None
        if self._reason is not None:
            for table in list(self._open):
                table.fail_all(STOPPED_ERROR_TYPE, self._reason)
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._done()


def plugin_error_fields(data) -> tuple[str, str, dict | None]:
    """The (error_type, message, args) of a plugin's ``error`` message."""
    if not isinstance(data, dict):
        return "unknown_error", str(data), None
    error_type = data.get("error_type")
    message = data.get("message")
    args = data.get("args")
    return (
        error_type if isinstance(error_type, str) else "unknown_error",
        message if isinstance(message, str) else str(message),
        args if isinstance(args, dict) else None,
    )
