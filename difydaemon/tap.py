"""
``twistd difydaemon``: command-line options and the service wiring.

:func:`makeService` only builds objects; nothing listens, connects or spawns
until the returned service starts.
"""

from __future__ import annotations

import os

from twisted.application.internet import StreamServerEndpointService
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
from difydaemon.runtimes.child_environment import plugin_environment
from difydaemon.runtimes.debug import DebugServerFactory
from difydaemon.runtimes.environment import PythonEnvironmentBuilder, find_uv
from difydaemon.runtimes.launch import LocalRuntimeFactory
from difydaemon.runtimes.local import LivenessPolicy
from difydaemon.runtimes.parent_death import parent_death_signal
from difydaemon.runtimes.registry import RuntimeRegistry
from difydaemon.service import DaemonService, end_process_on_failed_start
from difydaemon.storage.cache import CachedObjectStorage
from difydaemon.storage.filesystem import FilesystemObjectStorage
from difydaemon.storage.paths import StoragePaths

BUILD_TIME = "unknown"

#: seconds between TERM and KILL when a plugin is stopped: the SDK dies on
#: TERM at once, so only a hung plugin waits, and with the default
#: SHUTDOWN_GRACE_PERIOD a shutdown ends within ``docker stop``'s 10 s even
#: then (``bench/supervision.py`` measured 8 s + this + 0.2 s)
PLUGIN_STOP_GRACE_PERIOD = 1.0

#: threads (and HTTP connections) for S3 calls: uploads of parts and reads
#: of packages run side by side
S3_THREADS = 8

#: seconds a call waits for a plugin that no local launch can bring up (a
#: debug plugin reconnecting; the serverless platform): Go's retry window
REMOTE_RUNTIME_WAIT = 6.0


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


def _local_factory(reactor, config: Config, environ, persistence, storage, paths, blocking):
    """
    The factory that brings local plugins up (None on the serverless platform).

    :param environ: the daemon's environment, of which plugin processes and
        their builds inherit only the allow-listed variables.
    """
    if config.platform != "local":
        return None
    local = config.local_runtime
    working_path = os.path.abspath(local.plugin_working_path)
    parent_death = parent_death_signal()
    builder = PythonEnvironmentBuilder(
        reactor,
        find_uv(local.uv_path or None),
        os.path.join(working_path, ".uv-cache"),
        pip_mirror_url=local.pip_mirror_url or None,
        pip_extra_args=local.pip_extra_args or None,
        pip_verbose=local.pip_verbose,
        prefer_binary=local.pip_prefer_binary,
        proxies=local.proxy_environment(),
        compile_extra_args=local.python_compile_all_extra_args or None,
        ignore_uv_lock=local.plugin_ignore_uv_lock,
        init_timeout=local.python_env_init_timeout_seconds,
        python_interpreter_path=local.python_interpreter_path or None,
        prepared_venvs_dir=os.path.join(working_path, ".prepared-venvs"),
        environ=environ,
        passthrough=local.plugin_env_passthrough,
        parent_death=parent_death,
    )
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
            "max_line_size": config.plugin_runtime_max_buffer_size,
            "readiness_timeout": local.python_env_init_timeout_seconds,
            "session_timeout": config.max_execution_timeout_seconds,
            "liveness": LivenessPolicy(timeout=local.plugin_heartbeat_timeout_seconds),
            "stop_grace_period": PLUGIN_STOP_GRACE_PERIOD,
            "parent_death": parent_death,
        },
        launch_concurrency=local.plugin_local_launching_concurrent,
    )


def _inner_api(reactor, config: Config, pool) -> DifyInnerAPI:
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
    )


def _backwards(reactor, config: Config, persistence, inner_api) -> BackwardsInvocations:
    """The plugins' calls back into Dify: the inner API, and their storage."""
    return BackwardsInvocations(inner_api, PluginStorage(persistence, config.storage.persistence_storage_max_size))


def build_daemon(reactor, config: Config, environ=None) -> DaemonService:
    """
    Wire every part of the daemon for ``config`` (no I/O happens here).

    :param environ: the daemon's environment (``os.environ`` by default):
        what plugin processes may inherit from it is chosen here.
    """
    if environ is None:
        environ = os.environ
    persistence = _persistence(reactor, config)
    blocking = ThreadPoolRunner(reactor, "difydaemon-blocking", max_threads=4)
    paths = StoragePaths(
        packages=config.storage.plugin_package_cache_path,
        installed=config.storage.plugin_installed_path,
        media=config.storage.plugin_media_cache_path,
    )
    storage, storage_runners = _object_storage(reactor, config, paths)
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
    dify_pool = HTTPConnectionPool(reactor, persistent=True)
    dify_pool.cachedConnectionTimeout = config.invocation.connection_idle_timeout_seconds
    runtimes = RuntimeRegistry(
        reactor,
        _local_factory(reactor, config, environ, persistence, storage, paths, blocking),
        shutdown_grace_period=config.shutdown_grace_period_seconds,
        # TERM, KILL after the stop grace period, and the reaping
        stop_timeout=PLUGIN_STOP_GRACE_PERIOD + 1.0,
    )
    installer = Installer(
        reactor,
        persistence,
        storage,
        packages,
        runtimes,
        install_timeout=config.install_timeout_seconds,
        installations=installations,
    )
    service = DaemonService(
        reactor,
        persistence,
        installer,
        runtimes=runtimes,
        runners=[decoder, blocking, *storage_runners],
        http_pools=[dify_pool],
        database_wait=config.db.db_startup_timeout,
        storage=storage,
    )
    counter = RequestCounter()
    health = HealthResource(
        BuildInfo(version=__version__, build_time=BUILD_TIME, platform=config.platform),
        counter,
        runtimes.pool_status,
        status=service.status,
    )
    keys = DebuggingKeys(reactor, persistence) if config.remote.plugin_remote_installing_enabled else None
    inner_api = _inner_api(reactor, config, dify_pool)
    backwards = _backwards(reactor, config, persistence, inner_api)
    endpoints = Endpoints(reactor, persistence, inner_api)
    management = ManagementAPI(packages, installer, persistence, debugging=keys, endpoints=endpoints, runner=blocking)
    # as long as one start may take before it fails by itself, and well
    # under Dify's 600 s: the caller then reads why, not a timeout
    runtime_wait = (
        config.local_runtime.python_env_init_timeout_seconds if runtimes.factory is not None else REMOTE_RUNTIME_WAIT
    )
    dispatch = DispatchResource(
        reactor,
        installations,
        runtimes,
        max_execution_timeout=config.max_execution_timeout_seconds,
        runtime_wait=runtime_wait,
        backwards=backwards,
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
        )
    root = RootResource(
        config.server_key, management.resource(), health, counter, dispatch=dispatch, endpoint=public_endpoints
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
    gate = DispatchGate(counter, dispatch)
    site = DaemonSite(
        root,
        reactor=reactor,
        log_health=config.health_api_log_enabled,
        gate=gate,
        front_door=front_door,
        before_body=public_endpoints.before_body if public_endpoints is not None else None,
        max_connections=config.server_max_connections,
    )

    service.backwards = backwards
    service.dispatch = dispatch
    service.packages = packages
    service.endpoints = endpoints
    #: the ``/e/`` resource, None when PLUGIN_ENDPOINT_ENABLED is false
    service.public_endpoints = public_endpoints
    service.site = site
    service.config = config
    _listen(reactor, config.server_host, config.server_port, site).setServiceParent(service)
    if keys is not None:
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
        )
        service.debug_factory = debug_factory
        _listen(
            reactor,
            config.remote.plugin_remote_installing_host,
            config.remote.plugin_remote_installing_port,
            debug_factory,
        ).setServiceParent(service)
    return service


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
    service = build_daemon(reactor, config, daemon_environment(environ, dotenv_text))
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
