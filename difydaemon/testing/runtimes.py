"""
A fake plugin runtime for tests and benchmarks of whatever opens sessions.

:class:`FakeRuntime` implements IPluginRuntime without any process: it
records the sessions opened and the messages sent, and the test plays the
plugin's part by pushing ``stream``, ``end``, ``error`` and ``invoke``
messages into a session -- or scripts replies that are played back when a
session opens.  Sessions go through the real
:class:`~difydaemon.runtimes.sessions.SessionTable`, so ``end``/``error``
are delivered once and last, timeouts fire, and ``close()`` behaves as on
the real runtimes.
"""

from __future__ import annotations

import orjson
from twisted.internet.defer import succeed
from zope.interface import implementer

from difydaemon import errors
from difydaemon.interfaces import IPluginRuntime
from difydaemon.runtimes.codec import SessionMessage
from difydaemon.runtimes.sessions import SessionTable

NOT_READY_MESSAGE = "failed to get plugin runtime"
STOPPED_MESSAGE = "plugin runtime stopped"


@implementer(IPluginRuntime)
class FakeRuntime:
    """
    An in-memory IPluginRuntime.

    :param reactor: an ``IReactorTime`` (a ``Clock`` in tests) for session
        timeouts and scripted replies.
    :param plugin_unique_identifier: the identifier it serves.
    :param ready: whether sessions can be opened now (see :attr:`ready`).
    :param session_timeout: seconds before an open session fails with
        "killed by timeout", as ``PLUGIN_MAX_EXECUTION_TIMEOUT`` does on the
        real runtimes; None for none.
    :param runtime_type: what :attr:`runtime_type` says.
    :param declaration: the plugin's declaration (its permissions).

    :ivar ready: set it to make the runtime (not) ready; becoming ready
        calls :attr:`on_ready`, as a real runtime's restarted instance does.
    :ivar on_ready: called with the runtime when :attr:`ready` becomes
        true (its registry sets it), or None.
    :ivar stop_calls: the ``(drain_timeout, reason)`` of every :meth:`stop`.
    :ivar requests: every request a session was opened with, in order.
    :ivar sent: ``(session_id, message)`` for every :meth:`send`.
    :ivar refusals: how many :meth:`open_session` calls were refused.
    :ivar stopped: whether :meth:`stop` was called.
    """

    def __init__(
        self,
        reactor,
        plugin_unique_identifier: str,
        ready: bool = True,
        session_timeout: float | None = None,
        runtime_type: str = "local",
        declaration: dict | None = None,
    ) -> None:
        self._reactor = reactor
        self.plugin_unique_identifier = plugin_unique_identifier
        self.declaration = declaration if declaration is not None else {}
        self.runtime_type = runtime_type
        self.on_ready = None
        self._ready = ready
        self.stop_calls: list[tuple] = []
        self.session_timeout = session_timeout
        self.sessions = SessionTable(reactor, session_timeout)
        self.requests: list[dict] = []
        self.sent: list[tuple[str, dict]] = []
        self.refusals = 0
        self.stopped = False
        self._scripts: dict = {}
        self._default_script = None

    @property
    def ready(self) -> bool:
        """Whether sessions may be opened (unless stopped)."""
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        was_ready, self._ready = self._ready, value
        if value and not was_ready and self.on_ready is not None:
            self.on_ready(self)

    # -- IPluginRuntime --------------------------------------------------

    def is_ready(self) -> bool:
        """True when sessions can be opened."""
        return self.ready and not self.stopped

    def open_session(self, session_id: str, request: dict, listener):
        """
        Record ``request`` and route the session to ``listener``; play the
        script for its action, if any, one reactor turn later.

        :raises difydaemon.errors.InternalServerError: when not ready.
        """
        if not self.is_ready():
            self.refusals += 1
            raise errors.InternalServerError(NOT_READY_MESSAGE)
        handle = self.sessions.open(session_id, listener)
        self.requests.append(request)
        script = self._script_for(request)
        if script is not None:
            self._reactor.callLater(0, self._play, session_id, script(request))
        return handle

    def send(self, session_id: str, message: dict) -> None:
        """
        Record one daemon -> plugin message.

        :raises difydaemon.errors.ConnectionClosedError: if the session is
            not open.
        """
        if session_id not in self.sessions:
            raise errors.ConnectionClosedError(f"plugin session {session_id} is not open")
        self.sent.append((session_id, message))

    def stop(self, drain_timeout=None, reason=None):
        """
        Refuse new sessions and fail the open ones at once (with ``reason``
        as a -500 when given). Deferred[None].
        """
        self.stopped = True
        self.stop_calls.append((drain_timeout, reason))
        if reason is None:
            self.sessions.fail_all(errors.ConnectionClosedError.error_type, STOPPED_MESSAGE)
        else:
            self.sessions.fail_all(errors.InternalServerError.error_type, reason)
        return succeed(None)

    # -- playing the plugin ------------------------------------------------

    @property
    def session_ids(self) -> list[str]:
        """The session ids of :attr:`requests`, in order."""
        return [request["session_id"] for request in self.requests]

    @property
    def last_session_id(self) -> str:
        """The id of the most recently opened session."""
        return self.requests[-1]["session_id"]

    def is_open(self, session_id: str) -> bool:
        """Whether that session still routes messages to its listener."""
        return session_id in self.sessions

    def stream(self, session_id: str, chunk, raw: bytes | None = None) -> None:
        """
        The plugin streams one chunk; ``raw`` defaults to its compact JSON
        (as the stdio decoder hands it on).
        """
        if raw is None:
            raw = orjson.dumps(chunk)
        self.sessions.deliver(SessionMessage(session_id, "stream", chunk, raw))

    def end(self, session_id: str) -> None:
        """The plugin ends the session."""
        self.sessions.deliver(SessionMessage(session_id, "end", {}, None))

    def error(self, session_id: str, error_type: str, message: str, args: dict | None = None) -> None:
        """The plugin reports an error (the SDK's ``error`` session message)."""
        data = {"error_type": error_type, "message": message, "args": args}
        self.sessions.deliver(SessionMessage(session_id, "error", data, None))

    def invoke(self, session_id: str, request: dict) -> None:
        """The plugin asks for a backwards invocation."""
        self.sessions.deliver(SessionMessage(session_id, "invoke", request, None))

    def deliver(self, session_id: str, kind: str, data) -> None:
        """Any session message, e.g. one of an unknown kind."""
        raw = orjson.dumps(data) if kind == "stream" else None
        self.sessions.deliver(SessionMessage(session_id, kind, data, raw))

    # -- scripts -----------------------------------------------------------------

    def script(self, action: str | None, replies) -> None:
        """
        Answer every session of ``action`` (every session when None and no
        action-specific script applies) with ``replies``: a list of
        ``(kind, data)`` pairs -- ``("stream", chunk)``, ``("end", {})``,
        ``("error", {"error_type", "message", "args"})``, ``("invoke",
        request)`` -- or a function of the request returning such a list.
        """
        make = replies if callable(replies) else (lambda request, replies=list(replies): replies)
        if action is None:
            self._default_script = make
        else:
            self._scripts[action] = make

    def _script_for(self, request: dict):
        data = request.get("data")
        action = data.get("action") if isinstance(data, dict) else None
        return self._scripts.get(action, self._default_script)

    def _play(self, session_id: str, replies) -> None:
        for kind, data in replies:
            if session_id not in self.sessions:
                return
            self.deliver(session_id, kind, data)
