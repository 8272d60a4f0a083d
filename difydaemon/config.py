"""
The daemon's configuration, built from environment variables by pure functions.

:func:`load_config` takes the process environment and, optionally, the text
of a ``.env`` file, and returns a frozen :class:`Config`.  The environment
wins over the ``.env`` text: a variable set in the environment, even to the
empty string, hides the ``.env`` line of the same name.  Only
:func:`read_dotenv` touches the file system.

Variable names, defaults and units are those of the Go ``dify-plugin-daemon``
(``http-api.md`` §6), with these differences:

- ``DB_TYPE`` also accepts ``sqlite``, the default (an embedded database whose
  file is ``DB_DATABASE``, default ``difydaemon.db``).  ``postgresql`` and
  ``pgbouncer`` select PostgreSQL; the MySQL family is refused.
- ``PLUGIN_STORAGE_TYPE`` accepts ``local`` and ``aws_s3``; the other Go
  stores are parsed with their variables and refused as not supported yet.
  ``S3_USE_PATH_STYLE`` applies with ``S3_USE_AWS`` true too (Go ignores it
  then).
- ``PLUGIN_WORKING_PATH`` defaults to ``cwd`` on the local platform.
- ``DB_PASSWORD`` may be empty (trust or peer authentication).
- ``PLUGIN_LOCAL_INSTANCES`` (default 1) is our own: processes per local
  plugin (the minimum when load may bring more).
- ``PLUGIN_LOCAL_MAX_INSTANCES`` (default: ``PLUGIN_LOCAL_INSTANCES``) and
  ``PLUGIN_LOCAL_SCALE_DOWN_DELAY`` (default 60) are our own: the most
  processes load may bring a local plugin, and the seconds of lighter load
  before one is stopped again.
- ``PLUGIN_IDLE_TIMEOUT`` (default 0: never) is our own: seconds without a
  session after which a local plugin is stopped until its next request.
- ``DB_CONNECT_TIMEOUT`` and ``DB_READ_TIMEOUT`` (Go durations such as
  ``5s``; MySQL-only in Go) also bound PostgreSQL connects and answers;
  ``DB_STARTUP_TIMEOUT`` (default ``30s``) is our own: how long start-up
  keeps trying to reach the database.
- ``PLUGIN_HEARTBEAT_TIMEOUT`` (default 30) is our own: seconds of silence
  after which a ready plugin instance counts as hung (Go: 120 s of no output).
- ``SHUTDOWN_GRACE_PERIOD`` (default 6) is our own: seconds a daemon stop
  lets open plugin sessions finish (Go: ``PLUGIN_MAX_EXECUTION_TIMEOUT``).
- ``PLUGIN_RUN_AS_USER`` is our own: the user (name or uid) plugin
  processes and their builds run as when the daemon runs as root.
- ``PLUGIN_ENV_PASSTHROUGH`` is our own: variables of the daemon's
  environment that plugin processes and their builds inherit besides the
  allow-list of :mod:`difydaemon.runtimes.child_environment`.
- ``CLUSTER_ADVERTISE_HOST`` is our own: the host other replicas reach this
  one at on ``SERVER_PORT`` (detected when unset, see
  :mod:`difydaemon.coordination.nodes`).
- ``REDIS_USE_AZURE_MANAGED_IDENTITY`` is refused when Redis is used.
- A variable set to the empty string counts as unset and takes its default,
  as in Go's default-setter; out-of-range numbers (a port of 0, a size of 0)
  are errors instead of silently meaning "default".

Attribute naming scheme: every value lives on exactly one attribute whose
name is the variable's name in lower case, either on :class:`Config` itself
or on one of its groups, e.g. ``SERVER_PORT`` -> ``config.server_port`` and
``DB_TYPE`` -> ``config.db.db_type``.  The groups are ``storage``,
``packages``, ``db``, ``local_runtime``, ``remote``, ``invocation``,
``serverless``, ``redis``, ``cluster`` and ``observability``.  Durations keep the unit of the variable
(seconds, milliseconds or minutes, as documented on each class), except
Go-style durations (``5s``), which are float seconds; properties ending in
``_seconds`` give the same duration as float seconds.  Two
attributes hold a resolved value rather than one variable's: the runtime
buffer sizes (the legacy ``PLUGIN_STDIO_*`` names win when customised) and
the proxies (the lower-case variables are fallbacks).

Every bad value is reported as :class:`difydaemon.errors.ConfigError` naming
the variable.  All problems are collected; when there is more than one,
:class:`ConfigErrors` (a ``ConfigError``) carries them all.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from typing import Iterable

from attrs import field, frozen

from difydaemon.errors import ConfigError
from difydaemon.runtimes.child_environment import passthrough_names

#: The Go daemon's object stores difydaemon does not support yet, and the
#: variables of each: parsed (so that a typo is still reported as the
#: store's), and refused at start with ``PLUGIN_STORAGE_TYPE`` named.
_OTHER_STORAGE_VARIABLES: dict[str, tuple[str, ...]] = {
    "tencent_cos": ("TENCENT_COS_SECRET_KEY", "TENCENT_COS_SECRET_ID", "TENCENT_COS_REGION", "TENCENT_COS_ENDPOINT"),
    "azure_blob": (
        "AZURE_BLOB_STORAGE_CONTAINER_NAME",
        "AZURE_BLOB_STORAGE_CONNECTION_STRING",
        "AZURE_BLOB_STORAGE_ACCOUNT_URL",
        "AZURE_BLOB_STORAGE_USE_MANAGED_IDENTITY",
    ),
    "gcs": ("GCS_CREDENTIALS",),
    "aliyun_oss": (
        "ALIYUN_OSS_REGION",
        "ALIYUN_OSS_ENDPOINT",
        "ALIYUN_OSS_ACCESS_KEY_ID",
        "ALIYUN_OSS_ACCESS_KEY_SECRET",
        "ALIYUN_OSS_AUTH_VERSION",
        "ALIYUN_OSS_PATH",
        "ALIYUN_OSS_CLOUDBOX_ID",
    ),
    "huawei_obs": ("HUAWEI_OBS_ACCESS_KEY", "HUAWEI_OBS_SECRET_KEY", "HUAWEI_OBS_SERVER", "HUAWEI_OBS_PATH_STYLE"),
    "volcengine_tos": (
        "VOLCENGINE_TOS_ENDPOINT", "VOLCENGINE_TOS_ACCESS_KEY", "VOLCENGINE_TOS_SECRET_KEY", "VOLCENGINE_TOS_REGION",
    ),
    "baidu_bos": ("BAIDU_BOS_ENDPOINT", "BAIDU_BOS_ACCESS_KEY", "BAIDU_BOS_SECRET_KEY", "BAIDU_BOS_REGION"),
}
#: Boolean variables among them (parsed as booleans, like Go).
_OTHER_STORAGE_BOOLEANS = frozenset({"AZURE_BLOB_STORAGE_USE_MANAGED_IDENTITY", "HUAWEI_OBS_PATH_STYLE"})

#: ``PLUGIN_STORAGE_TYPE`` values difydaemon runs on.
STORAGE_TYPES = ("local", "aws_s3")

#: Every variable :func:`load_config` reads, in documentation order.
VARIABLES: tuple[str, ...] = (
    # HTTP server, authentication, Dify inner API, platform
    "SERVER_HOST",
    "SERVER_PORT",
    "SERVER_KEY",
    "SERVER_TZ",
    "ADMIN_API_ENABLED",
    "ADMIN_API_KEY",
    "DIFY_INNER_API_URL",
    "DIFY_INNER_API_KEY",
    "PLATFORM",
    "HEALTH_API_LOG_ENABLED",
    "SERVER_MAX_CONNECTIONS",
    "ENDPOINT_READ_LIMIT",
    "PLUGIN_ENDPOINT_ENABLED",
    "PLUGIN_MAX_EXECUTION_TIMEOUT",
    "PLUGIN_INSTALL_TIMEOUT",
    "SHUTDOWN_GRACE_PERIOD",
    "PLUGIN_RUNTIME_BUFFER_SIZE",
    "PLUGIN_RUNTIME_MAX_BUFFER_SIZE",
    "PLUGIN_STDIO_BUFFER_SIZE",
    "PLUGIN_STDIO_MAX_BUFFER_SIZE",
    # object storage
    "PLUGIN_STORAGE_TYPE",
    "PLUGIN_STORAGE_LOCAL_ROOT",
    "PLUGIN_STORAGE_OSS_BUCKET",
    "S3_USE_AWS",
    "S3_USE_AWS_MANAGED_IAM",
    "S3_ENDPOINT",
    "S3_USE_PATH_STYLE",
    "AWS_ACCESS_KEY",
    "AWS_SECRET_KEY",
    "AWS_REGION",
    *(name for names in _OTHER_STORAGE_VARIABLES.values() for name in names),
    "PLUGIN_INSTALLED_PATH",
    "PLUGIN_PACKAGE_CACHE_PATH",
    "PLUGIN_MEDIA_CACHE_PATH",
    "PERSISTENCE_STORAGE_PATH",
    "PERSISTENCE_STORAGE_MAX_SIZE",
    "PLUGIN_MEDIA_CACHE_SIZE",
    "PLUGIN_ASSET_CACHE_SIZE",
    # packages and signatures
    "MAX_PLUGIN_PACKAGE_SIZE",
    "MAX_BUNDLE_PACKAGE_SIZE",
    "FORCE_VERIFYING_SIGNATURE",
    "THIRD_PARTY_SIGNATURE_VERIFICATION_ENABLED",
    "THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS",
    "ENFORCE_LANGGENIUS_PLUGIN_SIGNATURES",
    # database
    "DB_TYPE",
    "DB_HOST",
    "DB_PORT",
    "DB_USERNAME",
    "DB_PASSWORD",
    "DB_DATABASE",
    "DB_DEFAULT_DATABASE",
    "DB_SSL_MODE",
    "DB_MAX_IDLE_CONNS",
    "DB_MAX_OPEN_CONNS",
    "DB_CONN_MAX_LIFETIME",
    "DB_EXTRAS",
    "DB_CHARSET",
    "DB_CONNECT_TIMEOUT",
    "DB_READ_TIMEOUT",
    "DB_STARTUP_TIMEOUT",
    # local runtime
    "PLUGIN_WORKING_PATH",
    "PYTHON_INTERPRETER_PATH",
    "UV_PATH",
    "PYTHON_ENV_INIT_TIMEOUT",
    "PYTHON_COMPILE_ALL_EXTRA_ARGS",
    "PIP_MIRROR_URL",
    "PIP_PREFER_BINARY",
    "PIP_VERBOSE",
    "PIP_EXTRA_ARGS",
    "PIP_WHEELHOUSE_PATH",
    "PIP_PREFER_OFFLINE",
    "PLUGIN_IGNORE_UV_LOCK",
    "PLUGIN_LOCAL_LAUNCHING_CONCURRENT",
    "PLUGIN_LOCAL_INSTANCES",
    "PLUGIN_LOCAL_MAX_INSTANCES",
    "PLUGIN_LOCAL_SCALE_DOWN_DELAY",
    "PLUGIN_IDLE_TIMEOUT",
    "PLUGIN_HEARTBEAT_TIMEOUT",
    "PLUGIN_ENV_PASSTHROUGH",
    "PLUGIN_RUN_AS_USER",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    # remote debugging
    "PLUGIN_REMOTE_INSTALLING_ENABLED",
    "PLUGIN_REMOTE_INSTALLING_HOST",
    "PLUGIN_REMOTE_INSTALLING_PORT",
    "PLUGIN_REMOTE_INSTALLING_MAX_CONN",
    "PLUGIN_REMOTE_INSTALLING_MAX_SINGLE_TENANT_CONN",
    # backwards invocation
    "DIFY_BACKWARDS_INVOCATION_WRITE_TIMEOUT",
    "DIFY_BACKWARDS_INVOCATION_READ_TIMEOUT",
    "RESPONSE_MAX_BUFFER_SIZE",
    "DIFY_INVOCATION_CONNECTION_IDLE_TIMEOUT",
    # serverless
    "DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL",
    "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY",
    "DIFY_PLUGIN_SERVERLESS_CONNECTOR_LAUNCH_TIMEOUT",
    "MAX_SERVERLESS_RETRY_TIMES",
    "MAX_SERVERLESS_REQUEST_BYTES",
    "MAX_SERVERLESS_TRANSACTION_TIMEOUT",
    # redis (coordination between replicas; optional)
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_USERNAME",
    "REDIS_PASSWORD",
    "REDIS_DB",
    "REDIS_KEY_PREFIX",
    "REDIS_USE_SSL",
    "REDIS_SSL_CERT_REQS",
    "REDIS_SSL_CA_CERTS",
    "REDIS_USE_AZURE_MANAGED_IDENTITY",
    "REDIS_USE_SENTINEL",
    "REDIS_SENTINELS",
    "REDIS_SENTINEL_SERVICE_NAME",
    "REDIS_SENTINEL_USERNAME",
    "REDIS_SENTINEL_PASSWORD",
    "REDIS_SENTINEL_SOCKET_TIMEOUT",
    # cluster
    "CLUSTER_ADVERTISE_HOST",
    # observability: metrics, logs, traces
    "PROMETHEUS_ENABLED",
    "LOG_LEVEL",
    "LOG_OUTPUT_FORMAT",
    "LOG_FILE",
    "ENABLE_OTEL",
    "OTLP_BASE_ENDPOINT",
    "OTLP_TRACE_ENDPOINT",
    "OTLP_METRIC_ENDPOINT",
    "OTEL_API_KEY",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_TYPE",
    "OTEL_SAMPLING_RATE",
    "OTEL_BATCH_EXPORT_SCHEDULE_DELAY",
    "OTEL_MAX_QUEUE_SIZE",
    "OTEL_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BATCH_EXPORT_TIMEOUT",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_METRIC_EXPORT_TIMEOUT",
)

#: Every variable :func:`load_sri_config` reads besides the local runtime's
#: (``twistd dify-sri``, :mod:`difydaemon.sri`), in documentation order.
SRI_VARIABLES: tuple[str, ...] = (
    "SRI_HOST",
    "SRI_PORT",
    "SRI_API_KEY",
    "SRI_WORKING_PATH",
    "SRI_FUNCTION_HOST",
    "SRI_DAEMON_URL",
    "SRI_FUNCTION_START_TIMEOUT",
    "SRI_MAX_PACKAGE_SIZE",
)

_KNOWN = frozenset(VARIABLES) | frozenset(SRI_VARIABLES)

#: The daemon's own credentials: ``PLUGIN_ENV_PASSTHROUGH`` may not name them.
CREDENTIAL_VARIABLES: tuple[str, ...] = (
    "SERVER_KEY",
    "ADMIN_API_KEY",
    "DIFY_INNER_API_KEY",
    "DB_PASSWORD",
    "REDIS_PASSWORD",
    "REDIS_SENTINEL_PASSWORD",
    "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY",
    "SRI_API_KEY",
    "OTEL_API_KEY",
    "AWS_ACCESS_KEY",
    "AWS_SECRET_KEY",
    "TENCENT_COS_SECRET_KEY",
    "AZURE_BLOB_STORAGE_CONNECTION_STRING",
    "GCS_CREDENTIALS",
    "ALIYUN_OSS_ACCESS_KEY_SECRET",
    "HUAWEI_OBS_SECRET_KEY",
    "VOLCENGINE_TOS_SECRET_KEY",
    "BAIDU_BOS_SECRET_KEY",
)

PORT_MAX = 65535
_UINT16_MAX = 65535

# Go's strconv.ParseBool, exactly.
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})

_INTEGER = re.compile(r"[+-]?[0-9]+\Z")

PLATFORMS = ("local", "serverless")
DB_TYPES = ("sqlite", "postgresql", "pgbouncer")
_UNSUPPORTED_DB_TYPES = ("mysql", "oceanbase", "seekdb")
DB_SSL_MODES = ("disable", "require")
REDIS_SSL_CERT_REQS = ("", "CERT_NONE", "CERT_OPTIONAL", "CERT_REQUIRED")
LOG_LEVELS = ("DEBUG", "INFO", "WARN", "WARNING", "ERROR", "FATAL")
LOG_OUTPUT_FORMATS = ("text", "json")
#: OTLP/HTTP (the ``otel`` extra) or OTLP/gRPC (the ``otel-grpc`` extra)
OTLP_PROTOCOLS = ("http/protobuf", "grpc")
OTEL_EXPORTER_TYPES = ("otlp",)

_DEFAULT_BUFFER_SIZE = 1024
_DEFAULT_MAX_BUFFER_SIZE = 5242880


class ConfigErrors(ConfigError):
    """
    Several configuration problems found at once.

    ``variable`` and ``problem`` are those of the first problem, so code that
    handles a single :class:`ConfigError` still works; ``errors`` holds all
    of them in the order the variables are listed in :data:`VARIABLES`.
    """

    def __init__(self, errors: Iterable[ConfigError]) -> None:
        self.errors = tuple(sorted(errors, key=_documented_position))
        first = self.errors[0]
        super().__init__(first.variable, first.problem)
        self.args = ("; ".join(str(error) for error in self.errors),)


def _documented_position(error: ConfigError) -> int:
    """Where the variable of ``error`` is listed in :data:`VARIABLES` (then :data:`SRI_VARIABLES`)."""
    listed = VARIABLES + SRI_VARIABLES
    try:
        return listed.index(error.variable)
    except ValueError:
        return -1


# ---------------------------------------------------------------------------
# .env text


_DOTENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_DOUBLE_QUOTE_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t", "r": "\r", "$": "$"}


def read_dotenv(path: str) -> str | None:
    """
    The text of the ``.env`` file at ``path``, or None if there is none.

    :param path: the file to read, usually ``.env`` in the working directory.
    """
    try:
        with open(path, encoding="utf-8") as dotenv:
            return dotenv.read()
    except FileNotFoundError:
        return None


def parse_dotenv(text: str) -> dict[str, str]:
    """
    The ``KEY=VALUE`` assignments of a ``.env`` text.

    Understood: blank lines, ``#`` comment lines, an ``export`` prefix,
    values in single quotes (literal) or double quotes (``\\"``, ``\\\\``,
    ``\\n``, ``\\t``, ``\\r`` and ``\\$`` escapes), and a comment after a
    value when a space or tab precedes its ``#``.  A later line wins over an
    earlier one.  There is no variable interpolation.

    :raises ConfigError: for a line that is not an assignment; the variable
        is ``.env`` and the problem names the line number.
    """
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export ") or stripped.startswith("export\t"):
            stripped = stripped[len("export") :].lstrip()
        key, equals, raw = stripped.partition("=")
        key = key.strip()
        if not equals or not _DOTENV_KEY.match(key):
            raise ConfigError(".env", f"line {number}: expected KEY=VALUE")
        values[key] = _dotenv_value(raw, number)
    return values


def _dotenv_value(raw: str, number: int) -> str:
    """The value part of one ``.env`` line, unquoted and without comment."""
    body = raw.lstrip()
    if body[:1] in ("'", '"'):
        quote = body[0]
        value, rest = _unquote(body, quote, number)
        rest = rest.strip()
        if rest and not rest.startswith("#"):
            raise ConfigError(".env", f"line {number}: text after the closing quote")
        return value
    comment = re.search(r"[ \t]#", raw)
    if comment is not None:
        raw = raw[: comment.start()]
    return raw.strip()


def _unquote(body: str, quote: str, number: int) -> tuple[str, str]:
    """Split a quoted value into its unquoted text and what follows it."""
    if quote == "'":
        end = body.find("'", 1)
        if end < 0:
            raise ConfigError(".env", f"line {number}: missing closing quote")
        return body[1:end], body[end + 1 :]
    chars: list[str] = []
    index = 1
    while index < len(body):
        char = body[index]
        if char == "\\" and index + 1 < len(body):
            following = body[index + 1]
            chars.append(_DOUBLE_QUOTE_ESCAPES.get(following, "\\" + following))
            index += 2
            continue
        if char == '"':
            return "".join(chars), body[index + 1 :]
        chars.append(char)
        index += 1
    raise ConfigError(".env", f"line {number}: missing closing quote")


# ---------------------------------------------------------------------------
# Config value objects


@frozen
class StorageConfig:
    """
    The local object store and the key prefixes inside it (``config.storage``).

    Relative paths are relative to the daemon's working directory.
    """

    #: ``PLUGIN_STORAGE_TYPE``: ``local`` or ``aws_s3``.
    plugin_storage_type: str
    #: ``PLUGIN_STORAGE_LOCAL_ROOT``: directory holding the local store.
    plugin_storage_local_root: str
    #: ``PLUGIN_INSTALLED_PATH``: prefix of installed packages.
    plugin_installed_path: str
    #: ``PLUGIN_PACKAGE_CACHE_PATH``: prefix of uploaded packages.
    plugin_package_cache_path: str
    #: ``PLUGIN_MEDIA_CACHE_PATH``: prefix of icon assets.
    plugin_media_cache_path: str
    #: ``PERSISTENCE_STORAGE_PATH``: prefix of the plugins' KV storage.
    persistence_storage_path: str
    #: ``PERSISTENCE_STORAGE_MAX_SIZE``: bytes per tenant and plugin.
    persistence_storage_max_size: int
    #: ``PLUGIN_MEDIA_CACHE_SIZE``: in-memory LRU entries for assets.
    plugin_media_cache_size: int
    #: ``PLUGIN_ASSET_CACHE_SIZE``: LRU entries for extract-asset.
    plugin_asset_cache_size: int
    #: ``PLUGIN_STORAGE_OSS_BUCKET``: the bucket of a cloud store.
    plugin_storage_oss_bucket: str = ""
    #: ``S3_USE_AWS``: AWS's credential chain when no keys are given (else
    #: an S3-compatible store: ``S3_ENDPOINT`` and keys required).
    s3_use_aws: bool = True
    #: ``S3_USE_AWS_MANAGED_IAM``: credentials from the instance or pod role
    #: (the credential chain), never from the keys.
    s3_use_aws_managed_iam: bool = False
    #: ``S3_ENDPOINT``: the store's URL; empty for AWS's own.
    s3_endpoint: str = ""
    #: ``S3_USE_PATH_STYLE``: ``host/bucket/key`` addressing.
    s3_use_path_style: bool = True
    #: ``AWS_ACCESS_KEY``.
    aws_access_key: str = field(default="", repr=False)
    #: ``AWS_SECRET_KEY``.
    aws_secret_key: str = field(default="", repr=False)
    #: ``AWS_REGION``: empty for botocore's own resolution.
    aws_region: str = ""
    #: the other Go stores' variables that are set (``TENCENT_COS_*``,
    #: ``AZURE_BLOB_*``, ...): sorted ``(name, value)`` pairs, booleans
    #: parsed; none of those stores runs yet
    other_storage_variables: tuple = field(default=(), repr=False)


@frozen
class PackageConfig:
    """Package size limits and signature policy (``config.packages``)."""

    #: ``MAX_PLUGIN_PACKAGE_SIZE``: bytes, upload and uncompressed total.
    max_plugin_package_size: int
    #: ``MAX_BUNDLE_PACKAGE_SIZE``: bytes.
    max_bundle_package_size: int
    #: ``FORCE_VERIFYING_SIGNATURE``: refuse unsigned packages.
    force_verifying_signature: bool
    #: ``THIRD_PARTY_SIGNATURE_VERIFICATION_ENABLED``: accept extra keys.
    third_party_signature_verification_enabled: bool
    #: ``THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS``: PEM file paths.
    third_party_signature_verification_public_keys: tuple[str, ...]
    #: ``ENFORCE_LANGGENIUS_PLUGIN_SIGNATURES``: a package inside a bundle
    #: with author langgenius must be officially signed (single uploads are
    #: not concerned, as in Go).
    enforce_langgenius_plugin_signatures: bool


@frozen
class DatabaseConfig:
    """
    Where the daemon keeps its tables (``config.db``).

    For ``sqlite`` only ``db_database`` (the file path) matters; the other
    fields describe a PostgreSQL server.
    """

    #: ``DB_TYPE``: ``sqlite``, ``postgresql`` or ``pgbouncer``.
    db_type: str
    #: ``DB_HOST`` (None when unset).
    db_host: str | None
    #: ``DB_PORT`` (None when unset).
    db_port: int | None
    #: ``DB_USERNAME`` (None when unset).
    db_username: str | None
    #: ``DB_PASSWORD`` (empty when unset).
    db_password: str = field(repr=False)
    #: ``DB_DATABASE``: the SQLite file, or the PostgreSQL database name.
    db_database: str
    #: ``DB_DEFAULT_DATABASE``: connected to when ``db_database`` must be
    #: created (empty for sqlite).
    db_default_database: str
    #: ``DB_SSL_MODE``: ``disable`` or ``require``.
    db_ssl_mode: str
    #: ``DB_MAX_IDLE_CONNS``.
    db_max_idle_conns: int
    #: ``DB_MAX_OPEN_CONNS``: size of the PostgreSQL connection pool.
    db_max_open_conns: int
    #: ``DB_CONN_MAX_LIFETIME``: seconds; 0 means no limit.
    db_conn_max_lifetime: int
    #: ``DB_EXTRAS``: extra libpq ``key=value`` connection parameters.
    db_extras: str
    #: ``DB_CHARSET``: client encoding, empty for the server's default.
    db_charset: str
    #: ``DB_CONNECT_TIMEOUT``: seconds one connection attempt may take.
    db_connect_timeout: float
    #: ``DB_READ_TIMEOUT``: seconds to wait for the answer to one statement
    #: before the connection is taken for dead.
    db_read_timeout: float
    #: ``DB_STARTUP_TIMEOUT``: seconds the daemon keeps trying to reach the
    #: database at start-up; 0 gives up after the first try.
    db_startup_timeout: float

    @property
    def engine(self) -> str:
        """``sqlite`` or ``postgresql`` (``pgbouncer`` is PostgreSQL)."""
        return "sqlite" if self.db_type == "sqlite" else "postgresql"


@frozen
class LocalRuntimeConfig:
    """
    How local plugins are unpacked, given a venv and launched
    (``config.local_runtime``).
    """

    #: ``PLUGIN_WORKING_PATH``: where packages are unpacked and venvs built.
    plugin_working_path: str
    #: ``PYTHON_INTERPRETER_PATH``: used to find uv when ``uv_path`` is empty.
    python_interpreter_path: str
    #: ``UV_PATH``: the uv binary; empty means discover it.
    uv_path: str
    #: ``PYTHON_ENV_INIT_TIMEOUT``: seconds of installer silence tolerated.
    python_env_init_timeout: int
    #: ``PYTHON_COMPILE_ALL_EXTRA_ARGS``: extra compileall arguments.
    python_compile_all_extra_args: str
    #: ``PIP_MIRROR_URL``: index URL for dependency installs, empty for PyPI.
    pip_mirror_url: str
    #: ``PIP_PREFER_BINARY``.
    pip_prefer_binary: bool
    #: ``PIP_VERBOSE``.
    pip_verbose: bool
    #: ``PIP_EXTRA_ARGS``: extra installer arguments.
    pip_extra_args: str
    #: ``PIP_WHEELHOUSE_PATH``: a local directory of wheels tried before any
    #: index; empty for none.
    pip_wheelhouse_path: str
    #: ``PIP_PREFER_OFFLINE`` (default true): a ``requirements.txt`` install
    #: first tries uv's cache alone (``--offline``), then the index.
    pip_prefer_offline: bool
    #: ``PLUGIN_IGNORE_UV_LOCK``: do not pass ``--frozen`` for a uv.lock.
    plugin_ignore_uv_lock: bool
    #: ``PLUGIN_LOCAL_LAUNCHING_CONCURRENT``: launches running at once.
    plugin_local_launching_concurrent: int
    #: ``PLUGIN_LOCAL_INSTANCES``: processes per local plugin (ours).
    plugin_local_instances: int
    #: ``PLUGIN_LOCAL_MAX_INSTANCES``: the most processes load may bring a
    #: local plugin; at least ``plugin_local_instances`` (ours).
    plugin_local_max_instances: int
    #: ``PLUGIN_LOCAL_SCALE_DOWN_DELAY``: seconds the load must not have
    #: needed every process before one above the minimum stops (ours).
    plugin_local_scale_down_delay: int
    #: ``PLUGIN_IDLE_TIMEOUT``: seconds without a session after which a
    #: local plugin is stopped until its next request; 0: never (ours).
    plugin_idle_timeout: int
    #: ``PLUGIN_HEARTBEAT_TIMEOUT``: seconds without any output (the SDK
    #: heartbeats every 10 s) after which a ready instance is hung (ours).
    plugin_heartbeat_timeout: int
    #: ``PLUGIN_ENV_PASSTHROUGH``: names of variables plugin processes and
    #: their builds inherit besides the allow-list (ours).
    plugin_env_passthrough: tuple[str, ...]
    #: ``PLUGIN_RUN_AS_USER``: the user name or uid plugin processes and
    #: their builds run as (a daemon running as root); empty for the
    #: daemon's own user (ours).
    plugin_run_as_user: str
    #: ``HTTP_PROXY``, falling back to ``http_proxy``; empty for none.
    http_proxy: str
    #: ``HTTPS_PROXY``, falling back to ``https_proxy``; empty for none.
    https_proxy: str
    #: ``NO_PROXY``, falling back to ``no_proxy``; empty for none.
    no_proxy: str

    @property
    def python_env_init_timeout_seconds(self) -> float:
        """``python_env_init_timeout`` in seconds."""
        return float(self.python_env_init_timeout)

    @property
    def plugin_idle_timeout_seconds(self) -> float | None:
        """``plugin_idle_timeout`` in seconds, None for never."""
        return float(self.plugin_idle_timeout) if self.plugin_idle_timeout else None

    @property
    def plugin_heartbeat_timeout_seconds(self) -> float:
        """``plugin_heartbeat_timeout`` in seconds."""
        return float(self.plugin_heartbeat_timeout)

    @property
    def pip_extra_argv(self) -> tuple[str, ...]:
        """``pip_extra_args`` split on whitespace."""
        return tuple(self.pip_extra_args.split())

    @property
    def python_compile_all_extra_argv(self) -> tuple[str, ...]:
        """``python_compile_all_extra_args`` split on whitespace."""
        return tuple(self.python_compile_all_extra_args.split())

    def proxy_environment(self) -> dict[str, str]:
        """
        The proxy variables to add to a plugin's or an installer's
        environment: upper- and lower-case names of each configured proxy.
        """
        environment: dict[str, str] = {}
        for name, value in (
            ("HTTP_PROXY", self.http_proxy),
            ("HTTPS_PROXY", self.https_proxy),
            ("NO_PROXY", self.no_proxy),
        ):
            if value:
                environment[name] = value
                environment[name.lower()] = value
        return environment


@frozen
class RemoteDebugConfig:
    """The TCP listener that debug plugins dial into (``config.remote``)."""

    #: ``PLUGIN_REMOTE_INSTALLING_ENABLED``.
    plugin_remote_installing_enabled: bool
    #: ``PLUGIN_REMOTE_INSTALLING_HOST`` (empty when disabled and unset).
    plugin_remote_installing_host: str
    #: ``PLUGIN_REMOTE_INSTALLING_PORT`` (None when disabled and unset).
    plugin_remote_installing_port: int | None
    #: ``PLUGIN_REMOTE_INSTALLING_MAX_CONN``.
    plugin_remote_installing_max_conn: int
    #: ``PLUGIN_REMOTE_INSTALLING_MAX_SINGLE_TENANT_CONN``.
    plugin_remote_installing_max_single_tenant_conn: int


@frozen
class InvocationConfig:
    """Calls from the daemon to the Dify inner API (``config.invocation``)."""

    #: ``DIFY_BACKWARDS_INVOCATION_WRITE_TIMEOUT``: milliseconds.
    dify_backwards_invocation_write_timeout: int
    #: ``DIFY_BACKWARDS_INVOCATION_READ_TIMEOUT``: milliseconds.
    dify_backwards_invocation_read_timeout: int
    #: ``RESPONSE_MAX_BUFFER_SIZE``: bytes per length-prefixed frame.
    response_max_buffer_size: int
    #: ``DIFY_INVOCATION_CONNECTION_IDLE_TIMEOUT``: seconds.
    dify_invocation_connection_idle_timeout: int

    @property
    def write_timeout_seconds(self) -> float:
        """``dify_backwards_invocation_write_timeout`` in seconds."""
        return self.dify_backwards_invocation_write_timeout / 1000.0

    @property
    def read_timeout_seconds(self) -> float:
        """``dify_backwards_invocation_read_timeout`` in seconds."""
        return self.dify_backwards_invocation_read_timeout / 1000.0

    @property
    def connection_idle_timeout_seconds(self) -> float:
        """``dify_invocation_connection_idle_timeout`` in seconds."""
        return float(self.dify_invocation_connection_idle_timeout)


@frozen
class ServerlessConfig:
    """The serverless connector (``config.serverless``)."""

    #: ``DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL`` (None when unset).
    dify_plugin_serverless_connector_url: str | None
    #: ``DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY`` (None when unset).
    dify_plugin_serverless_connector_api_key: str | None = field(repr=False)
    #: ``DIFY_PLUGIN_SERVERLESS_CONNECTOR_LAUNCH_TIMEOUT``: seconds.
    dify_plugin_serverless_connector_launch_timeout: int
    #: ``MAX_SERVERLESS_RETRY_TIMES``.
    max_serverless_retry_times: int
    #: ``MAX_SERVERLESS_REQUEST_BYTES``.
    max_serverless_request_bytes: int
    #: ``MAX_SERVERLESS_TRANSACTION_TIMEOUT``: seconds.
    max_serverless_transaction_timeout: int

    @property
    def launch_timeout_seconds(self) -> float:
        """``dify_plugin_serverless_connector_launch_timeout`` in seconds."""
        return float(self.dify_plugin_serverless_connector_launch_timeout)

    @property
    def transaction_timeout_seconds(self) -> float:
        """``max_serverless_transaction_timeout`` in seconds."""
        return float(self.max_serverless_transaction_timeout)


@frozen
class RedisConfig:
    """
    A Redis connection (``config.redis``), for replicas that coordinate
    through it (:mod:`difydaemon.coordination`); a daemon alone needs none.
    """

    #: ``REDIS_HOST`` (None when unset).
    redis_host: str | None
    #: ``REDIS_PORT`` (None when unset).
    redis_port: int | None
    #: ``REDIS_USERNAME``.
    redis_username: str
    #: ``REDIS_PASSWORD``.
    redis_password: str = field(repr=False)
    #: ``REDIS_DB``.
    redis_db: int
    #: ``REDIS_KEY_PREFIX``.
    redis_key_prefix: str
    #: ``REDIS_USE_SSL``.
    redis_use_ssl: bool
    #: ``REDIS_SSL_CERT_REQS``: empty, ``CERT_NONE``, ``CERT_OPTIONAL`` or
    #: ``CERT_REQUIRED`` (upper-cased).
    redis_ssl_cert_reqs: str
    #: ``REDIS_SSL_CA_CERTS``: CA file path.
    redis_ssl_ca_certs: str
    #: ``REDIS_USE_AZURE_MANAGED_IDENTITY``.
    redis_use_azure_managed_identity: bool
    #: ``REDIS_USE_SENTINEL``.
    redis_use_sentinel: bool
    #: ``REDIS_SENTINELS``: ``host:port`` entries.
    redis_sentinels: tuple[str, ...]
    #: ``REDIS_SENTINEL_SERVICE_NAME``.
    redis_sentinel_service_name: str
    #: ``REDIS_SENTINEL_USERNAME``.
    redis_sentinel_username: str
    #: ``REDIS_SENTINEL_PASSWORD``.
    redis_sentinel_password: str = field(repr=False)
    #: ``REDIS_SENTINEL_SOCKET_TIMEOUT``: seconds, 0 for the client default.
    redis_sentinel_socket_timeout: float

    @property
    def configured(self) -> bool:
        """Whether a Redis server (or sentinel set) was named."""
        return bool(self.redis_host) or bool(self.redis_sentinels)

    @property
    def in_use(self) -> bool:
        """Whether the daemon coordinates through Redis: ``REDIS_HOST`` is set or Sentinel is on."""
        return bool(self.redis_host) or self.redis_use_sentinel


@frozen
class ClusterConfig:
    """How this replica is known to the others (``config.cluster``)."""

    #: ``CLUSTER_ADVERTISE_HOST``: the host other replicas reach this one
    #: at on ``SERVER_PORT``; None when unset (then detected at start-up).
    cluster_advertise_host: str | None


@frozen
class ObservabilityConfig:
    """
    Metrics, logs and traces (``config.observability``).  Milliseconds
    where the variable is in milliseconds, as in Go.
    """

    #: ``PROMETHEUS_ENABLED``: serve ``/metrics`` and ``/metrics/``.
    prometheus_enabled: bool
    #: ``LOG_LEVEL``: the least severe level logged, upper case
    #: (``DEBUG``, ``INFO``, ``WARN``, ``ERROR``; ``WARNING`` and ``FATAL``
    #: are read as ``WARN`` and ``ERROR``).
    log_level: str
    #: ``LOG_OUTPUT_FORMAT``: ``text`` or ``json`` (one JSON object a line).
    log_output_format: str
    #: ``LOG_FILE``: a file the log is also appended to; None for none.
    log_file: str | None
    #: ``ENABLE_OTEL``: export spans over OTLP.
    enable_otel: bool
    #: ``OTLP_BASE_ENDPOINT``: the collector's base URL.
    otlp_base_endpoint: str
    #: ``OTLP_TRACE_ENDPOINT``: the traces URL; None for the base's ``/v1/traces``.
    otlp_trace_endpoint: str | None
    #: ``OTLP_METRIC_ENDPOINT``: the metrics URL; None for the base's ``/v1/metrics``.
    otlp_metric_endpoint: str | None
    #: ``OTEL_API_KEY``: sent as ``Authorization: Bearer`` to the collector.
    otel_api_key: str = field(repr=False)
    #: ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf`` or ``grpc``.
    otel_exporter_otlp_protocol: str
    #: ``OTEL_EXPORTER_TYPE``: ``otlp``.
    otel_exporter_type: str
    #: ``OTEL_SAMPLING_RATE``: the share of new traces sampled, 0 to 1.
    otel_sampling_rate: float
    #: ``OTEL_BATCH_EXPORT_SCHEDULE_DELAY`` (ms) between batch exports.
    otel_batch_export_schedule_delay: int
    #: ``OTEL_MAX_QUEUE_SIZE``: spans queued for export at most.
    otel_max_queue_size: int
    #: ``OTEL_MAX_EXPORT_BATCH_SIZE``: spans per export at most.
    otel_max_export_batch_size: int
    #: ``OTEL_BATCH_EXPORT_TIMEOUT`` (ms) per export.
    otel_batch_export_timeout: int
    #: ``OTEL_METRIC_EXPORT_INTERVAL`` (ms) between two exports of the metrics.
    otel_metric_export_interval: int
    #: ``OTEL_METRIC_EXPORT_TIMEOUT`` (ms) one export of the metrics may take.
    otel_metric_export_timeout: int

    @property
    def trace_endpoint(self) -> str:
        """
        Where spans go: ``OTLP_TRACE_ENDPOINT``, else the base's
        ``/v1/traces`` over HTTP, the base itself over gRPC (which has no
        paths).
        """
        return self._endpoint(self.otlp_trace_endpoint, "/v1/traces")

    @property
    def metric_endpoint(self) -> str:
        """Where metrics go, as :attr:`trace_endpoint` says for ``/v1/metrics``."""
        return self._endpoint(self.otlp_metric_endpoint, "/v1/metrics")

    def _endpoint(self, own: str | None, path: str) -> str:
        if own:
            return own
        if self.otel_exporter_otlp_protocol == "grpc":
            return self.otlp_base_endpoint
        return self.otlp_base_endpoint.rstrip("/") + path


@frozen
class Config:
    """
    The whole daemon configuration; see the module docstring for naming.

    Build it with :func:`load_config`.  Secrets (keys and passwords) are
    left out of the ``repr`` of every group so that logging a config is safe.
    """

    #: ``SERVER_HOST``: HTTP bind address.
    server_host: str
    #: ``SERVER_PORT``: HTTP port.
    server_port: int
    #: ``SERVER_KEY``: the expected ``X-Api-Key``.
    server_key: str = field(repr=False)
    #: ``SERVER_TZ``: time zone for local times.
    server_tz: str
    #: ``ADMIN_API_ENABLED``.
    admin_api_enabled: bool
    #: ``ADMIN_API_KEY``: the expected ``X-Admin-Api-Key`` (empty if unset).
    admin_api_key: str = field(repr=False)
    #: ``DIFY_INNER_API_URL``: base URL of Dify's inner API.
    dify_inner_api_url: str
    #: ``DIFY_INNER_API_KEY``: sent as ``X-Inner-Api-Key``.
    dify_inner_api_key: str = field(repr=False)
    #: ``PLATFORM``: ``local`` or ``serverless``.
    platform: str
    #: ``HEALTH_API_LOG_ENABLED``: log ``/health/check`` requests.
    health_api_log_enabled: bool
    #: ``SERVER_MAX_CONNECTIONS``: open HTTP connections at most; more are
    #: closed as soon as they are accepted.
    server_max_connections: int
    #: ``ENDPOINT_READ_LIMIT``: bytes of an ``/e/...`` request body read at most.
    endpoint_read_limit: int
    #: ``PLUGIN_ENDPOINT_ENABLED``: serve ``/e/...``.
    plugin_endpoint_enabled: bool
    #: ``PLUGIN_MAX_EXECUTION_TIMEOUT``: seconds per dispatch or endpoint call.
    plugin_max_execution_timeout: int
    #: ``PLUGIN_INSTALL_TIMEOUT``: minutes per install or upgrade job.
    plugin_install_timeout: int
    #: ``SHUTDOWN_GRACE_PERIOD``: seconds a daemon stop lets open plugin
    #: sessions finish before it ends them with an error (ours).
    shutdown_grace_period: int
    #: Initial line buffer for plugin output: ``PLUGIN_STDIO_BUFFER_SIZE``
    #: when customised, else ``PLUGIN_RUNTIME_BUFFER_SIZE``.
    plugin_runtime_buffer_size: int
    #: Longest plugin output line: ``PLUGIN_STDIO_MAX_BUFFER_SIZE`` when
    #: customised, else ``PLUGIN_RUNTIME_MAX_BUFFER_SIZE``.
    plugin_runtime_max_buffer_size: int
    storage: StorageConfig
    packages: PackageConfig
    db: DatabaseConfig
    local_runtime: LocalRuntimeConfig
    remote: RemoteDebugConfig
    invocation: InvocationConfig
    serverless: ServerlessConfig
    redis: RedisConfig
    cluster: ClusterConfig
    observability: ObservabilityConfig

    @property
    def max_execution_timeout_seconds(self) -> float:
        """``plugin_max_execution_timeout`` in seconds."""
        return float(self.plugin_max_execution_timeout)

    @property
    def install_timeout_seconds(self) -> float:
        """``plugin_install_timeout`` (minutes) in seconds."""
        return self.plugin_install_timeout * 60.0

    @property
    def shutdown_grace_period_seconds(self) -> float:
        """``shutdown_grace_period`` in seconds."""
        return float(self.shutdown_grace_period)


# ---------------------------------------------------------------------------
# Reading typed values


class _Values:
    """
    Typed reads of variables from the environment, then the ``.env`` text.

    A bad value is recorded (not raised) and the read returns the default,
    so that one pass finds every problem.
    """

    def __init__(self, environ: Mapping[str, str], dotenv: Mapping[str, str]) -> None:
        self._sources = (environ, dotenv)
        self.errors: list[ConfigError] = []

    def fail(self, name: str, problem: str) -> None:
        """Record a problem with variable ``name``."""
        self.errors.append(ConfigError(name, problem))

    def raw(self, name: str) -> str | None:
        """The value of ``name`` as given, or None if unset or empty."""
        if name not in _KNOWN:
            raise KeyError(f"{name} is not listed in difydaemon.config.VARIABLES")
        for source in self._sources:
            if name in source:
                value = source[name]
                return value if value != "" else None
        return None

    def is_set(self, name: str) -> bool:
        """Whether ``name`` is given at all, even as an empty value."""
        if name not in _KNOWN:
            raise KeyError(f"{name} is not listed in difydaemon.config.VARIABLES")
        return any(name in source for source in self._sources)

    def stripped(self, name: str) -> str | None:
        """The value of ``name`` with surrounding blanks removed, or None."""
        value = self.raw(name)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def string(self, name: str, default: str = "") -> str:
        """A string; the default when unset."""
        value = self.raw(name)
        return default if value is None else value

    def optional_string(self, name: str) -> str | None:
        """A string, or None when unset."""
        return self.raw(name)

    def required_string(self, name: str, why: str = "") -> str:
        """A string that must be set."""
        value = self.raw(name)
        if value is None:
            self.fail(name, "is required" + why)
            return ""
        return value

    def url(self, name: str, value: str | None) -> None:
        """Check that a set value is an http(s) URL."""
        if value and not (value.startswith("http://") or value.startswith("https://")):
            self.fail(name, f"must be an http:// or https:// URL, got {value!r}")

    def integer(
        self,
        name: str,
        default: int | None,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int | None:
        """A decimal integer within ``[minimum, maximum]``."""
        text = self.stripped(name)
        if text is None:
            return default
        if not _INTEGER.match(text):
            self.fail(name, f"{text!r} is not an integer")
            return default
        value = int(text)
        if (minimum is not None and value < minimum) or (
            maximum is not None and value > maximum
        ):
            self.fail(name, _range_problem(value, minimum, maximum))
            return default
        return value

    def port(self, name: str) -> int | None:
        """A TCP port number, or None when unset."""
        return self.integer(name, None, 1, PORT_MAX)

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        """A finite float not below ``minimum``."""
        text = self.stripped(name)
        if text is None:
            return default
        try:
            value = float(text)
        except ValueError:
            self.fail(name, f"{text!r} is not a number")
            return default
        if not math.isfinite(value):
            self.fail(name, f"{text!r} is not a finite number")
            return default
        if value < minimum:
            self.fail(name, f"must be at least {minimum}, got {text}")
            return default
        return value

    def duration(self, name: str, default: float, allow_zero: bool = False) -> float:
        """
        Seconds, written as Go writes a duration (``5s``, ``1m30s``,
        ``250ms``) or as a bare number of seconds; 0 only if ``allow_zero``.
        """
        text = self.stripped(name)
        if text is None:
            return default
        seconds = parse_duration(text)
        if seconds is None:
            self.fail(name, f"{text!r} is not a duration (e.g. 5s, 1m30s, 250ms, or seconds)")
            return default
        if seconds == 0 and not allow_zero:
            self.fail(name, "must be more than 0")
            return default
        return seconds

    def boolean(self, name: str, default: bool) -> bool:
        """A boolean spelled as Go's ``strconv.ParseBool`` accepts."""
        text = self.stripped(name)
        if text is None:
            return default
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        self.fail(name, f"{text!r} is not a boolean (use true or false)")
        return default

    def choice(self, name: str, default: str | None, choices: Iterable[str]) -> str | None:
        """One of ``choices``."""
        text = self.stripped(name)
        if text is None:
            return default
        choices = tuple(choices)
        if text not in choices:
            self.fail(name, f"must be one of {', '.join(choices)}; got {text!r}")
            return default
        return text

    def listing(self, name: str) -> tuple[str, ...]:
        """A comma-separated list, blanks around items and empty items dropped."""
        text = self.raw(name)
        if text is None:
            return ()
        return tuple(item.strip() for item in text.split(",") if item.strip())


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_BARE_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]*)?\Z|\.[0-9]+\Z")


def parse_duration(text: str) -> float | None:
    """
    The seconds of a non-negative Go duration (``time.ParseDuration``:
    ``1h2m3.5s``, ``250ms``, ``0``) or of a bare number of seconds; None
    when ``text`` is neither.
    """
    text = text.strip()
    if text.startswith("+"):
        text = text[1:]
    if _BARE_SECONDS.match(text):
        return float(text)
    position = 0
    seconds = 0.0
    while position < len(text):
        part = _DURATION_PART.match(text, position)
        if part is None:
            return None
        seconds += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
        position = part.end()
    return seconds if position else None


def _range_problem(value: int, minimum: int | None, maximum: int | None) -> str:
    """The text saying that ``value`` is out of range."""
    if maximum is None:
        return f"must be at least {minimum}, got {value}"
    if minimum is None:
        return f"must be at most {maximum}, got {value}"
    return f"must be between {minimum} and {maximum}, got {value}"


# ---------------------------------------------------------------------------
# Building the Config


def _collect(build, environ: Mapping[str, str], dotenv_text: str | None):
    """Run ``build`` over the values; raise what it found wrong, else return what it built."""
    dotenv = parse_dotenv(dotenv_text) if dotenv_text is not None else {}
    values = _Values(environ, dotenv)
    config = build(values)
    if len(values.errors) == 1:
        raise values.errors[0]
    if values.errors:
        raise ConfigErrors(values.errors)
    return config


def load_config(environ: Mapping[str, str], dotenv_text: str | None = None) -> Config:
    """
    Build the configuration from ``environ`` and an optional ``.env`` text.

    A pure function: it reads nothing but its arguments.

    :param environ: usually ``os.environ``; wins over ``dotenv_text``.
    :param dotenv_text: the text of a ``.env`` file (see :func:`parse_dotenv`).
    :raises ConfigError: naming the variable, when one value is bad;
        :class:`ConfigErrors` when several are.
    """
    return _collect(_build, environ, dotenv_text)


def _build(values: _Values) -> Config:
    """Read every variable, collecting problems in ``values.errors``."""
    server_host = values.string("SERVER_HOST", "0.0.0.0")
    server_port = values.integer("SERVER_PORT", 5002, 1, PORT_MAX)
    server_key = values.required_string("SERVER_KEY")
    server_tz = values.string("SERVER_TZ", "UTC")
    _check_time_zone(values, server_tz)
    admin_api_enabled = values.boolean("ADMIN_API_ENABLED", False)
    admin_api_key = values.string("ADMIN_API_KEY")
    if admin_api_enabled and len(admin_api_key) < 10:
        values.fail(
            "ADMIN_API_KEY",
            "must be at least 10 characters long when ADMIN_API_ENABLED is true",
        )
    dify_inner_api_url = values.required_string("DIFY_INNER_API_URL")
    values.url("DIFY_INNER_API_URL", dify_inner_api_url)
    dify_inner_api_key = values.required_string("DIFY_INNER_API_KEY")
    platform = values.raw("PLATFORM")
    if platform is None:
        values.fail("PLATFORM", "is required (local or serverless)")
    else:
        platform = values.choice("PLATFORM", None, PLATFORMS)

    buffer_size, max_buffer_size = _buffer_sizes(values)

    return Config(
        server_host=server_host,
        server_port=server_port,
        server_key=server_key,
        server_tz=server_tz,
        admin_api_enabled=admin_api_enabled,
        admin_api_key=admin_api_key,
        dify_inner_api_url=dify_inner_api_url,
        dify_inner_api_key=dify_inner_api_key,
        platform=platform or "",
        health_api_log_enabled=values.boolean("HEALTH_API_LOG_ENABLED", True),
        server_max_connections=values.integer("SERVER_MAX_CONNECTIONS", 4096, 1),
        endpoint_read_limit=values.integer("ENDPOINT_READ_LIMIT", 16 * 1024 * 1024, 1),
        plugin_endpoint_enabled=values.boolean("PLUGIN_ENDPOINT_ENABLED", True),
        plugin_max_execution_timeout=values.integer("PLUGIN_MAX_EXECUTION_TIMEOUT", 600, 1),
        plugin_install_timeout=values.integer("PLUGIN_INSTALL_TIMEOUT", 15, 1),
        shutdown_grace_period=values.integer("SHUTDOWN_GRACE_PERIOD", 6, 0),
        plugin_runtime_buffer_size=buffer_size,
        plugin_runtime_max_buffer_size=max_buffer_size,
        storage=_storage(values),
        packages=_packages(values),
        db=_database(values),
        local_runtime=_local_runtime(values, platform),
        remote=_remote(values),
        invocation=_invocation(values),
        serverless=_serverless(values, platform),
        redis=_redis(values),
        cluster=_cluster(values),
        observability=_observability(values),
    )


def _observability(values: _Values) -> ObservabilityConfig:
    level = values.choice("LOG_LEVEL", "INFO", LOG_LEVELS + tuple(name.lower() for name in LOG_LEVELS))
    level = {"WARNING": "WARN", "FATAL": "ERROR"}.get(level.upper(), level.upper())
    base = values.string("OTLP_BASE_ENDPOINT", "http://localhost:4318")
    values.url("OTLP_BASE_ENDPOINT", base)
    trace = values.stripped("OTLP_TRACE_ENDPOINT")
    values.url("OTLP_TRACE_ENDPOINT", trace)
    metric = values.stripped("OTLP_METRIC_ENDPOINT")
    values.url("OTLP_METRIC_ENDPOINT", metric)
    rate = values.number("OTEL_SAMPLING_RATE", 1.0)
    if rate > 1.0:
        values.fail("OTEL_SAMPLING_RATE", f"must be between 0 and 1, got {rate:g}")
        rate = 1.0
    return ObservabilityConfig(
        prometheus_enabled=values.boolean("PROMETHEUS_ENABLED", True),
        log_level=level,
        log_output_format=values.choice("LOG_OUTPUT_FORMAT", "text", LOG_OUTPUT_FORMATS),
        log_file=values.stripped("LOG_FILE"),
        enable_otel=values.boolean("ENABLE_OTEL", False),
        otlp_base_endpoint=base,
        otlp_trace_endpoint=trace,
        otlp_metric_endpoint=metric,
        otel_api_key=values.string("OTEL_API_KEY"),
        otel_exporter_otlp_protocol=values.choice("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf", OTLP_PROTOCOLS),
        otel_exporter_type=values.choice("OTEL_EXPORTER_TYPE", "otlp", OTEL_EXPORTER_TYPES),
        otel_sampling_rate=rate,
        otel_batch_export_schedule_delay=values.integer("OTEL_BATCH_EXPORT_SCHEDULE_DELAY", 5000, 1),
        otel_max_queue_size=values.integer("OTEL_MAX_QUEUE_SIZE", 2048, 1),
        otel_max_export_batch_size=values.integer("OTEL_MAX_EXPORT_BATCH_SIZE", 512, 1),
        otel_batch_export_timeout=values.integer("OTEL_BATCH_EXPORT_TIMEOUT", 10000, 1),
        otel_metric_export_interval=values.integer("OTEL_METRIC_EXPORT_INTERVAL", 60000, 1),
        otel_metric_export_timeout=values.integer("OTEL_METRIC_EXPORT_TIMEOUT", 30000, 1),
    )


def _check_time_zone(values: _Values, name: str) -> None:
    """Record a problem if ``SERVER_TZ`` is not a known IANA zone."""
    if name == "UTC":
        # Always valid, even where no time-zone database is installed.
        return
    # imported for another zone only: zoneinfo brings sysconfig, memory the
    # default daemon would hold for nothing
    from zoneinfo import ZoneInfo

    try:
        ZoneInfo(name)
    except (ValueError, LookupError, OSError):
        values.fail("SERVER_TZ", f"{name!r} is not a known time zone")


def _buffer_sizes(values: _Values) -> tuple[int, int]:
    """The effective initial and maximum line buffers for plugin output."""
    size = values.integer("PLUGIN_RUNTIME_BUFFER_SIZE", _DEFAULT_BUFFER_SIZE, 1)
    max_size = values.integer("PLUGIN_RUNTIME_MAX_BUFFER_SIZE", _DEFAULT_MAX_BUFFER_SIZE, 1)
    # The legacy names only win when customised: 0 or the default value
    # means "not customised", as in Go.
    legacy = values.integer("PLUGIN_STDIO_BUFFER_SIZE", _DEFAULT_BUFFER_SIZE, 0)
    legacy_max = values.integer("PLUGIN_STDIO_MAX_BUFFER_SIZE", _DEFAULT_MAX_BUFFER_SIZE, 0)
    if legacy not in (0, _DEFAULT_BUFFER_SIZE):
        size = legacy
    if legacy_max not in (0, _DEFAULT_MAX_BUFFER_SIZE):
        max_size = legacy_max
    if size > max_size:
        values.fail(
            "PLUGIN_RUNTIME_MAX_BUFFER_SIZE",
            f"the maximum line buffer ({max_size}) is smaller than the initial one ({size})",
        )
    return size, max_size


def _storage(values: _Values) -> StorageConfig:
    """The ``storage`` group."""
    storage_type = values.string("PLUGIN_STORAGE_TYPE", "local").strip() or "local"
    if storage_type in _OTHER_STORAGE_VARIABLES:
        values.fail(
            "PLUGIN_STORAGE_TYPE",
            f"{storage_type!r} is not supported yet by difydaemon (supported: {', '.join(STORAGE_TYPES)})",
        )
        storage_type = "local"
    elif storage_type not in STORAGE_TYPES:
        known = STORAGE_TYPES + tuple(_OTHER_STORAGE_VARIABLES)
        values.fail("PLUGIN_STORAGE_TYPE", f"must be one of {', '.join(known)}; got {storage_type!r}")
        storage_type = "local"
    other = {}
    for names in _OTHER_STORAGE_VARIABLES.values():
        for name in names:
            if name in _OTHER_STORAGE_BOOLEANS:
                if values.raw(name) is not None:
                    other[name] = values.boolean(name, False)
            elif values.raw(name) is not None:
                other[name] = values.raw(name)
    s3 = _s3(values, storage_type == "aws_s3")
    return StorageConfig(
        plugin_storage_type=storage_type,
        plugin_storage_local_root=values.string("PLUGIN_STORAGE_LOCAL_ROOT", "storage"),
        plugin_installed_path=values.string("PLUGIN_INSTALLED_PATH", "plugin"),
        plugin_package_cache_path=values.string("PLUGIN_PACKAGE_CACHE_PATH", "plugin_packages"),
        plugin_media_cache_path=values.string("PLUGIN_MEDIA_CACHE_PATH", "assets"),
        persistence_storage_path=values.string("PERSISTENCE_STORAGE_PATH", "persistence"),
        persistence_storage_max_size=values.integer(
            "PERSISTENCE_STORAGE_MAX_SIZE", 104857600, 1
        ),
        plugin_media_cache_size=values.integer("PLUGIN_MEDIA_CACHE_SIZE", 1024, 1, _UINT16_MAX),
        plugin_asset_cache_size=values.integer("PLUGIN_ASSET_CACHE_SIZE", 256, 1, _UINT16_MAX),
        other_storage_variables=tuple(sorted(other.items())),
        **s3,
    )


def _s3(values: _Values, used: bool) -> dict:
    """
    The S3 fields of the ``storage`` group; what S3 needs is required only
    when ``used`` (``PLUGIN_STORAGE_TYPE=aws_s3``).
    """
    fields = dict(
        plugin_storage_oss_bucket=values.stripped("PLUGIN_STORAGE_OSS_BUCKET") or "",
        s3_use_aws=values.boolean("S3_USE_AWS", True),
        s3_use_aws_managed_iam=values.boolean("S3_USE_AWS_MANAGED_IAM", False),
        s3_endpoint=values.stripped("S3_ENDPOINT") or "",
        s3_use_path_style=values.boolean("S3_USE_PATH_STYLE", True),
        aws_access_key=values.stripped("AWS_ACCESS_KEY") or "",
        aws_secret_key=values.raw("AWS_SECRET_KEY") or "",
        aws_region=values.stripped("AWS_REGION") or "",
    )
    values.url("S3_ENDPOINT", fields["s3_endpoint"])
    if not used:
        return fields
    why = " when PLUGIN_STORAGE_TYPE is aws_s3"
    if not fields["plugin_storage_oss_bucket"]:
        values.fail("PLUGIN_STORAGE_OSS_BUCKET", "is required" + why)
    if fields["s3_use_aws_managed_iam"]:
        # the role's credentials; keys set beside it would be ignored silently
        return fields
    if bool(fields["aws_access_key"]) != bool(fields["aws_secret_key"]):
        missing = "AWS_SECRET_KEY" if fields["aws_access_key"] else "AWS_ACCESS_KEY"
        values.fail(missing, "is required when the other of AWS_ACCESS_KEY and AWS_SECRET_KEY is set")
    elif not fields["s3_use_aws"]:
        why = " when S3_USE_AWS is false"
        if not fields["s3_endpoint"]:
            values.fail("S3_ENDPOINT", "is required" + why)
        if not fields["aws_access_key"]:
            values.fail("AWS_ACCESS_KEY", "is required" + why + " (and S3_USE_AWS_MANAGED_IAM is false)")
    return fields


def _packages(values: _Values) -> PackageConfig:
    """The ``packages`` group."""
    return PackageConfig(
        max_plugin_package_size=values.integer("MAX_PLUGIN_PACKAGE_SIZE", 52428800, 1),
        max_bundle_package_size=values.integer("MAX_BUNDLE_PACKAGE_SIZE", 629145600, 1),
        force_verifying_signature=values.boolean("FORCE_VERIFYING_SIGNATURE", True),
        third_party_signature_verification_enabled=values.boolean(
            "THIRD_PARTY_SIGNATURE_VERIFICATION_ENABLED", False
        ),
        third_party_signature_verification_public_keys=values.listing(
            "THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS"
        ),
        enforce_langgenius_plugin_signatures=values.boolean(
            "ENFORCE_LANGGENIUS_PLUGIN_SIGNATURES", True
        ),
    )


def _database(values: _Values) -> DatabaseConfig:
    """The ``db`` group."""
    db_type = values.string("DB_TYPE", "sqlite").strip() or "sqlite"
    if db_type in _UNSUPPORTED_DB_TYPES:
        values.fail("DB_TYPE", f"{db_type!r} is not supported by difydaemon (use sqlite or postgresql)")
        db_type = "sqlite"
    elif db_type not in DB_TYPES:
        values.fail("DB_TYPE", f"must be one of {', '.join(DB_TYPES)}; got {db_type!r}")
        db_type = "sqlite"
    postgres = db_type != "sqlite"
    why = f" when DB_TYPE is {db_type}"

    if postgres:
        db_host = values.required_string("DB_HOST", why)
        db_port = values.port("DB_PORT")
        if db_port is None and values.raw("DB_PORT") is None:
            values.fail("DB_PORT", "is required" + why)
        db_username = values.required_string("DB_USERNAME", why)
    else:
        db_host = values.optional_string("DB_HOST")
        db_port = values.port("DB_PORT")
        db_username = values.optional_string("DB_USERNAME")

    return DatabaseConfig(
        db_type=db_type,
        db_host=db_host,
        db_port=db_port,
        db_username=db_username,
        db_password=values.string("DB_PASSWORD"),
        db_database=values.string("DB_DATABASE", "dify_plugin" if postgres else "difydaemon.db"),
        db_default_database=values.string("DB_DEFAULT_DATABASE", "postgres" if postgres else ""),
        db_ssl_mode=values.choice("DB_SSL_MODE", "disable", DB_SSL_MODES),
        db_max_idle_conns=values.integer("DB_MAX_IDLE_CONNS", 10, 0),
        db_max_open_conns=values.integer("DB_MAX_OPEN_CONNS", 30, 1),
        db_conn_max_lifetime=values.integer("DB_CONN_MAX_LIFETIME", 3600, 0),
        db_extras=values.string("DB_EXTRAS"),
        db_charset=values.string("DB_CHARSET"),
        db_connect_timeout=values.duration("DB_CONNECT_TIMEOUT", 5.0),
        db_read_timeout=values.duration("DB_READ_TIMEOUT", 30.0),
        db_startup_timeout=values.duration("DB_STARTUP_TIMEOUT", 30.0, allow_zero=True),
    )


def _proxy(values: _Values, name: str) -> str:
    """An upper-case proxy variable, falling back to its lower-case twin."""
    value = values.raw(name)
    if value is None:
        value = values.raw(name.lower())
    return value or ""


def _passthrough(values: _Values) -> tuple[str, ...]:
    """``PLUGIN_ENV_PASSTHROUGH``: exact variable names, none of the daemon's credentials."""
    try:
        names = passthrough_names(values.raw("PLUGIN_ENV_PASSTHROUGH"))
    except ValueError as error:
        values.fail("PLUGIN_ENV_PASSTHROUGH", str(error))
        return ()
    credentials = [name for name in names if name in CREDENTIAL_VARIABLES]
    if credentials:
        values.fail(
            "PLUGIN_ENV_PASSTHROUGH",
            f"{', '.join(credentials)}: the daemon's own credentials are never passed to plugins",
        )
        return ()
    return names


def _run_as_user(values: _Values) -> str:
    """``PLUGIN_RUN_AS_USER``: a user name or a uid (whether it exists is asked at start)."""
    text = values.string("PLUGIN_RUN_AS_USER").strip()
    if text and (text.startswith("-") or any(c.isspace() or c in ":," for c in text)):
        values.fail("PLUGIN_RUN_AS_USER", f"{text!r} is not a user name or uid")
    return text


def _max_instances(values: _Values, instances: int) -> int:
    """``PLUGIN_LOCAL_MAX_INSTANCES``: at least ``PLUGIN_LOCAL_INSTANCES``, which is its default."""
    most = values.integer("PLUGIN_LOCAL_MAX_INSTANCES", instances, 1)
    if most < instances:
        values.fail(
            "PLUGIN_LOCAL_MAX_INSTANCES", f"{most} is below PLUGIN_LOCAL_INSTANCES ({instances})"
        )
        return instances
    return most


def _local_runtime(values: _Values, platform: str | None) -> LocalRuntimeConfig:
    """The ``local_runtime`` group."""
    instances = values.integer("PLUGIN_LOCAL_INSTANCES", 1, 1)
    return LocalRuntimeConfig(
        plugin_working_path=values.string(
            "PLUGIN_WORKING_PATH", "cwd" if platform == "local" else ""
        ),
        python_interpreter_path=values.string("PYTHON_INTERPRETER_PATH", "/usr/bin/python3"),
        uv_path=values.string("UV_PATH"),
        python_env_init_timeout=values.integer("PYTHON_ENV_INIT_TIMEOUT", 120, 1),
        python_compile_all_extra_args=values.string("PYTHON_COMPILE_ALL_EXTRA_ARGS"),
        pip_mirror_url=values.string("PIP_MIRROR_URL"),
        pip_prefer_binary=values.boolean("PIP_PREFER_BINARY", True),
        pip_verbose=values.boolean("PIP_VERBOSE", True),
        pip_extra_args=values.string("PIP_EXTRA_ARGS"),
        pip_wheelhouse_path=values.string("PIP_WHEELHOUSE_PATH"),
        pip_prefer_offline=values.boolean("PIP_PREFER_OFFLINE", True),
        plugin_ignore_uv_lock=values.boolean("PLUGIN_IGNORE_UV_LOCK", False),
        plugin_local_launching_concurrent=values.integer(
            "PLUGIN_LOCAL_LAUNCHING_CONCURRENT", 2, 1
        ),
        plugin_local_instances=instances,
        plugin_local_max_instances=_max_instances(values, instances),
        plugin_local_scale_down_delay=values.integer("PLUGIN_LOCAL_SCALE_DOWN_DELAY", 60, 1),
        plugin_idle_timeout=values.integer("PLUGIN_IDLE_TIMEOUT", 0, 0),
        plugin_heartbeat_timeout=values.integer("PLUGIN_HEARTBEAT_TIMEOUT", 30, 1),
        plugin_env_passthrough=_passthrough(values),
        plugin_run_as_user=_run_as_user(values),
        http_proxy=_proxy(values, "HTTP_PROXY"),
        https_proxy=_proxy(values, "HTTPS_PROXY"),
        no_proxy=_proxy(values, "NO_PROXY"),
    )


def _remote(values: _Values) -> RemoteDebugConfig:
    """The ``remote`` group."""
    enabled = values.boolean("PLUGIN_REMOTE_INSTALLING_ENABLED", True)
    host = values.string("PLUGIN_REMOTE_INSTALLING_HOST")
    port = values.port("PLUGIN_REMOTE_INSTALLING_PORT")
    if enabled:
        why = " when PLUGIN_REMOTE_INSTALLING_ENABLED is true"
        if not host:
            values.fail("PLUGIN_REMOTE_INSTALLING_HOST", "is required" + why)
        if port is None and values.raw("PLUGIN_REMOTE_INSTALLING_PORT") is None:
            values.fail("PLUGIN_REMOTE_INSTALLING_PORT", "is required" + why)
    return RemoteDebugConfig(
        plugin_remote_installing_enabled=enabled,
        plugin_remote_installing_host=host,
        plugin_remote_installing_port=port,
        plugin_remote_installing_max_conn=values.integer(
            "PLUGIN_REMOTE_INSTALLING_MAX_CONN", 256, 1
        ),
        plugin_remote_installing_max_single_tenant_conn=values.integer(
            "PLUGIN_REMOTE_INSTALLING_MAX_SINGLE_TENANT_CONN", 5, 1
        ),
    )


def _invocation(values: _Values) -> InvocationConfig:
    """The ``invocation`` group."""
    return InvocationConfig(
        dify_backwards_invocation_write_timeout=values.integer(
            "DIFY_BACKWARDS_INVOCATION_WRITE_TIMEOUT", 5000, 1
        ),
        dify_backwards_invocation_read_timeout=values.integer(
            "DIFY_BACKWARDS_INVOCATION_READ_TIMEOUT", 240000, 1
        ),
        response_max_buffer_size=values.integer("RESPONSE_MAX_BUFFER_SIZE", 31457280, 1),
        dify_invocation_connection_idle_timeout=values.integer(
            "DIFY_INVOCATION_CONNECTION_IDLE_TIMEOUT", 120, 1
        ),
    )


def _serverless(values: _Values, platform: str | None) -> ServerlessConfig:
    """The ``serverless`` group; the connector is required on serverless."""
    url = values.optional_string("DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL")
    api_key = values.optional_string("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY")
    if api_key is None and platform == "serverless" and values.is_set("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY"):
        # required, but a connector without authentication takes an empty key
        api_key = ""
    if platform == "serverless":
        why = " when PLATFORM is serverless"
        if url is None:
            values.fail("DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL", "is required" + why)
        if api_key is None:
            values.fail("DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY", "is required" + why)
    values.url("DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL", url)
    return ServerlessConfig(
        dify_plugin_serverless_connector_url=url,
        dify_plugin_serverless_connector_api_key=api_key,
        dify_plugin_serverless_connector_launch_timeout=values.integer(
            "DIFY_PLUGIN_SERVERLESS_CONNECTOR_LAUNCH_TIMEOUT", 240, 1
        ),
        max_serverless_retry_times=values.integer("MAX_SERVERLESS_RETRY_TIMES", 3, 0),
        max_serverless_request_bytes=values.integer("MAX_SERVERLESS_REQUEST_BYTES", 5242880, 1),
        max_serverless_transaction_timeout=values.integer(
            "MAX_SERVERLESS_TRANSACTION_TIMEOUT", 300, 1
        ),
    )


def _redis(values: _Values) -> RedisConfig:
    """The ``redis`` group."""
    cert_reqs = values.stripped("REDIS_SSL_CERT_REQS") or ""
    if cert_reqs.upper() not in REDIS_SSL_CERT_REQS:
        values.fail(
            "REDIS_SSL_CERT_REQS",
            f"must be one of CERT_NONE, CERT_OPTIONAL, CERT_REQUIRED; got {cert_reqs!r}",
        )
        cert_reqs = ""
    redis_db = values.integer("REDIS_DB", 0, 0)
    azure_identity = values.boolean("REDIS_USE_AZURE_MANAGED_IDENTITY", False)
    if azure_identity and redis_db != 0:
        values.fail("REDIS_DB", "must be 0 when REDIS_USE_AZURE_MANAGED_IDENTITY is true")
    redis_host = values.optional_string("REDIS_HOST")
    use_sentinel = values.boolean("REDIS_USE_SENTINEL", False)
    sentinels = values.listing("REDIS_SENTINELS")
    service_name = values.string("REDIS_SENTINEL_SERVICE_NAME")
    if use_sentinel:
        why = " when REDIS_USE_SENTINEL is true"
        if not sentinels:
            values.fail("REDIS_SENTINELS", "is required" + why)
        if not service_name:
            values.fail("REDIS_SENTINEL_SERVICE_NAME", "is required" + why)
    for entry in sentinels:
        host, colon, port = entry.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) <= PORT_MAX:
            values.fail("REDIS_SENTINELS", f"each sentinel is host:port; got {entry!r}")
            break
    if azure_identity and (redis_host or use_sentinel):
        values.fail(
            "REDIS_USE_AZURE_MANAGED_IDENTITY",
            "Entra ID authentication is not supported by difydaemon; use REDIS_USERNAME and REDIS_PASSWORD",
        )
    return RedisConfig(
        redis_host=redis_host,
        redis_port=values.port("REDIS_PORT"),
        redis_username=values.string("REDIS_USERNAME"),
        redis_password=values.string("REDIS_PASSWORD"),
        redis_db=redis_db,
        redis_key_prefix=values.string("REDIS_KEY_PREFIX", "plugin_daemon"),
        redis_use_ssl=values.boolean("REDIS_USE_SSL", False),
        redis_ssl_cert_reqs=cert_reqs.upper(),
        redis_ssl_ca_certs=values.string("REDIS_SSL_CA_CERTS"),
        redis_use_azure_managed_identity=azure_identity,
        redis_use_sentinel=use_sentinel,
        redis_sentinels=sentinels,
        redis_sentinel_service_name=service_name,
        redis_sentinel_username=values.string("REDIS_SENTINEL_USERNAME"),
        redis_sentinel_password=values.string("REDIS_SENTINEL_PASSWORD"),
        redis_sentinel_socket_timeout=values.number("REDIS_SENTINEL_SOCKET_TIMEOUT", 0.0),
    )


_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?\Z")


def _cluster(values: _Values) -> ClusterConfig:
    """The ``cluster`` group."""
    host = values.stripped("CLUSTER_ADVERTISE_HOST") or None
    if host is not None and not _HOST.match(host):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            values.fail(
                "CLUSTER_ADVERTISE_HOST",
                f"must be a host name or an IP address, without scheme or port; got {host!r}",
            )
            host = None
    return ClusterConfig(cluster_advertise_host=host)


# ---------------------------------------------------------------------------
# The SRI connector (``twistd dify-sri``)


@frozen
class SRIConfig:
    """
    The configuration of our SRI connector (:mod:`difydaemon.sri`); build it
    with :func:`load_sri_config`.  Durations are float seconds.
    """

    #: ``SRI_HOST``: the connector's HTTP bind address.
    sri_host: str
    #: ``SRI_PORT``: the connector's HTTP port.
    sri_port: int
    #: ``SRI_API_KEY``: the expected ``Authorization`` header, verbatim (the
    #: daemon's ``DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY``).
    sri_api_key: str = field(repr=False)
    #: ``SRI_WORKING_PATH``: where packages are unpacked and venvs built.
    sri_working_path: str
    #: ``SRI_FUNCTION_HOST``: the address functions bind and are announced on.
    sri_function_host: str
    #: ``SRI_DAEMON_URL``: the daemon's base URL, given to functions as
    #: ``DIFY_PLUGIN_DAEMON_URL`` for their backwards invocations.
    sri_daemon_url: str
    #: ``SRI_FUNCTION_START_TIMEOUT``: seconds a started function has to
    #: answer ``GET /health`` before its launch fails.
    sri_function_start_timeout: float
    #: ``SRI_MAX_PACKAGE_SIZE``: bytes of the largest package a launch may
    #: upload (and its uncompressed total); defaults to ``MAX_PLUGIN_PACKAGE_SIZE``.
    sri_max_package_size: int
    #: How venvs are built: ``PYTHON_INTERPRETER_PATH``, ``UV_PATH``,
    #: ``PIP_MIRROR_URL``... exactly as the daemon reads them.
    local_runtime: LocalRuntimeConfig


def load_sri_config(environ: Mapping[str, str], dotenv_text: str | None = None) -> SRIConfig:
    """
    Build the SRI connector's configuration from ``environ`` and an optional
    ``.env`` text, the environment winning; pure, like :func:`load_config`.

    :raises ConfigError: naming the variable (``SRI_API_KEY`` when it is
        unset); :class:`ConfigErrors` when several are bad.
    """
    return _collect(_build_sri, environ, dotenv_text)


def _build_sri(values: _Values) -> SRIConfig:
    """Read the connector's variables, collecting problems in ``values.errors``."""
    api_key = values.required_string("SRI_API_KEY", ": it is the key the daemon sends as DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY")
    daemon_url = values.string("SRI_DAEMON_URL", "http://localhost:5002")
    values.url("SRI_DAEMON_URL", daemon_url)
    function_host = values.stripped("SRI_FUNCTION_HOST") or "127.0.0.1"
    if function_host in ("0.0.0.0", "::"):
        values.fail("SRI_FUNCTION_HOST", "must be an address the daemon can reach: it is announced in function URLs")
    elif not _HOST.match(function_host):
        try:
            ipaddress.IPv6Address(function_host)
        except ValueError:
            values.fail("SRI_FUNCTION_HOST", f"must be a host name or an IP address; got {function_host!r}")
    package_size = values.integer("MAX_PLUGIN_PACKAGE_SIZE", 52428800, 1)
    return SRIConfig(
        sri_host=values.string("SRI_HOST", "0.0.0.0"),
        sri_port=values.integer("SRI_PORT", 5004, 1, PORT_MAX),
        sri_api_key=api_key,
        sri_working_path=values.string("SRI_WORKING_PATH", "sri"),
        sri_function_host=function_host,
        sri_daemon_url=daemon_url.rstrip("/"),
        sri_function_start_timeout=values.duration("SRI_FUNCTION_START_TIMEOUT", 60.0),
        sri_max_package_size=values.integer("SRI_MAX_PACKAGE_SIZE", package_size, 1),
        local_runtime=_local_runtime(values, "local"),
    )
