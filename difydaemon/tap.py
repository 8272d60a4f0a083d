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
from difydaemon.api.dispatch_channel import DispatchGate
from difydaemon.api.endpoint import EndpointResource
from difydaemon.api.management import ManagementAPI
from difydaemon.api.site import DaemonSite
from difydaemon.api.root import BuildInfo, HealthResource, RequestCounter, RootResource
from difydaemon.blocking import ThreadPoolRunner
from difydaemon.config import Config, load_config, read_dotenv
from difydaemon.errors import ConfigError
from difydaemon.invocation.dispatcher import BackwardsInvocations
from difydaemon.invocation.inner_api import DifyInnerAPI
from difydaemon.invocation.storage import PluginStorage
from difydaemon.management.installer import Installer
from difydaemon.management.packages import PackageRegistry, StoragePaths
from difydaemon.packaging.isolation import ChildProcessDecoder
from difydaemon.packaging.package import PackagePolicy
from difydaemon.packaging.signature import load_public_key, official_public_key
from difydaemon.management.debugging import DebuggingKeys
from difydaemon.management.endpoints import Endpoints
from difydaemon.management.installations import InstallationCache
from difydaemon.runtimes.debug import DebugServerFactory
from difydaemon.runtimes.environment import PythonEnvironmentBuilder, find_uv
from difydaemon.runtimes.launch import LocalRuntimeFactory
from difydaemon.runtimes.registry import RuntimeRegistry
from difydaemon.service import DaemonService
from difydaemon.storage.filesystem import FilesystemObjectStorage

BUILD_TIME = "unknown"


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
    return PostgresPersistence(reactor, db.db_extras, pool_size=db.db_max_open_conns, **params)


def _listen(reactor, host: str, port: int, factory):
    if ":" in host:
        endpoint = TCP6ServerEndpoint(reactor, port, interface=host)
    else:
        endpoint = TCP4ServerEndpoint(reactor, port, interface=host)
    return StreamServerEndpointService(endpoint, factory)


def _local_factory(reactor, config: Config, persistence, storage, paths, blocking):
    """The factory that brings local plugins up (None on the serverless platform)."""
    if config.platform != "local":
        return None
    local = config.local_runtime
    working_path = os.path.abspath(local.plugin_working_path)
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
    )
    environ = dict(os.environ)
    environ.update(local.proxy_environment())
    return LocalRuntimeFactory(
        reactor,
        persistence,
        storage,
        paths,
        blocking,
        builder,
        working_path,
        environ,
        config.packages.max_plugin_package_size,
        runtime_options={
            "instance_count": local.plugin_local_instances,
            "max_line_size": config.plugin_runtime_max_buffer_size,
            "readiness_timeout": local.python_env_init_timeout_seconds,
            "session_timeout": config.max_execution_timeout_seconds,
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


def build_daemon(reactor, config: Config) -> DaemonService:
    """Wire every part of the daemon for ``config`` (no I/O happens here)."""
    persistence = _persistence(reactor, config)
    blocking = ThreadPoolRunner(reactor, "difydaemon-blocking", max_threads=4)
    storage = FilesystemObjectStorage(reactor, config.storage.plugin_storage_local_root)
    policy = PackagePolicy(
        max_size=config.packages.max_plugin_package_size,
        force_verify=config.packages.force_verifying_signature,
        enforce_langgenius=config.packages.enforce_langgenius_plugin_signatures,
        public_keys=_public_keys(config),
    )
    paths = StoragePaths(
        packages=config.storage.plugin_package_cache_path,
        installed=config.storage.plugin_installed_path,
        media=config.storage.plugin_media_cache_path,
    )
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
        decoder=ChildProcessDecoder(),
    )
    installations = InstallationCache(reactor, persistence)
    runtimes = RuntimeRegistry(reactor, _local_factory(reactor, config, persistence, storage, paths, blocking))
    installer = Installer(
        reactor,
        persistence,
        storage,
        packages,
        runtimes,
        install_timeout=config.install_timeout_seconds,
        installations=installations,
    )
    counter = RequestCounter()
    health = HealthResource(
        BuildInfo(version=__version__, build_time=BUILD_TIME, platform=config.platform),
        counter,
        runtimes.pool_status,
    )
    keys = DebuggingKeys(reactor, persistence) if config.remote.plugin_remote_installing_enabled else None
    dify_pool = HTTPConnectionPool(reactor, persistent=True)
    dify_pool.cachedConnectionTimeout = config.invocation.connection_idle_timeout_seconds
    inner_api = _inner_api(reactor, config, dify_pool)
    backwards = _backwards(reactor, config, persistence, inner_api)
    endpoints = Endpoints(reactor, persistence, inner_api)
    management = ManagementAPI(packages, installer, persistence, debugging=keys, endpoints=endpoints)
    dispatch = DispatchResource(
        reactor,
        installations,
        runtimes,
        max_execution_timeout=config.max_execution_timeout_seconds,
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
        )
    root = RootResource(
        config.server_key, management.resource(), health, counter, dispatch=dispatch, endpoint=public_endpoints
    )
    # dispatch requests skip twisted.web: the same key check, counter and resource
    gate = DispatchGate(config.server_key.encode("utf-8"), counter, dispatch)
    site = DaemonSite(root, reactor=reactor, log_health=config.health_api_log_enabled, gate=gate)

    service = DaemonService(
        reactor, persistence, installer, runtimes=runtimes, runners=[blocking], http_pools=[dify_pool]
    )
    service.backwards = backwards
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

    :param options: parsed :class:`Options`.
    :param reactor: the reactor to use (tests pass a fake one).
    :param environ: the environment (``os.environ`` by default).
    """
    if reactor is None:
        from twisted.internet import reactor
    if environ is None:
        environ = os.environ
    config = load_config(environ, read_dotenv(options["env-file"]))
    return build_daemon(reactor, config)
