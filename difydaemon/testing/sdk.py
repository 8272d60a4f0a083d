"""
Shared helpers for tests that run the real ``dify_plugin`` SDK.

Such tests build real uv venvs.  They stay fast because every test run
shares one uv cache directory (``$DIFYDAEMON_TEST_UV_CACHE``, else
``~/.cache/difydaemon-tests/uv``): after the first run, installing the SDK
is a warm-cache link of about a second.

Nothing here touches the global reactor; the async helpers take it.
"""

from __future__ import annotations

import os
import subprocess

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest

from difydaemon.runtimes.child_environment import plugin_environment
from difydaemon.runtimes.environment import (
    DEFAULT_RUNNER_VERSION,
    PythonEnvironmentBuilder,
    find_uv,
    interpreter_candidates,
)

UV_CACHE_VARIABLE = "DIFYDAEMON_TEST_UV_CACHE"
SDK_REQUIREMENT = "dify_plugin>=0.10.0,<0.11.0"


def test_uv_cache_dir(environ=None) -> str:
    """
    The uv cache shared by every test run on this machine (created if missing).

    ``$DIFYDAEMON_TEST_UV_CACHE`` when set, else ``~/.cache/difydaemon-tests/uv``.
    """
    environ = os.environ if environ is None else environ
    path = environ.get(UV_CACHE_VARIABLE) or os.path.join(
        os.path.expanduser("~"), ".cache", "difydaemon-tests", "uv"
    )
    os.makedirs(path, exist_ok=True)
    return path


# Not a test, whatever its name says.
test_uv_cache_dir.__test__ = False


def _probe(candidate: str, version: str) -> bool:
    # Test set-up may block: it runs before the reactor does anything.
    try:
        result = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.decode().strip() == version


_found: dict[str, str] = {}


def python_interpreter(version: str, environ=None) -> str:
    """
    A Python ``version`` interpreter on this machine, for tests.

    :raises SkipTest: when there is none, unless ``$CI`` is set.
    :raises RuntimeError: when there is none and ``$CI`` is set: CI machines
        must have it, and a skipped SDK test there would hide a broken setup.
    """
    environ = os.environ if environ is None else environ
    if version in _found:
        return _found[version]
    for candidate in interpreter_candidates(version, environ):
        if _probe(candidate, version):
            _found[version] = candidate
            return candidate
    reason = f"no Python {version} interpreter on this machine (PATH, pyenv, /usr/bin, /usr/local/bin)"
    if environ.get("CI"):
        raise RuntimeError(reason)
    raise SkipTest(reason)


def python312(environ=None) -> str:
    """The Python 3.12 interpreter the SDK needs (see :func:`python_interpreter`)."""
    return python_interpreter(DEFAULT_RUNNER_VERSION, environ)


def environment_builder(reactor, **overrides) -> PythonEnvironmentBuilder:
    """
    A :class:`PythonEnvironmentBuilder` for tests: the shared uv cache, the
    daemon's own uv, the machine's 3.12 as ``PYTHON_INTERPRETER_PATH``, no
    verbose output; ``overrides`` replace any constructor argument.
    """
    arguments = dict(
        uv_path=find_uv(None),
        uv_cache_dir=test_uv_cache_dir(),
        pip_verbose=False,
        init_timeout=120.0,
        total_timeout=600.0,
        python_interpreter_path=python312(),
    )
    arguments.update(overrides)
    return PythonEnvironmentBuilder(reactor, **arguments)


class _FirstHeartbeat(ProcessProtocol):
    def __init__(self, reactor, started: float) -> None:
        self.heartbeat: Deferred[float] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._reactor = reactor
        self._started = started
        self._buffer = b""
        self._stderr = b""

    def outReceived(self, data: bytes) -> None:
        if self.heartbeat.called:
            return
        self._buffer += data
        lines = self._buffer.split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            if b'"heartbeat"' in line:
                self.heartbeat.callback(self._reactor.seconds() - self._started)
                self._stop()
                return

    def errReceived(self, data: bytes) -> None:
        self._stderr = (self._stderr + data)[-4096:]

    def _stop(self) -> None:
        # The SDK ignores stdin EOF; it has to be killed.
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass

    def processEnded(self, reason) -> None:
        self.ended.callback(None)
        if not self.heartbeat.called:
            self.heartbeat.errback(
                RuntimeError(
                    f"plugin ended before its first heartbeat: {reason.value}; "
                    f"stderr: {self._stderr.decode('utf-8', 'replace')}"
                )
            )


async def seconds_to_first_heartbeat(reactor, venv_python: str, working_dir: str, timeout: float = 60.0) -> float:
    """
    Start the plugin in ``working_dir`` as the local runtime does
    (``<venv python> -m main``, the allow-listed environment,
    ``INSTALL_METHOD=local``), wait for its first
    heartbeat line on stdout, kill it, and return the seconds it took.

    :raises RuntimeError: when it exits first, or stays silent for ``timeout`` seconds.
    """
    protocol = _FirstHeartbeat(reactor, reactor.seconds())
    env = dict(plugin_environment(os.environ), INSTALL_METHOD="local")
    transport = reactor.spawnProcess(protocol, venv_python, [venv_python, "-m", "main"], env=env, path=working_dir)

    def too_slow() -> None:
        if not protocol.heartbeat.called:
            protocol.heartbeat.errback(RuntimeError(f"no heartbeat within {timeout:g} s"))
            protocol._stop()

    timer = reactor.callLater(timeout, too_slow)
    try:
        return await protocol.heartbeat
    finally:
        if timer.active():
            timer.cancel()
        try:
            transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        # Leave no process or pipe behind for trial's dirty-reactor check.
        await protocol.ended
