"""
``twistd dify-sri``: the SRI connector's options and wiring.

:func:`makeService` only builds objects; nothing listens or spawns until
the returned service starts.  A configuration without ``SRI_API_KEY`` (or
with any bad value) raises :class:`~difydaemon.errors.ConfigError`, and
twistd exits non-zero.
"""

from __future__ import annotations

import os

from treq.client import HTTPClient
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool

from difydaemon.api.site import DaemonSite
from difydaemon.api.web_channel import DaemonHTTPChannel
from difydaemon.blocking import ThreadPoolRunner
from difydaemon.config import SRIConfig, load_sri_config, read_dotenv
from difydaemon.runtimes.child_environment import plugin_environment
from difydaemon.runtimes.environment import BackgroundBuildsService, configured_builder
from difydaemon.runtimes.parent_death import parent_death_signal
from difydaemon.sri.admission import ConnectorFrontDoor
from difydaemon.sri.functions import FunctionTable
from difydaemon.sri.launcher import FunctionLauncher
from difydaemon.sri.resource import ConnectorResource
from difydaemon.tap import daemon_environment

log = Logger()

#: seconds one health check of a starting function may take
HEALTH_CHECK_TIMEOUT = 2.0


class Options(usage.Options):
    """Options of ``twistd dify-sri``; everything else comes from the environment."""

    optParameters = [
        ["env-file", "e", ".env", "A .env file read for variables the environment does not set."],
    ]


class ConnectorChannel(DaemonHTTPChannel):
    """The daemon's hardened HTTP channel, checking ``Authorization`` instead of ``X-Api-Key``."""

    key_header = b"authorization"


class ConnectorSite(DaemonSite):
    """
    The daemon's Site (bounded heads, admission before the body,
    ``TCP_NODELAY``) for the connector, keeping its open connections so a
    stopping connector can close them (:meth:`close_connections`).
    """

    protocol = ConnectorChannel

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.channels: set = set()

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        if channel is None:
            return None
        self.channels.add(channel)
        connection_lost = channel.connectionLost

        def forget(reason=None):
            self.channels.discard(channel)
            connection_lost(reason)

        channel.connectionLost = forget
        return channel

    def close_connections(self) -> None:
        """
        Close every open connection: a daemon's keep-alive connection would
        otherwise go on reaching a connector that no longer listens (and
        whose launches can no longer run), instead of being refused.
        """
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.loseConnection()


class HealthProbe:
    """
    ``GET <function URL>/health`` over treq, bounded by ``timeout``: True on 200.

    :param client: a treq ``HTTPClient``.
    """

    def __init__(self, reactor, client: HTTPClient, timeout: float = HEALTH_CHECK_TIMEOUT) -> None:
        self._reactor = reactor
        self._client = client
        self._timeout = timeout

    def __call__(self, url: str) -> Deferred:
        return Deferred.fromCoroutine(self._check(url))

    async def _check(self, url: str) -> bool:
        try:
            response = await self._client.get(url + "/health", timeout=self._timeout)
            await response.content()
        except Exception:
            return False
        return response.code == 200


class ConnectorService(MultiService):
    """
    The connector: its HTTP listener, and the functions it runs.

    On start the functions of the last run are started again
    (:meth:`~difydaemon.sri.launcher.FunctionLauncher.restore`).  On stop
    the listener closes first (no new launch), then every function is
    stopped (TERM, then KILL) and the stop waits for all of them.

    :ivar restored: fires (with how many functions came back) once the
        last run's functions have been tried.
    """

    def __init__(self, launcher: FunctionLauncher, runner: ThreadPoolRunner, pool: HTTPConnectionPool) -> None:
        super().__init__()
        self.launcher = launcher
        self.table = launcher.table
        self._runner = runner
        self._pool = pool

    def startService(self) -> None:
        super().startService()
        # the functions of the last run, on their old ports (see difydaemon.sri.state)
        self.restored = self.launcher.restore()
        self.restored.addErrback(lambda failure: log.failure("restoring functions failed", failure))

    def stopService(self):
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        await MultiService.stopService(self)
        self.site.close_connections()
        count = len(self.table)
        await self.launcher.stop()
        log.info("connector stopped; {count} functions stopped", count=count)
        await self._pool.closeCachedConnections()
        self._runner.stop()


def build_connector(reactor, config: SRIConfig, environ) -> ConnectorService:
    """
    Wire the connector for ``config`` (no I/O happens here but finding uv).

    :param environ: the connector's environment: functions and builds
        inherit only its allow-listed variables (never ``SRI_API_KEY``).
    """
    local = config.local_runtime
    working_path = os.path.abspath(config.sri_working_path)
    parent_death = parent_death_signal()
    builder = configured_builder(reactor, local, working_path, environ, parent_death)
    runner = ThreadPoolRunner(reactor, "dify-sri-blocking", max_threads=2)
    pool = HTTPConnectionPool(reactor, persistent=False)
    probe = HealthProbe(reactor, HTTPClient(Agent(reactor, connectTimeout=HEALTH_CHECK_TIMEOUT, pool=pool)))
    table = FunctionTable()
    launcher = FunctionLauncher(
        reactor,
        builder,
        runner.run,
        table,
        working_path,
        config.sri_function_host,
        config.sri_daemon_url,
        plugin_environment(environ, local.proxy_environment(), local.plugin_env_passthrough),
        probe,
        config.sri_max_package_size,
        start_timeout=config.sri_function_start_timeout,
        parent_death=parent_death,
        build_concurrency=local.plugin_local_launching_concurrent,
    )
    resource = ConnectorResource(launcher, runner.run, config.sri_max_package_size)
    front_door = ConnectorFrontDoor(config.sri_api_key.encode("utf-8"), config.sri_max_package_size)
    site = ConnectorSite(resource, reactor=reactor, front_door=front_door)
    service = ConnectorService(launcher, runner, pool)
    service.site = site
    service.config = config
    host = config.sri_host
    if ":" in host:
        endpoint = TCP6ServerEndpoint(reactor, config.sri_port, interface=host)
    else:
        endpoint = TCP4ServerEndpoint(reactor, config.sri_port, interface=host)
    StreamServerEndpointService(endpoint, site).setServiceParent(service)
    # the stop waits for the bytecode compilations of fresh builds
    BackgroundBuildsService(builder).setServiceParent(service)
    return service


def makeService(options, reactor=None, environ=None):
    """
    The twistd entry point: read the configuration and build the connector.

    :param reactor: the reactor to use (tests pass one).
    :param environ: the environment (``os.environ`` by default).
    :raises ConfigError: a bad or missing variable (``SRI_API_KEY``).
    """
    if reactor is None:
        from twisted.internet import reactor
    if environ is None:
        environ = os.environ
    dotenv_text = read_dotenv(options["env-file"])
    config = load_sri_config(environ, dotenv_text)
    return build_connector(reactor, config, daemon_environment(environ, dotenv_text))
