"""
The twistd plugin and the service wiring: what ``makeService`` builds, the
daemon starting on the embedded default, and ``twistd -n difydaemon`` as an
operator runs it.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys

import orjson
import psycopg2.extensions
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer, reactor, task
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import globalLogPublisher
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
from txpostgres import txpostgres

from difydaemon.runtimes.environment import BackgroundBuildsService
from difydaemon import tap
from difydaemon.errors import ConfigError
from difydaemon.packaging.isolation import ChildProcessDecoder
from difydaemon.persistence.postgres import quote_identifier
from difydaemon.runtimes.containment import hide_process_memory
from difydaemon.runtimes.process_table import LinuxProcessTable
from difydaemon.service import DaemonService
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from difydaemon.testing.http import http_client
from tests.persistence.test_postgres import postgres_dsn

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

    def test_alone_without_redis(self):
        """Without REDIS_HOST the daemon coordinates in memory and forwards nothing."""
        service = tap.makeService(self._options(), reactor=MemoryReactorClock(), environ=environment(self.mktemp(), 5002))
        self.assertFalse(service.coordination.uses_redis)
        self.assertIsNone(service.forwarder)
        self.assertIsNone(service.dispatch.forwarder)
        self.assertIsNotNone(service.replica)

    def test_replica_with_redis(self):
        """With REDIS_HOST the daemon is a replica: Redis coordination, the forwarder, its advertised address; nothing connects while building."""
        fake = MemoryReactorClock()
        environ = environment(self.mktemp(), 5002)
        environ.update({"REDIS_HOST": "127.0.0.1", "CLUSTER_ADVERTISE_HOST": "10.1.2.3"})
        service = tap.makeService(self._options(), reactor=fake, environ=environ)
        self.assertTrue(service.coordination.uses_redis)
        self.assertIs(service.dispatch.forwarder, service.forwarder)
        self.assertEqual(service.replica.presence.node.url, "http://10.1.2.3:5002")
        self.assertEqual(fake.tcpClients, [])

    @staticmethod
    def _options():
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        return options

    def test_packages_decoded_in_child_processes(self):
        """The daemon decodes uploaded packages in child processes, none started while building."""
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        service = tap.makeService(options, reactor=MemoryReactorClock(), environ=environment(self.mktemp(), 5002))
        self.assertIsInstance(service.packages.decoder, ChildProcessDecoder)
        self.assertIsNone(service.packages.decoder.spare)
        # stopped with the daemon, before the thread pool whose threads may wait on a child
        self.assertEqual(service._runners[0], service.packages.decoder)

    def test_s3_storage_behind_the_node_cache(self):
        """PLUGIN_STORAGE_TYPE=aws_s3 gives the S3 store behind the per-node cache, built without I/O, its pool stopped last."""
        from difydaemon.storage.cache import CachedObjectStorage
        from difydaemon.storage.s3 import S3ObjectStorage

        environ = environment(self.mktemp(), 5002)
        environ.update(
            {
                "PLUGIN_STORAGE_TYPE": "aws_s3",
                "PLUGIN_STORAGE_OSS_BUCKET": "plugins",
                "S3_USE_AWS": "false",
                "S3_ENDPOINT": "http://127.0.0.1:1",
                "AWS_ACCESS_KEY": "id",
                "AWS_SECRET_KEY": "secret",
            }
        )
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        service = tap.makeService(options, reactor=MemoryReactorClock(), environ=environ)
        self.assertIsInstance(service.storage, CachedObjectStorage)
        self.assertIsInstance(service.storage.inner, S3ObjectStorage)
        # the packages read it through the metrics' count of storage operations
        self.assertIs(service.packages._storage._storage, service.storage)
        self.assertEqual(service._runners[-1]._pool.name, "difydaemon-s3")
        self.assertEqual(service.storage.inner._settings.endpoint, "http://127.0.0.1:1")

    def test_local_storage_by_default(self):
        """The default store is the directory PLUGIN_STORAGE_LOCAL_ROOT, with no start step."""
        from difydaemon.storage.filesystem import FilesystemObjectStorage

        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        service = tap.makeService(options, reactor=MemoryReactorClock(), environ=environment(self.mktemp(), 5002))
        self.assertIsInstance(service.storage, FilesystemObjectStorage)

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

    def test_supervision_settings_reach_the_runtimes(self):
        """PLUGIN_HEARTBEAT_TIMEOUT and SHUTDOWN_GRACE_PERIOD reach the plugin runtimes and the registry."""
        environ = environment(self.mktemp(), 5002)
        environ.update({"PLUGIN_HEARTBEAT_TIMEOUT": "12", "SHUTDOWN_GRACE_PERIOD": "5"})
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        service = tap.makeService(options, reactor=MemoryReactorClock(), environ=environ)
        registry = service.runtimes
        self.assertEqual(registry.shutdown_grace_period, 5.0)
        self.assertEqual(registry.factory.runtime_options["liveness"].timeout, 12.0)
        self.assertEqual(registry.factory.runtime_options["stop_grace_period"], tap.PLUGIN_STOP_GRACE_PERIOD)

    def test_lifecycle_settings_reach_the_runtimes(self):
        """PLUGIN_IDLE_TIMEOUT, PLUGIN_LOCAL_MAX_INSTANCES and PLUGIN_LOCAL_SCALE_DOWN_DELAY reach the plugin runtimes."""
        environ = environment(self.mktemp(), 5002)
        environ.update(
            {"PLUGIN_IDLE_TIMEOUT": "90", "PLUGIN_LOCAL_MAX_INSTANCES": "3", "PLUGIN_LOCAL_SCALE_DOWN_DELAY": "20"}
        )
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        service = tap.makeService(options, reactor=MemoryReactorClock(), environ=environ)
        runtime_options = service.runtimes.factory.runtime_options
        self.assertEqual(
            (runtime_options["idle_timeout"], runtime_options["max_instances"], runtime_options["scale_down_delay"]),
            (90.0, 3, 20.0),
        )

    def test_idle_stop_restores_plugins_idle(self):
        """With PLUGIN_IDLE_TIMEOUT the registry leaves restored plugins idle; without it, it launches them."""
        built = {}
        for idle_timeout in ("90", "0"):
            environ = environment(self.mktemp(), 5002)
            environ["PLUGIN_IDLE_TIMEOUT"] = idle_timeout
            options = tap.Options()
            options.parseOptions(["--env-file", "/nonexistent/.env"])
            built[idle_timeout] = tap.makeService(options, reactor=MemoryReactorClock(), environ=environ).runtimes.restore_idle
        self.assertEqual(built, {"90": True, "0": False})

    def test_installs_compile_in_the_background(self):
        """The daemon's builder compiles site-packages in the background, and the daemon's stop ends it (BackgroundBuildsService)."""
        environ = environment(self.mktemp(), 5002)
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        service = tap.makeService(options, reactor=MemoryReactorClock(), environ=environ)
        builder = service.runtimes.factory.builder
        self.assertTrue(builder._compile_in_background)
        waiting = [child for child in service if isinstance(child, BackgroundBuildsService)]
        self.assertEqual([child._builder for child in waiting], [builder])

    def test_plugins_are_contained(self):
        """Plugins get HOME under the working path, lead process groups watched through /proc, and get 2 s between TERM and KILL; the daemon hides its memory at start."""
        workdir = self.mktemp()
        environ = environment(workdir, 5002)
        environ["HOME"] = "/home/operator"
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        service = tap.makeService(options, reactor=MemoryReactorClock(), environ=environ)
        factory = service.runtimes.factory
        home = os.path.join(os.path.abspath(environ["PLUGIN_WORKING_PATH"]), ".plugin-home")
        self.assertEqual(factory._environ["HOME"], home)
        self.assertEqual(factory._plugin_home, home)
        self.assertEqual(factory._builder._environ["HOME"], home)
        self.assertEqual(factory._builder._environ["PYENV_ROOT"], "/home/operator/.pyenv")
        self.assertIsInstance(factory.runtime_options["process_table"], LinuxProcessTable)
        self.assertEqual(factory.runtime_options["stop_grace_period"], 2.0)
        self.assertIsNone(factory.runtime_options["parent_death"].run_as)
        self.assertIn(hide_process_memory, service.start_checks)

    def test_default_shutdown_budget(self):
        """With the defaults a stop drains 6 s, KILLs 2 s after TERM and gives up on plugins 8.5 s after SIGTERM: under docker's 10 s."""
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        service = tap.makeService(options, reactor=MemoryReactorClock(), environ=environment(self.mktemp(), 5002))
        registry = service.runtimes
        self.assertEqual(
            (registry.shutdown_grace_period, registry.factory.runtime_options["stop_grace_period"], registry.stop_timeout),
            (6.0, 2.0, 2.5),
        )

    def test_exposed_env_file_warned_about_at_start(self):
        """A .env readable by others is named in a warning when the daemon starts, with its mode."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        env_file = os.path.join(workdir, ".env")
        with open(env_file, "w") as f:
            f.write("SERVER_KEY=from-the-file\n")
        os.chmod(env_file, 0o644)
        options = tap.Options()
        options.parseOptions(["--env-file", env_file])
        service = tap.makeService(options, reactor=MemoryReactorClock(), environ=environment(workdir, 5002))
        logged = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        for check in service.start_checks:
            if check is not hide_process_memory:
                check()
        [warning] = [e for e in logged if "readable by" in e.get("log_format", "")]
        self.assertEqual((warning["path"], warning["mode"], warning["who"]), (env_file, "0644", "group and others"))
        os.chmod(env_file, 0o600)
        del logged[:]
        for check in service.start_checks:
            if check is not hide_process_memory:
                check()
        self.assertEqual([e for e in logged if "readable by" in e.get("log_format", "")], [])

    def test_unknown_run_as_user_refused(self):
        """PLUGIN_RUN_AS_USER naming no user stops the daemon before it starts, naming the variable and the user."""
        environ = environment(self.mktemp(), 5002)
        environ["PLUGIN_RUN_AS_USER"] = "difydaemon-no-such-user"
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        with self.assertRaises(ConfigError) as caught:
            tap.makeService(options, reactor=MemoryReactorClock(), environ=environ)
        self.assertIn("PLUGIN_RUN_AS_USER", str(caught.exception))
        self.assertIn("difydaemon-no-such-user", str(caught.exception))

    def test_calls_wait_for_a_starting_plugin_as_long_as_a_start_may_take(self):
        """Dispatch waits PYTHON_ENV_INIT_TIMEOUT for a local plugin, Go's 6 s on the serverless platform."""
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        environ = environment(self.mktemp(), 5002)
        environ["PYTHON_ENV_INIT_TIMEOUT"] = "90"
        local = tap.makeService(options, reactor=MemoryReactorClock(), environ=environ)
        self.assertEqual(local.dispatch.runtime_wait, 90.0)
        environ.update(
            {
                "PLATFORM": "serverless",
                "DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL": "http://127.0.0.1:1",
                "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY": "connector",
            }
        )
        serverless = tap.makeService(options, reactor=MemoryReactorClock(), environ=environ)
        self.assertEqual(serverless.dispatch.runtime_wait, tap.REMOTE_RUNTIME_WAIT)

    def test_bad_config_names_variable(self):
        """A bad value stops makeService with an error naming the variable."""
        environ = environment(self.mktemp(), 5002)
        environ["SERVER_PORT"] = "eighty"
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        error = self.assertRaises(ConfigError, tap.makeService, options, MemoryReactorClock(), environ)
        self.assertIn("SERVER_PORT", str(error))


#: a fresh interpreter builds the daemon as twistd does (makeService, no
#: I/O) and prints the modules it has loaded
_BUILD_AND_LIST_MODULES = """
import sys
import orjson
from twisted.internet.testing import MemoryReactorClock
from difydaemon import tap
options = tap.Options()
options.parseOptions(["--env-file", "/nonexistent/.env"])
tap.makeService(options, reactor=MemoryReactorClock(), environ=orjson.loads(sys.argv[1]))
sys.stdout.write(orjson.dumps(sorted(sys.modules)).decode())
"""


def modules_after_build(environ: dict) -> list:
    """The modules a fresh interpreter holds once ``makeService`` built the daemon for ``environ``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _BUILD_AND_LIST_MODULES, orjson.dumps(environ).decode()],
        capture_output=True, check=False, cwd=root,
    )
    if out.returncode != 0:
        raise AssertionError(out.stderr.decode()[-2000:])
    return orjson.loads(out.stdout)


class LazyImportTests(SynchronousTestCase):
    """
    The embedded default loads no module that only another configuration
    needs: each is resident memory of every idle daemon
    (``bench/daemon_memory.py``).
    """

    def loaded(self, environ: dict, prefixes: tuple) -> list:
        return [name for name in modules_after_build(environ) if name.startswith(prefixes)]

    def test_embedded_default(self):
        """Built on SQLite and local files, the daemon imports no driver, client, platform or exporter it does not use."""
        unused = (
            # PostgreSQL, Redis, S3, OpenTelemetry, the serverless platform
            "psycopg2", "txpostgres", "difydaemon.persistence.postgres",
            "txredisapi", "difydaemon.coordination.redis",
            "boto3", "botocore", "difydaemon.storage.s3",
            "opentelemetry", "difydaemon.runtimes.serverless", "difydaemon.coordination.sessions",
            # the serverless admin routes (ADMIN_API_ENABLED), the debug
            # runtime (remote installing), the SRI connector and the CLI
            "difydaemon.api.admin", "difydaemon.runtimes.debug", "difydaemon.sri", "difydaemon.cli",
            # PROMETHEUS_ENABLED (on): prometheus-client waits for the first scrape
            "prometheus_client",
            # the YAML parser: packages are decoded in child processes
            "yaml", "difydaemon.packaging.plugin_yaml",
            # SERVER_TZ other than UTC
            "zoneinfo",
        )
        self.assertEqual(self.loaded(environment("/nonexistent", 5002), unused), [])

    def test_what_a_configuration_needs_is_loaded(self):
        """Remote installing and the admin routes enabled, their modules are loaded when the daemon is built (the guard above is not vacuous)."""
        environ = environment("/nonexistent", 5002)
        environ.update({
            "PLUGIN_REMOTE_INSTALLING_ENABLED": "true", "PLUGIN_REMOTE_INSTALLING_HOST": "127.0.0.1",
            "PLUGIN_REMOTE_INSTALLING_PORT": "5003",
            "ADMIN_API_ENABLED": "true", "ADMIN_API_KEY": "an-admin-key-long-enough",
        })
        loaded = self.loaded(environ, ("difydaemon.runtimes.debug", "difydaemon.api.admin"))
        self.assertEqual(loaded, ["difydaemon.api.admin", "difydaemon.runtimes.debug"])


class DaemonEnvironmentTests(SynchronousTestCase):
    """The environment plugins may inherit from is the configuration's view of it."""

    def test_dotenv_under_environment(self):
        """Variables of .env are there unless the environment sets them, even to an empty value."""
        merged = tap.daemon_environment({"A": "environment", "B": ""}, "A=dotenv\nB=dotenv\nC=dotenv\n")
        self.assertEqual(merged, {"A": "environment", "B": "", "C": "dotenv"})

    def test_without_dotenv(self):
        """Without a .env file it is a copy of the environment."""
        environ = {"A": "1"}
        merged = tap.daemon_environment(environ, None)
        self.assertEqual(merged, environ)
        self.assertIsNot(merged, environ)


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


class TwistdWatch(ProcessProtocol):
    """Collects a twistd child's output and fires ``ended`` with (exit code, signal)."""

    def __init__(self) -> None:
        self.output = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback((reason.value.exitCode, reason.value.signal))

    def text(self) -> str:
        """The output so far, as text."""
        return self.output.decode(errors="replace")


def spawn_twistd(case, workdir: str, environ: dict) -> tuple:
    """
    Run ``twistd -n difydaemon`` in ``workdir`` with ``environ`` added to
    this environment; it is sent SIGTERM at clean-up if still running.
    Returns (process, watch).
    """
    env = dict(os.environ)
    env.update(environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    watch = TwistdWatch()
    process = reactor.spawnProcess(
        watch,
        sys.executable,
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "difydaemon"],
        env=env,
        path=workdir,
    )

    async def end():
        if not watch.ended.called:
            process.signalProcess(signal.SIGTERM)
            await watch.ended

    case.addCleanup(lambda: defer.Deferred.fromCoroutine(end()))
    return process, watch


class TwistdTests(AsyncTestCase):
    """``twistd -n difydaemon`` as an operator runs it."""

    timeout = 60

    async def test_twistd_runs_daemon(self):
        """twistd -n difydaemon starts, answers /health/check, and exits on SIGTERM."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        port = free_port()
        process, watch = spawn_twistd(self, workdir, environment(workdir, port))
        treq = http_client(self, reactor)
        try:
            health = None
            for _ in range(100):
                try:
                    response = await treq.get(f"http://127.0.0.1:{port}/health/check")
                    health = orjson.loads(await response.content())
                    break
                except Exception:
                    await task.deferLater(reactor, 0.1, lambda: None)
            self.assertIsNotNone(health, watch.text())
            self.assertEqual(health["status"], "ok")
            self.assertEqual(health["platform"], "local")
        finally:
            if watch.ended.called is False:
                process.signalProcess(signal.SIGTERM)
        code, sig = await watch.ended
        output = watch.text()
        # twistd re-raises SIGTERM after a clean shutdown, so it ends by the signal
        self.assertIn((code, sig), [(0, None), (None, signal.SIGTERM)], output)
        self.assertIn("Server Shut Down.", output)

    async def test_bad_config_exits_non_zero(self):
        """A bad variable makes twistd exit with status 1, naming the variable."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        environ = environment(workdir, free_port())
        environ["SERVER_PORT"] = "eighty"
        process, watch = spawn_twistd(self, workdir, environ)
        code, sig = await watch.ended
        self.assertEqual((code, sig), (1, None), watch.text())
        self.assertIn("SERVER_PORT", watch.text())

    async def test_unreachable_database_exits_non_zero(self):
        """A daemon whose database cannot be reached within DB_STARTUP_TIMEOUT exits with status 1, having opened no port."""
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        port = free_port()
        environ = environment(workdir, port)
        environ.update(
            {
                "DB_TYPE": "postgresql",
                "DB_HOST": "127.0.0.1",
                "DB_PORT": str(free_port()),
                "DB_USERNAME": "postgres",
                "DB_DATABASE": "difydaemon_unreachable",
                "DB_STARTUP_TIMEOUT": "2s",
            }
        )
        process, watch = spawn_twistd(self, workdir, environ)
        code, sig = await watch.ended
        self.assertEqual((code, sig), (1, None), watch.text())
        self.assertIn("database unavailable", watch.text())
        self.assertIn("trying again", watch.text())
        self.assertNotIn("difydaemon is ready", watch.text())

    async def test_missing_database_is_created_and_first_call_succeeds(self):
        """On PostgreSQL a missing DB_DATABASE is created; the first request answered after the port opens succeeds."""
        admin = txpostgres.Connection(reactor=reactor)
        await admin.connect(postgres_dsn())
        self.addCleanup(admin.close)
        name = "difydaemon_twistd_" + secrets.token_hex(4)

        async def drop():
            await admin.runOperation(f"DROP DATABASE IF EXISTS {quote_identifier(name)} WITH (FORCE)")

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(drop()))
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        port = free_port()
        environ = environment(workdir, port)
        params = psycopg2.extensions.parse_dsn(postgres_dsn())
        environ.update(
            {
                "DB_TYPE": "postgresql",
                "DB_HOST": params.get("host", "127.0.0.1"),
                "DB_PORT": params.get("port", "5432"),
                "DB_USERNAME": params.get("user", "postgres"),
                "DB_DATABASE": name,
            }
        )
        process, watch = spawn_twistd(self, workdir, environ)
        treq = http_client(self, reactor)
        first = None
        for _ in range(300):
            try:
                response = await treq.get(
                    f"http://127.0.0.1:{port}/plugin/t1/management/list?page=1&page_size=5",
                    headers={"X-Api-Key": KEY},
                )
            except Exception:
                self.assertFalse(watch.ended.called, watch.text())
                await task.deferLater(reactor, 0.05, lambda: None)
                continue
            first = orjson.loads(await response.content())
            break
        self.assertEqual(first, {"code": 0, "message": "success", "data": {"list": [], "total": 0}}, watch.text())
        rows = await admin.runQuery("SELECT datname FROM pg_database WHERE datname = %s", (name,))
        self.assertEqual(rows, [(name,)])
        self.assertIn(f"created database {name}", watch.text())
