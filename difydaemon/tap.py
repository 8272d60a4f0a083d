"""
``twistd difydaemon``: command-line options and the service wiring.

:func:`makeService` only builds objects; nothing listens, connects or spawns
until the returned service starts.
"""

from __future__ import annotations

import os

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.python import usage
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient

from difydaemon import __version__
from difydaemon.api.dispatch import DispatchResource
from difydaemon.api.admission import BodyLimits, FrontDoor
from difydaemon.api.dispatch_channel import DispatchGate
from difydaemon.api.endpoint import EndpointResource
from difydaemon.api.management import ManagementAPI
from difydaemon.api.site import DaemonSite
from difydaemon.api.root import BuildInfo, HealthResource, RequestCounter, RootResource
from difydaemon.blocking import ThreadPoolRunner
from difydaemon.config import Config, load_config, parse_dotenv, read_dotenv
from difydaemon.coordination import coordination_for
from difydaemon.coordination.nodes import NodeInfo, detect_advertise_host, new_node_id
from difydaemon.coordination.debug_plugins import DebugInstallationSweeper, DebugInstallGuard
from difydaemon.coordination.replica import RECONCILE_INTERVAL, CacheInvalidation, Replica
from difydaemon.coordination.tasks import TASK_LEASE_TTL, TaskLeases
from difydaemon.api.forwarding import CallForwarder
from difydaemon.errors import ConfigError
from difydaemon.invocation.dispatcher import BackwardsInvocations
from difydaemon.invocation.inner_api import DifyInnerAPI
from difydaemon.invocation.storage import PluginStorage
from difydaemon.management.installer import Installer
from difydaemon.management.packages import PackageRegistry
from difydaemon.packaging.isolation import ChildProcessDecoder
from difydaemon.packaging.package import PackagePolicy
from difydaemon.packaging.signature import load_public_key, official_public_key
from difydaemon.management.debugging import DebuggingKeys
from difydaemon.management.endpoints import Endpoints
from difydaemon.management.installations import InstallationCache
from difydaemon.observability.logs import build_observer
from difydaemon.observability.metrics import DaemonMetrics, metrics_registry, metrics_resource
from difydaemon.observability.otel import ShutdownInThread, build_tracing
from difydaemon.observability.otlp_metrics import build_metrics_push
from difydaemon.runtimes.child_environment import plugin_environment
from difydaemon.runtimes.containment import (
    hide_process_memory,
    plugin_home,
    run_as_user,
    warn_if_exposed,
    with_plugin_home,
)
from difydaemon.runtimes.environment import BackgroundBuildsService, configured_builder
from difydaemon.runtimes.launch import LocalRuntimeFactory
from difydaemon.runtimes.local import LivenessPolicy
from difydaemon.runtimes.cgroups import memory_enforcement
from difydaemon.runtimes.parent_death import parent_death_signal
from difydaemon.runtimes.process_table import LinuxProcessTable
from difydaemon.runtimes.registry import RuntimeRegistry
from difydaemon.api.transaction import TransactionResource
from difydaemon.service import DaemonService, end_process_on_failed_start
from difydaemon.storage.cache import CachedObjectStorage
from difydaemon.storage.filesystem import FilesystemObjectStorage
from difydaemon.storage.metered import MeteredObjectStorage
from difydaemon.storage.paths import StoragePaths

BUILD_TIME = "unknown"

#: seconds between TERM and KILL when a plugin is stopped: the SDK dies on
#: TERM at once, so only a hung plugin waits, and with the default
#: SHUTDOWN_GRACE_PERIOD (6 s) a shutdown ends within ``docker stop``'s 10 s
#: even then: 6 + 2 + the reaping, under 9 s (``bench/supervision.py``)
PLUGIN_STOP_GRACE_PERIOD = 2.0

#: threads (and HTTP connections) for S3 calls: uploads of parts and reads
#: of packages run side by side
S3_THREADS = 8

#: seconds a call waits for a plugin that no local launch can bring up (a
#: debug plugin reconnecting; the serverless platform): Go's retry window
REMOTE_RUNTIME_WAIT = 6.0

#: seconds to connect to the replica a call is forwarded to: on one network
#: a live replica answers in milliseconds, a dead one is skipped at once
FORWARD_CONNECT_TIMEOUT = 3.0


class Options(usage.Options):
    """Options of ``twistd difydaemon``; everything else comes from the environment."""

    optParameters = [
        ["env-file", "e", ".env", "A .env file read for variables the environment does not set."],
    ]


def _public_keys(config: Config) -> tuple:
    keys = [official_public_key()]
    if config.packages.third_party_signature_verification_enabled:
        for path in config.packages.third_party_signature_verification_public_keys:
            try:
                with open(path, "rb") as f:
                    keys.append(load_public_key(f.read()))
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    "THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS", f"cannot load {path}: {exc}"
                )
    return tuple(keys)


def _persistence(reactor, config: Config):
    db = config.db
    if db.engine == "sqlite":
        from difydaemon.persistence.sqlite import SQLitePersistence

        return SQLitePersistence(reactor, db.db_database)
    from difydaemon.persistence.postgres import PostgresPersistence

    params = {"dbname": db.db_database, "sslmode": db.db_ssl_mode}
    if db.db_host:
        params["host"] = db.db_host
    if db.db_port:
        params["port"] = db.db_port
    if db.db_username:
        params["user"] = db.db_username
    if db.db_password:
        params["password"] = db.db_password
    if db.db_charset:
        params["client_encoding"] = db.db_charset
    return PostgresPersistence(
        reactor,
        db.db_extras,
        pool_size=db.db_max_open_conns,
        max_idle=db.db_max_idle_conns,
        max_lifetime=db.db_conn_max_lifetime,
        connect_timeout=db.db_connect_timeout,
        read_timeout=db.db_read_timeout,
        default_database=db.db_default_database or None,
        **params,
    )


def _object_storage(reactor, config: Config, paths: StoragePaths):
    """
    The object store of ``PLUGIN_STORAGE_TYPE``, and the runners it needs
    stopped at the end.  A shared store (S3) is fronted by the per-node
    cache of immutable keys; it is reached, and its bucket checked, when
    the daemon starts.
    """
    storage = config.storage
    if storage.plugin_storage_type != "aws_s3":
        return FilesystemObjectStorage(reactor, storage.plugin_storage_local_root), []
    from difydaemon.storage.s3 import S3ObjectStorage, S3Settings

    settings = S3Settings(
        bucket=storage.plugin_storage_oss_bucket,
        region=storage.aws_region or None,
        endpoint=storage.s3_endpoint or None,
        path_style=storage.s3_use_path_style,
        use_aws=storage.s3_use_aws,
        managed_iam=storage.s3_use_aws_managed_iam,
        access_key=storage.aws_access_key or None,
        secret_key=storage.aws_secret_key or None,
    )
    # a pool of its own: a slow store must not hold the threads that
    # decode packages
    runner = ThreadPoolRunner(reactor, "difydaemon-s3", max_threads=S3_THREADS)
    s3 = S3ObjectStorage(reactor, settings, runner)
    return CachedObjectStorage(s3, paths.immutable_prefixes()), [runner]


def _listen(reactor, host: str, port: int, factory):
    if ":" in host:
        endpoint = TCP6ServerEndpoint(reactor, port, interface=host)
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, interface=host)
    return StreamServerEndpointService(endpoint, factory)


def _local_factory(reactor, config: Config, environ, persistence, storage, paths, blocking, declarations=None):
    """
    The factory that brings local plugins up (None on the serverless platform).

    :param environ: the daemon's environment, of which plugin processes and
        their builds inherit only the allow-listed variables, with a
        ``HOME`` of their own.
    :raises ConfigError: when ``PLUGIN_RUN_AS_USER`` names no user, or one
        this daemon cannot switch to.
    """
    if config.platform != "local":
        return None
    local = config.local_runtime
    working_path = os.path.abspath(local.plugin_working_path)
    run_as = run_as_user(local.plugin_run_as_user)
    try:
        parent_death = parent_death_signal(run_as=run_as)
    except ValueError as exc:
        raise ConfigError("PLUGIN_RUN_AS_USER", str(exc))
    home = plugin_home(working_path)
    environ = with_plugin_home(environ, home)
    builder = configured_builder(reactor, local, working_path, environ, parent_death)
    return LocalRuntimeFactory(
        reactor,
        persistence,
        storage,
        paths,
        blocking,
        builder,
        working_path,
        plugin_environment(environ, local.proxy_environment(), local.plugin_env_passthrough),
        config.packages.max_plugin_package_size,
        runtime_options={
            "instance_count": local.plugin_local_instances,
            "max_instances": local.plugin_local_max_instances,
            "scale_down_delay": float(local.plugin_local_scale_down_delay),
            "idle_timeout": local.plugin_idle_timeout_seconds,
            "max_line_size": config.plugin_runtime_max_buffer_size,
            "readiness_timeout": local.python_env_init_timeout_seconds,
            "session_timeout": config.max_execution_timeout_seconds,
            "liveness": LivenessPolicy(timeout=local.plugin_heartbeat_timeout_seconds),
            "stop_grace_period": PLUGIN_STOP_GRACE_PERIOD,
            "parent_death": parent_death,
            # the launcher puts each plugin in a process group of its own
            "process_table": LinuxProcessTable() if parent_death is not None else None,
            "memory_cgroups": memory_enforcement(parent_death is not None),
        },
        launch_concurrency=local.plugin_local_launching_concurrent,
        plugin_home=home,
        run_as=run_as,
        shared_dirs=(os.path.join(working_path, ".uv-cache"), os.path.join(working_path, ".prepared-venvs")),
        declarations=declarations,
    )


class _Serverless:
    """The parts of the serverless platform: connector, shared invoke client, live sessions, factory."""

    def __init__(self, reactor, config: Config, persistence, coordination) -> None:
        # imported here: a local daemon never loads the serverless runtime
        from difydaemon.coordination.sessions import SharedServerlessSessions
        from difydaemon.runtimes.serverless.connector import SRIClient
        from difydaemon.runtimes.serverless.function_client import CONNECT_TIMEOUT, function_http_client
        from difydaemon.runtimes.serverless.invoke import InvokeClient
        from difydaemon.runtimes.serverless.runtime import ServerlessRuntimeFactory
        from difydaemon.runtimes.serverless.sessions import MemoryServerlessSessions

        serverless = config.serverless
        self.connector_pool = HTTPConnectionPool(reactor, persistent=True)
        self.connector = SRIClient(
            reactor,
            HTTPClient(Agent(reactor, connectTimeout=CONNECT_TIMEOUT, pool=self.connector_pool)),
            serverless.dify_plugin_serverless_connector_url or "",
            serverless.dify_plugin_serverless_connector_api_key or "",
            launch_idle_timeout=serverless.launch_timeout_seconds,
        )
        http, self.function_pool = function_http_client(reactor)
        self.invoker = InvokeClient(
            reactor,
            http,
            max_request_bytes=serverless.max_serverless_request_bytes,
            max_attempts=serverless.max_serverless_retry_times,
            max_line_size=config.plugin_runtime_max_buffer_size,
            execution_timeout=config.max_execution_timeout_seconds,
        )
        # a function's callbacks may land on any replica: with Redis, every
        # replica sees every live session
        self.sessions = (
            SharedServerlessSessions(coordination.kv) if coordination.uses_redis else MemoryServerlessSessions(reactor)
        )
        self.factory = ServerlessRuntimeFactory(reactor, persistence, self.connector, self.invoker, self.sessions)

    def ping(self):
        """Deferred: the connector answers (a start-up check: Go panics otherwise)."""
        return Deferred.fromCoroutine(self.connector.ping())


def _inner_api(reactor, config: Config, pool, tracing=None) -> DifyInnerAPI:
    """Dify's inner API over treq: backwards invocations and endpoint settings encryption."""
    invocation = config.invocation
    return DifyInnerAPI(
        reactor,
        HTTPClient(Agent(reactor, connectTimeout=invocation.write_timeout_seconds, pool=pool)),
        config.dify_inner_api_url,
        config.dify_inner_api_key,
        write_timeout=invocation.write_timeout_seconds,
        read_timeout=invocation.read_timeout_seconds,
        max_frame_size=invocation.response_max_buffer_size,
        tracing=tracing,
    )


def _backwards(reactor, config: Config, persistence, inner_api) -> BackwardsInvocations:
    """The plugins' calls back into Dify: the inner API, and their storage."""
    return BackwardsInvocations(inner_api, PluginStorage(persistence, config.storage.persistence_storage_max_size))


def _this_node(reactor, config: Config) -> NodeInfo:
    """
    This replica as the others see it.  Its advertised host is looked up
    (blocking, at start-up) only when there are others.
    """
    if config.redis.in_use:
        host = detect_advertise_host(config.cluster.cluster_advertise_host, config.server_host)
    else:
        host = config.cluster.cluster_advertise_host or "127.0.0.1"
    now = reactor.seconds()
    return NodeInfo(node_id=new_node_id(), host=host, port=config.server_port, started_at=now, heartbeat_at=now)


def build_daemon(reactor, config: Config, environ=None, env_file: str | None = None) -> DaemonService:
    """
    Wire every part of the daemon for ``config`` (no I/O happens here).

    :param environ: the daemon's environment (``os.environ`` by default):
        what plugin processes may inherit from it is chosen here.
    :param env_file: the ``.env`` file read, checked at start for modes
        that let other users read the daemon's secrets.
    """
    if environ is None:
        environ = os.environ
    observability = config.observability
    # counted for /metrics, or for the OTLP push, or both
    counting = observability.prometheus_enabled or observability.enable_otel
    metrics = DaemonMetrics(reactor.seconds) if counting else None
    tracing = build_tracing(observability) if observability.enable_otel else None
    persistence = _persistence(reactor, config)
    blocking = ThreadPoolRunner(reactor, "difydaemon-blocking", max_threads=4)
    paths = StoragePaths(
        packages=config.storage.plugin_package_cache_path,
        installed=config.storage.plugin_installed_path,
        media=config.storage.plugin_media_cache_path,
    )
    storage, storage_runners = _object_storage(reactor, config, paths)
    raw_storage = storage
    if metrics is not None:
        storage = MeteredObjectStorage(storage, metrics, config.storage.plugin_storage_type)
    policy = PackagePolicy(
        max_size=config.packages.max_plugin_package_size,
        force_verify=config.packages.force_verifying_signature,
        enforce_langgenius=config.packages.enforce_langgenius_plugin_signatures,
        public_keys=_public_keys(config),
    )
    decoder = ChildProcessDecoder()
    packages = PackageRegistry(
        persistence,
        storage,
        policy,
        blocking,
        paths=paths,
        media_cache_size=config.storage.plugin_media_cache_size,
        asset_cache_size=config.storage.plugin_asset_cache_size,
        max_bundle_size=config.packages.max_bundle_package_size,
        # In a child process: no GIL of ours held while dispatch waits.
        decoder=decoder,
    )
    installations = InstallationCache(reactor, persistence)
    coordination = coordination_for(config, reactor)
    node = _this_node(reactor, config)
    caches = CacheInvalidation(coordination.pubsub, node.node_id)
    caches.register("installations", installations)
    installations.on_invalidate = lambda tenant_id, plugin_id: caches.invalidated("installations", tenant_id, plugin_id)
    dify_pool = HTTPConnectionPool(reactor, persistent=True)
    dify_pool.cachedConnectionTimeout = config.invocation.connection_idle_timeout_seconds
    serverless = _Serverless(reactor, config, persistence, coordination) if config.platform == "serverless" else None
    factory = (
        serverless.factory
        if serverless is not None
        else _local_factory(reactor, config, environ, persistence, storage, paths, blocking, packages.declarations)
    )
    runtimes = RuntimeRegistry(
        reactor,
        factory,
        runtime_type=config.platform,
        shutdown_grace_period=config.shutdown_grace_period_seconds,
        # TERM, KILL after the stop grace period, and the reaping (ms):
        # even a plugin KILL cannot end (uninterruptible sleep) is given up
        # on 8.5 s after SIGTERM with the default grace, under docker's 10 s
        stop_timeout=PLUGIN_STOP_GRACE_PERIOD + 0.5,
        restore_idle=config.platform == "local" and config.local_runtime.plugin_idle_timeout_seconds is not None,
    )
    replica = Replica(
        reactor,
        coordination,
        node,
        runtimes,
        installed=runtimes.factory.installed if runtimes.factory is not None else lambda: succeed([]),
        caches=caches,
        # alone, nothing is missed: the news of an install is its own
        reconcile_interval=RECONCILE_INTERVAL if coordination.uses_redis else None,
    )
    installer = Installer(
        reactor,
        persistence,
        storage,
        packages,
        runtimes,
        install_timeout=config.install_timeout_seconds,
        installations=installations,
        task_leases=TaskLeases(reactor, coordination.leases),
        cluster=replica,
        metrics=metrics,
        tracing=tracing,
    )
    forwarder = None
    http_pools = [dify_pool]
    if coordination.uses_redis:
        forwarder = CallForwarder(
            reactor,
            replica.holders,
            node.node_id,
            config.server_key,
            connect_timeout=FORWARD_CONNECT_TIMEOUT,
            # the holder ends a session by its own timeout before this
            read_timeout=(config.max_execution_timeout_seconds or 600.0) + 60.0,
        )
        http_pools.append(forwarder.pool)
    runners = [decoder, blocking, *storage_runners]
    if tracing is not None:
        # last: spans of the shutdown itself are exported too
        runners.append(ShutdownInThread(reactor, tracing))
    service = DaemonService(
        reactor,
        persistence,
        installer,
        runtimes=runtimes,
        runners=runners,
        http_pools=http_pools + ([serverless.connector_pool, serverless.function_pool] if serverless else []),
        database_wait=config.db.db_startup_timeout,
        replica=replica,
        coordination=coordination,
        task_sweep_interval=TASK_LEASE_TTL if coordination.uses_redis else None,
        start_checks=_start_checks(env_file),
        ready_checks=[serverless.ping] if serverless is not None else [],
        storage=raw_storage,
    )
    counter = RequestCounter()
    health = HealthResource(
        BuildInfo(version=__version__, build_time=BUILD_TIME, platform=config.platform),
        counter,
        runtimes.pool_status,
        status=service.status,
    )
    keys = DebuggingKeys(reactor, persistence) if config.remote.plugin_remote_installing_enabled else None
    if keys is not None:
        caches.register("debugging_keys", keys)
        keys.on_invalidate = lambda tenant_id: caches.invalidated("debugging_keys", tenant_id)
    inner_api = _inner_api(reactor, config, dify_pool, tracing)
    backwards = _backwards(reactor, config, persistence, inner_api)
    endpoints = Endpoints(reactor, persistence, inner_api, declarations=packages.declarations)
    management = ManagementAPI(packages, installer, persistence, debugging=keys, endpoints=endpoints, runner=blocking)
    # as long as one start may take before it fails by itself, and well
    # under Dify's 600 s: the caller then reads why, not a timeout
    runtime_wait = (
        config.local_runtime.python_env_init_timeout_seconds if config.platform == "local" else REMOTE_RUNTIME_WAIT
    )
    dispatch = DispatchResource(
        reactor,
        installations,
        runtimes,
        max_execution_timeout=config.max_execution_timeout_seconds,
        runtime_wait=runtime_wait,
        backwards=backwards,
        forwarder=forwarder,
        metrics=metrics,
        tracing=tracing,
    )
    public_endpoints = None
    if config.plugin_endpoint_enabled:
        public_endpoints = EndpointResource(
            reactor,
            persistence,
            installations,
            runtimes,
            endpoints,
            backwards=backwards,
            max_execution_timeout=config.max_execution_timeout_seconds,
            runtime_wait=runtime_wait,
            forwarder=forwarder,
            tracing=tracing,
        )
    transaction = None
    if serverless is not None:
        transaction = TransactionResource(
            reactor, serverless.sessions, backwards, timeout=config.serverless.transaction_timeout_seconds
        )
    admin = None
    if config.admin_api_enabled:
        # imported here: the admin routes (and the serverless connector they
        # reach) are loaded only when ADMIN_API_ENABLED is true
        from difydaemon.api.admin import AdminAPI

        admin = AdminAPI(
            config.admin_api_key, persistence, packages, runtimes, serverless.factory if serverless else None
        ).resource()
    # the push reads the registry from the start; a page alone builds it at
    # its first scrape, and prometheus-client is imported only then
    registry = metrics_registry(metrics, runtimes) if observability.enable_otel else None
    metrics_page = None
    if observability.prometheus_enabled:
        metrics_page = metrics_resource(registry if registry is not None else (lambda: metrics_registry(metrics, runtimes)))
    # built here, so that a missing exporter stops the start, not the first push
    metrics_push = build_metrics_push(reactor, observability, registry, metrics) if observability.enable_otel else None
    root = RootResource(
        config.server_key,
        management.resource(),
        health,
        counter,
        dispatch=dispatch,
        endpoint=public_endpoints,
        transaction=transaction,
        admin=admin,
        metrics=metrics_page,
    )
    # every request head passes the front door, on the dispatch channel and on twisted.web
    front_door = FrontDoor(
        config.server_key.encode("utf-8"),
        BodyLimits.for_packages(
            config.packages.max_plugin_package_size,
            config.packages.max_bundle_package_size,
            config.endpoint_read_limit,
        ),
    )
    # dispatch requests skip twisted.web: the same counter and resource
    gate = DispatchGate(counter, dispatch, metrics, tracing)
    site = DaemonSite(
        root,
        reactor=reactor,
        log_health=config.health_api_log_enabled,
        gate=gate,
        front_door=front_door,
        before_body=public_endpoints.before_body if public_endpoints is not None else None,
        max_connections=config.server_max_connections,
        metrics=metrics,
        tracing=tracing,
    )

    service.backwards = backwards
    service.dispatch = dispatch
    service.packages = packages
    service.endpoints = endpoints
    #: the ``/e/`` resource, None when PLUGIN_ENDPOINT_ENABLED is false
    service.public_endpoints = public_endpoints
    service.site = site
    service.config = config
    service.forwarder = forwarder
    #: the serverless platform's parts (connector, invoker, sessions), None on local
    service.serverless = serverless
    #: the counts behind /metrics and the OTLP push, None when
    #: PROMETHEUS_ENABLED and ENABLE_OTEL are both false
    service.metrics = metrics
    #: the OpenTelemetry spans, None unless ENABLE_OTEL is true
    service.tracing = tracing
    #: the metrics pushed over OTLP, None unless ENABLE_OTEL is true
    service.metrics_push = metrics_push
    if metrics_push is not None:
        metrics_push.setServiceParent(service)
    # twistd asks the application for its log observer (unless --logger names one)
    service.log_observer_factory = lambda: build_observer(observability)
    _listen(reactor, config.server_host, config.server_port, site).setServiceParent(service)
    if isinstance(factory, LocalRuntimeFactory):
        # the stop waits for the bytecode compilations of fresh installs
        BackgroundBuildsService(factory.builder).setServiceParent(service)
    if keys is not None:
        # imported here: without remote installing the debug runtime is never loaded
        from difydaemon.runtimes.debug import DebugServerFactory

        guard = DebugInstallGuard(reactor, coordination.leases, coordination.membership, node.node_id)
        debug_factory = DebugServerFactory(
            reactor,
            keys,
            persistence,
            storage,
            runtimes,
            installations,
            paths=paths,
            runner=blocking,
            max_connections=config.remote.plugin_remote_installing_max_conn,
            max_tenant_connections=config.remote.plugin_remote_installing_max_single_tenant_conn,
            session_timeout=config.max_execution_timeout_seconds,
            max_line_size=config.plugin_runtime_max_buffer_size,
            guard=guard,
        )
        service.debug_factory = debug_factory
        # the rows of debug plugins whose replica died (alone: a killed previous run)
        service.debug_sweeper = DebugInstallationSweeper(
            reactor, persistence, guard, installations.invalidate, debug_factory.owns
        )
        service.debug_sweeper.setServiceParent(service)
        _listen(
            reactor,
            config.remote.plugin_remote_installing_host,
            config.remote.plugin_remote_installing_port,
            debug_factory,
        ).setServiceParent(service)
    return service


def _start_checks(env_file: str | None) -> tuple:
    """What the daemon does first when it starts: hide its memory from plugins, check its ``.env``'s mode."""
    checks = [hide_process_memory]
    if env_file is not None:
        checks.append(lambda: warn_if_exposed(env_file))
    return tuple(checks)


def makeService(options, reactor=None, environ=None):
    """
    The twistd entry point: read the configuration and build the daemon.

    Called by twistd (without a reactor), it also sets the process policy:
    a failed start stops the reactor and the process exits with status 1.
    A bad configuration raises here, and twistd exits with status 1 too.

    :param options: parsed :class:`Options`.
    :param reactor: the reactor to use (tests pass one; the process policy
        is then theirs).
    :param environ: the environment (``os.environ`` by default).
    """
    under_twistd = reactor is None
    if reactor is None:
        from twisted.internet import reactor
    if environ is None:
        environ = os.environ
    dotenv_text = read_dotenv(options["env-file"])
    config = load_config(environ, dotenv_text)
    service = build_daemon(
        reactor, config, daemon_environment(environ, dotenv_text), env_file=options["env-file"] if dotenv_text is not None else None
    )
    if under_twistd:
        end_process_on_failed_start(service, reactor)
    return service


def daemon_environment(environ, dotenv_text: str | None) -> dict:
    """
    The daemon's environment as its configuration sees it: ``environ``
    over the variables of the ``.env`` text, so that a variable an operator
    lets plugins inherit may be set in either place.
    """
    merged = parse_dotenv(dotenv_text) if dotenv_text is not None else {}
    merged.update(environ)
    return merged
