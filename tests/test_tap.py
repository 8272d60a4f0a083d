"""
The twistd plugin and the service wiring: what ``makeService`` builds, the
daemon starting on the embedded default, and ``twistd -n difydaemon`` as an
operator runs it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

import orjson
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker

from difydaemon import tap
from difydaemon.errors import ConfigError
from difydaemon.packaging.isolation import ChildProcessDecoder
from difydaemon.service import DaemonService
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from difydaemon.testing.http import http_client

KEY = "tap-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(workdir: str, port: int) -> dict:
    """A minimal embedded-default environment rooted in ``workdir``."""
    return {
        "SERVER_KEY": KEY,
        "SERVER_HOST": "127.0.0.1",
        "SERVER_PORT": str(port),
        "DIFY_INNER_API_URL": "http://127.0.0.1:1",
        "DIFY_INNER_API_KEY": "inner",
        "PLATFORM": "local",
        "DB_TYPE": "sqlite",
        "DB_DATABASE": os.path.join(workdir, "daemon.db"),
        "PLUGIN_STORAGE_LOCAL_ROOT": os.path.join(workdir, "storage"),
        "PLUGIN_WORKING_PATH": os.path.join(workdir, "cwd"),
        "PLUGIN_REMOTE_INSTALLING_ENABLED": "false",
    }


class MakeServiceTests(SynchronousTestCase):
    """makeService builds the daemon without doing I/O."""

    def test_plugin_is_discoverable(self):
        """twistd finds a service maker named difydaemon pointing at difydaemon.tap."""
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertIn("difydaemon", makers)
        self.assertEqual(makers["difydaemon"].module, "difydaemon.tap")

    def test_builds_daemon_listening_on_configured_port(self):
        """The built service listens on SERVER_HOST:SERVER_PORT once started, not before."""
        fake = MemoryReactorClock()
        workdir = self.mktemp()
        options = tap.Options()
        options.parseOptions(["--env-file", os.path.join(workdir, "absent.env")])
        service = tap.makeService(options, reactor=fake, environ=environment(workdir, 5002))
        self.assertIsInstance(service, DaemonService)
        listeners = [s for s in service if isinstance(s, StreamServerEndpointService)]
        self.assertEqual(len(listeners), 1)
        self.assertEqual(fake.tcpServers, [])
        listeners[0].startService()
        self.assertEqual(fake.tcpServers[0][0], 5002)
        self.assertEqual(fake.tcpServers[0][3], "127.0.0.1")
        self.assertFalse(os.path.exists(os.path.join(workdir, "daemon.db")))

    def test_packages_decoded_in_child_processes(self):
        """The daemon decodes uploaded packages in child processes, none started while building."""
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        service = tap.makeService(options, reactor=MemoryReactorClock(), environ=environment(self.mktemp(), 5002))
        self.assertIsInstance(service.packages.decoder, ChildProcessDecoder)
        self.assertIsNone(service.packages.decoder.spare)

    def test_debug_listener_when_remote_installing_enabled(self):
        """With remote installing enabled the daemon also listens for debug plugins."""
        fake = MemoryReactorClock()
        environ = environment(self.mktemp(), 5002)
        environ.update(
            {
                "PLUGIN_REMOTE_INSTALLING_ENABLED": "true",
                "PLUGIN_REMOTE_INSTALLING_HOST": "127.0.0.1",
                "PLUGIN_REMOTE_INSTALLING_PORT": "5003",
            }
        )
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        service = tap.makeService(options, reactor=fake, environ=environ)
        for child in service:
            child.startService()
        self.assertEqual(sorted(port for port, *_ in fake.tcpServers), [5002, 5003])

    def test_bad_config_names_variable(self):
        """A bad value stops makeService with an error naming the variable."""
        environ = environment(self.mktemp(), 5002)
        environ["SERVER_PORT"] = "eighty"
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        error = self.assertRaises(ConfigError, tap.makeService, options, MemoryReactorClock(), environ)
        self.assertIn("SERVER_PORT", str(error))


class DaemonStartTests(AsyncTestCase):
    """The daemon on the embedded default, on the real reactor."""

    async def test_start_answers_health_and_stop(self):
        """After start-up the daemon answers /health/check and the database exists; stop closes all."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        port = free_port()
        options = tap.Options()
        options.parseOptions(["--env-file", os.path.join(workdir, "absent.env")])
        service = tap.makeService(options, reactor=reactor, environ=environment(workdir, port))
        treq = http_client(self, reactor)
        service.startService()
        try:
            await service.ready
            response = await treq.get(f"http://127.0.0.1:{port}/health/check")
            self.assertEqual(response.code, 200)
            health = orjson.loads(await response.content())
            self.assertEqual(health["status"], "ok")
            self.assertTrue(os.path.exists(os.path.join(workdir, "daemon.db")))
            response = await treq.get(
                f"http://127.0.0.1:{port}/plugin/t1/management/list?page=1&page_size=5",
                headers={"X-Api-Key": KEY},
            )
            self.assertEqual(orjson.loads(await response.content()), {"code": 0, "message": "success", "data": {"list": [], "total": 0}})
        finally:
            await service.stopService()


class TwistdTests(AsyncTestCase):
    """``twistd -n difydaemon`` as an operator runs it."""

    timeout = 60

    async def test_twistd_runs_daemon(self):
        """twistd -n difydaemon starts, answers /health/check, and exits on SIGTERM."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        port = free_port()
        env = dict(os.environ)
        env.update(environment(workdir, port))
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        ended = defer.Deferred()

        from twisted.internet.protocol import ProcessProtocol

        class Watch(ProcessProtocol):
            output = b""

            def outReceived(self, data):
                self.output += data

            errReceived = outReceived

            def processEnded(self, reason):
                ended.callback((reason.value.exitCode, reason.value.signal))

        proto = Watch()
        treq = http_client(self, reactor)
        process = reactor.spawnProcess(
            proto,
            sys.executable,
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "difydaemon"],
            env=env,
            path=workdir,
        )
        try:
            health = None
            for _ in range(100):
                try:
                    response = await treq.get(f"http://127.0.0.1:{port}/health/check")
                    health = orjson.loads(await response.content())
                    break
                except Exception:
                    await task.deferLater(reactor, 0.1, lambda: None)
            self.assertIsNotNone(health, proto.output.decode(errors="replace"))
            self.assertEqual(health["status"], "ok")
            self.assertEqual(health["platform"], "local")
        finally:
            if ended.called is False:
                process.signalProcess(signal.SIGTERM)
        code, sig = await ended
        output = proto.output.decode(errors="replace")
        # twistd re-raises SIGTERM after a clean shutdown, so it ends by the signal
        self.assertIn((code, sig), [(0, None), (None, signal.SIGTERM)], output)
        self.assertIn("Server Shut Down.", output)
