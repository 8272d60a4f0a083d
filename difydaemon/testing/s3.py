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

import os
import socket
import sys
import tempfile

from difydaemon.testing.server_process import ServerProcess

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


class MotoServer(ServerProcess):
    """
    One ``moto_server`` process.

    :param reactor: for waiting.
    :param require_auth: refuse every request (no IAM user exists).
    :ivar port: its TCP port on 127.0.0.1.
    """

    name = "moto_server"

    def __init__(self, reactor, require_auth: bool = False) -> None:
        super().__init__(reactor)
        self._require_auth = require_auth
        self._log = tempfile.NamedTemporaryFile(prefix="difydaemon-moto-", suffix=".log", delete=False)

    @property
    def endpoint(self) -> str:
        """The server's URL (``S3_ENDPOINT``)."""
        return f"http://{self.host}:{self.port}"

    def _argv(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)]

    def _environment(self) -> dict:
        environ = dict(os.environ)
        if self._require_auth:
            environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        return environ

    def _answers(self) -> bool:
        return answers(self.host, self.port)

    def _output(self):
        return self._log

    def server_log(self) -> str:
        """What the server printed (for failure messages)."""
        with open(self._log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _remove_files(self) -> None:
        self._log.close()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass

    async def start(self, timeout: float = 60.0) -> None:
        """Start the server (again, empty) and wait until it answers (moto takes seconds)."""
        await super().start(timeout)


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
