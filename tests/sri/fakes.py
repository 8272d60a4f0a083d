"""Fakes for the SRI connector's unit tests: a venv builder and a health probe."""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, fail, succeed

from difydaemon.errors import InternalServerError


class FakeBuilder:
    """
    A ``PythonEnvironmentBuilder`` stand-in: records each build, reports two
    progress lines, and answers with the venv's python, or with ``error``.

    :ivar hold: when True, builds wait until :meth:`release`.
    """

    def __init__(self, error: str | None = None) -> None:
        self.error = error
        self.builds: list[tuple[str, str | None]] = []
        self.hold = False
        self._held: list[tuple[Deferred, str]] = []

    def build(self, working_dir, runner_version, progress):
        self.builds.append((working_dir, runner_version))
        progress("creating venv with Python 3.12")
        progress("installing dependencies from requirements.txt")
        python = os.path.join(working_dir, ".venv", "bin", "python")
        if self.hold:
            waiter: Deferred = Deferred()
            self._held.append((waiter, python))
            return waiter
        if self.error is not None:
            return fail(InternalServerError(self.error))
        return succeed(python)

    def release(self) -> None:
        """Let held builds finish."""
        held, self._held = self._held, []
        for waiter, python in held:
            waiter.callback(python)


class FakeProbe:
    """
    A health probe: answers ``healthy`` for every URL, recording each.

    :ivar healthy: what the next checks answer.
    """

    def __init__(self, healthy: bool = True) -> None:
        self.healthy = healthy
        self.checked: list[str] = []

    def __call__(self, url: str) -> Deferred:
        self.checked.append(url)
        return succeed(self.healthy)


class Ports:
    """Hands out 41000, 41001, ...; records what was taken at each call."""

    def __init__(self) -> None:
        self.next = 41000
        self.taken: list[set[int]] = []

    def __call__(self, host: str, taken: set[int]) -> int:
        self.taken.append(set(taken))
        port = self.next
        self.next += 1
        return port
