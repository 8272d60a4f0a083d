"""A recording ISessionListener shared by the runtime tests."""

from __future__ import annotations

from zope.interface import implementer

from difydaemon.interfaces import ISessionListener


@implementer(ISessionListener)
class RecordingListener:
    """
    Records every call as a tuple: ``("stream", chunk, raw)``,
    ``("invoke", request)``, ``("end",)``, ``("error", type, message, args)``.
    """

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list[tuple] = []
        self._fail_on = fail_on

    def _record(self, call: tuple) -> None:
        self.calls.append(call)
        if call[0] == self._fail_on:
            raise RuntimeError(f"listener fails on {call[0]}")

    def stream(self, chunk, raw):
        self._record(("stream", chunk, raw))

    def invoke(self, request):
        self._record(("invoke", request))

    def end(self):
        self._record(("end",))

    def error(self, error_type, message, args):
        self._record(("error", error_type, message, args))

    @property
    def finished(self) -> bool:
        """Whether end or error was called."""
        return any(call[0] in ("end", "error") for call in self.calls)
