"""
Real SDK plugins as serverless functions, for end-to-end tests of the
serverless runtime: a launcher for :class:`~difydaemon.testing.sri.FakeSRIConnector`
that builds each launched package's venv (with the shared test uv cache)
and runs it as the SDK's serverless mode does (``serverless.md`` §8, §9.1):
``python -m <entrypoint>`` with ``INSTALL_METHOD=serverless``, on a free
loopback port, calling back to ``DIFY_PLUGIN_DAEMON_URL``.
"""

from __future__ import annotations

import os
import socket

import yaml
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from difydaemon.packaging.archive import extract_package, read_package
from difydaemon.runtimes.child_environment import plugin_environment
from difydaemon.runtimes.serverless.connector import FunctionInfo
from difydaemon.testing.sdk import environment_builder

log = Logger()


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FunctionProcess(ProcessProtocol):
    """One running function: its output is kept (the function's log), its end awaited."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.output = b""
        self.ended: Deferred = Deferred()

    @property
    def url(self) -> str:
        """The function URL."""
        return f"http://127.0.0.1:{self.port}"

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-65536:]

    errReceived = outReceived

    def processEnded(self, reason) -> None:
        self.ended.callback(None)

    def kill(self) -> Deferred:
        """SIGKILL the function; fires when it is gone."""
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        waiter: Deferred = Deferred()
        self.ended.addBoth(lambda result: (waiter.callback(None), result)[1])
        return waiter


class SDKFunctionLauncher:
    """
    A :class:`FakeSRIConnector` launcher that runs real SDK functions.

    :param reactor: the real reactor.
    :param workdir: where packages are unpacked (one directory per checksum).
    :param daemon_url: the daemon's base URL, the functions' ``DIFY_PLUGIN_DAEMON_URL``.
    :param environ: extra variables for the functions.

    :ivar processes: function name -> :class:`FunctionProcess`, the latest of each.
    """

    def __init__(self, reactor, workdir: str, daemon_url: str, environ: dict | None = None) -> None:
        self._reactor = reactor
        self._workdir = workdir
        self.daemon_url = daemon_url
        self._environ = dict(environ or {})
        self._builder = environment_builder(reactor, prepared_venvs_dir=os.path.join(workdir, ".prepared"))
        self.processes: dict[str, FunctionProcess] = {}
        self._all: list[FunctionProcess] = []
        self._pythons: dict[str, tuple[str, str, str]] = {}

    def __call__(self, request, emit) -> Deferred:
        return Deferred.fromCoroutine(self._launch(request, emit))

    async def _launch(self, request, emit) -> FunctionInfo:
        checksum = request.filename.rsplit("@", 1)[-1].replace(".difypkg", "")
        name = "fn-" + checksum[:16]
        if checksum not in self._pythons:
            directory = os.path.join(self._workdir, checksum)
            if not os.path.isdir(directory):
                emit("build", "running", "unpacking")
                extract_package(read_package(request.package, 50 * 1024 * 1024), directory)
            with open(os.path.join(directory, "manifest.yaml"), "rb") as f:
                runner = (yaml.safe_load(f).get("meta") or {}).get("runner") or {}
            python = await self._builder.build(
                directory, str(runner.get("version") or "3.12"), lambda line: emit("build", "running", line)
            )
            self._pythons[checksum] = (python, directory, str(runner.get("entrypoint") or "main"))
        emit("run", "running", "starting")
        process = await self.start(name, checksum)
        return FunctionInfo(name, process.url)

    async def start(self, name: str, checksum: str) -> FunctionProcess:
        """(Re)start the function of a built package and wait for its ``/health``."""
        python, directory, entrypoint = self._pythons[checksum]
        port = free_port()
        env = dict(plugin_environment(os.environ))
        env.update(
            INSTALL_METHOD="serverless",
            SERVERLESS_HOST="127.0.0.1",
            SERVERLESS_PORT=str(port),
            DIFY_PLUGIN_DAEMON_URL=self.daemon_url,
            **self._environ,
        )
        process = FunctionProcess(name, port)
        self._reactor.spawnProcess(process, python, [python, "-m", entrypoint], env=env, path=directory)
        self.processes[name] = process
        self._all.append(process)
        await self._healthy(process)
        return process

    async def restart(self, name: str) -> FunctionProcess:
        """Start a killed function again on its old port's successor; the URL changes."""
        checksum = next(c for c in self._pythons if "fn-" + c[:16] == name)
        return await self.start(name, checksum)

    async def _healthy(self, process: FunctionProcess, timeout: float = 60.0) -> None:
        # a connection per check: nothing left open for trial's clean-reactor check
        http = HTTPClient(Agent(self._reactor, pool=HTTPConnectionPool(self._reactor, persistent=False)))
        deadline = self._reactor.seconds() + timeout
        while True:
            if process.ended.called:
                raise RuntimeError(f"function {process.name} exited: {process.output[-2000:].decode('utf-8', 'replace')}")
            try:
                response = await http.get(process.url + "/health")
                await response.content()
                if response.code == 200:
                    return
            except Exception:
                pass
            if self._reactor.seconds() > deadline:
                raise RuntimeError(f"function {process.name} not healthy within {timeout:g} s")
            await deferLater(self._reactor, 0.1, lambda: None)

    def stop_all(self) -> Deferred:
        """Kill every function started; fires when all are gone."""
        return DeferredList([process.kill() for process in self._all], consumeErrors=True)
