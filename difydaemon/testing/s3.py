"""
An S3-compatible server of a test's own: ``moto`` in server mode on a free
loopback port, started by the test itself (no service to set up before
``python -m twisted.trial``).

moto keeps everything in memory, so a restarted server is empty: a test
that restarts it makes its bucket again.  With ``require_auth`` every
request must be signed by a user moto knows, and there are none: the way
to meet credentials a store refuses.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile

from twisted.internet.task import deferLater

from difydaemon.runtimes.parent_death import child_argv, parent_death_signal
from difydaemon.testing.postgres import free_port

#: what the test stores sign with (moto takes any keys unless ``require_auth``)
ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"


def answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether an HTTP server answers at ``host:port`` now (blocking, loopback only)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET /moto-api/ HTTP/1.0\r\n\r\n")
            return s.recv(12).startswith(b"HTTP/")
    except OSError:
        return False


class MotoServer:
    """
    One ``moto_server`` process.

    :param reactor: for waiting.
    :param require_auth: refuse every request (no IAM user exists).
    :ivar port: its TCP port on 127.0.0.1.
    """

    host = "127.0.0.1"

    def __init__(self, reactor, require_auth: bool = False) -> None:
        self._reactor = reactor
        self.port = free_port()
        self._require_auth = require_auth
        self._log = tempfile.NamedTemporaryFile(prefix="difydaemon-moto-", suffix=".log", delete=False)
        self._process: subprocess.Popen | None = None
        self._destroyed = False
        self.frozen = False
        atexit.register(self.destroy)

    @property
    def endpoint(self) -> str:
        """The server's URL (``S3_ENDPOINT``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def server_log(self) -> str:
        """What the server printed (for failure messages)."""
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    async def start(self, timeout: float = 60.0) -> None:
        """Start the server (again, empty) and wait until it answers."""
        if self._destroyed:
            raise RuntimeError("this server has been destroyed")
        if self.running:
            return
        environ = dict(os.environ)
        if self._require_auth:
            environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        argv = [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]
        self._process = subprocess.Popen(
            child_argv(parent_death_signal(), argv),
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=environ,
        )
        waited = 0.0
        while not answers(self.host, self.port):
            if not self.running or waited > timeout:
                raise RuntimeError(f"moto_server did not start on port {self.port}:\n{self.server_log()}")
            await deferLater(self._reactor, 0.05, lambda: None)
            waited += 0.05

    async def stop(self) -> None:
        """Kill the server and wait until it is gone; the port stays free for a restart."""
        if self.frozen:
            self.thaw()
        if self.running:
            self._process.kill()
            while self.running:
                await deferLater(self._reactor, 0.02, lambda: None)

    def freeze(self) -> None:
        """``SIGSTOP`` the server: it accepts TCP connections but never answers."""
        if self.running:
            os.kill(self._process.pid, signal.SIGSTOP)
            self.frozen = True

    def thaw(self) -> None:
        """``SIGCONT`` what :meth:`freeze` stopped."""
        if self._process is not None and self.frozen:
            os.kill(self._process.pid, signal.SIGCONT)
        self.frozen = False

    def destroy(self) -> None:
        """Kill the server at once and delete its log (blocking; safe to call twice)."""
        if self._destroyed:
            return
        self._destroyed = True
        try:
            if self._process is not None and self._process.poll() is None:
                self.thaw()
                self._process.kill()
                self._process.wait(timeout=30)
        finally:
            self._log.close()
            try:
                os.unlink(self._log.name)
            except OSError:
                pass
            atexit.unregister(self.destroy)


async def moto_server(case, reactor, **kwargs) -> MotoServer:
    """A started :class:`MotoServer` that ``case``'s clean-up destroys."""
    server = MotoServer(reactor, **kwargs)
    case.addCleanup(server.destroy)
    await server.start()
    return server


def bucket_client(server: MotoServer):
    """A plain botocore client on ``server`` (blocking), for a test to look behind the store's back."""
    from difydaemon.storage.s3 import S3Settings, make_client

    return make_client(
        S3Settings(bucket="", endpoint=server.endpoint, use_aws=False, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    )
