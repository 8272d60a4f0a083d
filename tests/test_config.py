"""Tests for :mod:`difydaemon.config`."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from difydaemon.config import (
    VARIABLES,
    ConfigErrors,
    load_config,
    parse_dotenv,
    parse_duration,
    read_dotenv,
)
from difydaemon.errors import ConfigError
from difydaemon.testing.cases import SynchronousTestCase

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV_EXAMPLE = os.path.join(_REPOSITORY, ".env.example")
_CONFIGURATION_DOC = os.path.join(_REPOSITORY, "docs", "configuration.md")

_REQUIRED = {
    "SERVER_KEY": "server-key",
    "DIFY_INNER_API_URL": "http://api:5001",
    "DIFY_INNER_API_KEY": "inner-key",
    "PLATFORM": "local",
    "PLUGIN_REMOTE_INSTALLING_HOST": "127.0.0.1",
    "PLUGIN_REMOTE_INSTALLING_PORT": "5003",
}

_POSTGRES = {
    "DB_TYPE": "postgresql",
    "DB_HOST": "127.0.0.1",
    "DB_PORT": "5432",
    "DB_USERNAME": "postgres",
}

_SERVERLESS = {
    "PLATFORM": "serverless",
    "DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL": "http://connector:5004",
    "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY": "connector-key",
}


def _environ(**overrides: str) -> dict[str, str]:
    """The smallest valid environment, with ``overrides`` applied."""
    environ = dict(_REQUIRED)
    environ.update(overrides)
    return environ


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as source:
        return source.read()


class RecordingEnvironment(Mapping):
    """An environment that remembers which names were looked up."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.looked_up: set[str] = set()

    def __contains__(self, name: object) -> bool:
        self.looked_up.add(name)
        return name in self._values

    def __getitem__(self, name: str) -> str:
        self.looked_up.add(name)
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


class DefaultTests(SynchronousTestCase):
    """With only the required variables, every other value is the default."""

    def setUp(self):
        super().setUp()
        self.config = load_config(_environ())

    def test_server(self):
        """The HTTP server, auth and platform values come through or default."""
        config = self.config
        self.assertEqual(
            (
                config.server_host,
                config.server_port,
                config.server_key,
                config.server_tz,
                config.admin_api_enabled,
                config.admin_api_key,
                config.dify_inner_api_url,
                config.dify_inner_api_key,
                config.platform,
                config.health_api_log_enabled,
                config.plugin_endpoint_enabled,
            ),
            (
                "0.0.0.0",
                5002,
                "server-key",
                "UTC",
                False,
                "",
                "http://api:5001",
                "inner-key",
                "local",
                True,
                True,
            ),
        )

    def test_timeouts(self):
        """Execution and install timeouts keep their units and convert to seconds."""
        config = self.config
        self.assertEqual(config.plugin_max_execution_timeout, 600)
        self.assertEqual(config.max_execution_timeout_seconds, 600.0)
        self.assertEqual(config.plugin_install_timeout, 15)
        self.assertEqual(config.install_timeout_seconds, 900.0)

    def test_supervision(self):
        """A plugin is hung after 30 s of silence; a daemon stop drains for 6 s (plus 2 s TERM->KILL: under docker's 10)."""
        self.assertEqual(self.config.local_runtime.plugin_heartbeat_timeout, 30)
        self.assertEqual(self.config.local_runtime.plugin_heartbeat_timeout_seconds, 30.0)
        self.assertEqual(self.config.shutdown_grace_period, 6)
        self.assertEqual(self.config.shutdown_grace_period_seconds, 6.0)

    def test_front_door(self):
        """At most 4096 HTTP connections; /e/ bodies read up to 16 MiB."""
        self.assertEqual(self.config.server_max_connections, 4096)
        self.assertEqual(self.config.endpoint_read_limit, 16 * 1024 * 1024)

    def test_buffers(self):
        """The plugin output buffers default to 1024 and 5242880 bytes."""
        self.assertEqual(
            (self.config.plugin_runtime_buffer_size, self.config.plugin_runtime_max_buffer_size),
            (1024, 5242880),
        )

    def test_storage(self):
        """The local store and its prefixes take the Go defaults."""
        storage = self.config.storage
        self.assertEqual(storage.plugin_storage_type, "local")
        self.assertEqual(storage.plugin_storage_local_root, "storage")
        self.assertEqual(storage.plugin_installed_path, "plugin")
        self.assertEqual(storage.plugin_package_cache_path, "plugin_packages")
        self.assertEqual(storage.plugin_media_cache_path, "assets")
        self.assertEqual(storage.persistence_storage_path, "persistence")
        self.assertEqual(storage.persistence_storage_max_size, 104857600)
        self.assertEqual(storage.plugin_media_cache_size, 1024)
        self.assertEqual(storage.plugin_asset_cache_size, 256)

    def test_packages(self):
        """Package limits and signature policy take the Go defaults."""
        packages = self.config.packages
        self.assertEqual(packages.max_plugin_package_size, 52428800)
        self.assertEqual(packages.max_bundle_package_size, 629145600)
        self.assertTrue(packages.force_verifying_signature)
        self.assertFalse(packages.third_party_signature_verification_enabled)
        self.assertEqual(packages.third_party_signature_verification_public_keys, ())
        self.assertTrue(packages.enforce_langgenius_plugin_signatures)

    def test_database(self):
        """The default database is an embedded SQLite file."""
        db = self.config.db
        self.assertEqual((db.db_type, db.engine, db.db_database), ("sqlite", "sqlite", "difydaemon.db"))
        self.assertEqual((db.db_host, db.db_port, db.db_username, db.db_password), (None, None, None, ""))
        self.assertEqual(db.db_ssl_mode, "disable")
        self.assertEqual((db.db_max_idle_conns, db.db_max_open_conns, db.db_conn_max_lifetime), (10, 30, 3600))

    def test_local_runtime(self):
        """The local runtime takes the Go defaults, with working path cwd."""
        local = self.config.local_runtime
        self.assertEqual(local.plugin_working_path, "cwd")
        self.assertEqual(local.python_interpreter_path, "/usr/bin/python3")
        self.assertEqual(local.uv_path, "")
        self.assertEqual(local.python_env_init_timeout, 120)
        self.assertEqual(local.python_env_init_timeout_seconds, 120.0)
        self.assertEqual(local.python_compile_all_extra_args, "")
        self.assertEqual(local.pip_mirror_url, "")
        self.assertTrue(local.pip_prefer_binary)
        self.assertTrue(local.pip_verbose)
        self.assertEqual(local.pip_extra_args, "")
        self.assertTrue(local.pip_prefer_offline)
        self.assertFalse(local.plugin_ignore_uv_lock)
        self.assertEqual(local.plugin_local_launching_concurrent, 2)
        self.assertEqual(local.plugin_local_instances, 1)

    def test_remote(self):
        """Remote debugging is on, with the Go connection caps."""
        remote = self.config.remote
        self.assertTrue(remote.plugin_remote_installing_enabled)
        self.assertEqual(remote.plugin_remote_installing_host, "127.0.0.1")
        self.assertEqual(remote.plugin_remote_installing_port, 5003)
        self.assertEqual(remote.plugin_remote_installing_max_conn, 256)
        self.assertEqual(remote.plugin_remote_installing_max_single_tenant_conn, 5)

    def test_invocation(self):
        """Backwards-invocation limits keep milliseconds and convert to seconds."""
        invocation = self.config.invocation
        self.assertEqual(invocation.dify_backwards_invocation_write_timeout, 5000)
        self.assertEqual(invocation.write_timeout_seconds, 5.0)
        self.assertEqual(invocation.dify_backwards_invocation_read_timeout, 240000)
        self.assertEqual(invocation.read_timeout_seconds, 240.0)
        self.assertEqual(invocation.response_max_buffer_size, 31457280)
        self.assertEqual(invocation.dify_invocation_connection_idle_timeout, 120)
        self.assertEqual(invocation.connection_idle_timeout_seconds, 120.0)

    def test_serverless(self):
        """On the local platform the connector is unset and limits default."""
        serverless = self.config.serverless
        self.assertIsNone(serverless.dify_plugin_serverless_connector_url)
        self.assertIsNone(serverless.dify_plugin_serverless_connector_api_key)
        self.assertEqual(serverless.dify_plugin_serverless_connector_launch_timeout, 240)
        self.assertEqual(serverless.launch_timeout_seconds, 240.0)
        self.assertEqual(serverless.max_serverless_retry_times, 3)
        self.assertEqual(serverless.max_serverless_request_bytes, 5242880)
        self.assertEqual(serverless.max_serverless_transaction_timeout, 300)
        self.assertEqual(serverless.transaction_timeout_seconds, 300.0)

    def test_redis(self):
        """Redis is unconfigured by default, with the Go key prefix."""
        redis = self.config.redis
        self.assertFalse(redis.configured)
        self.assertEqual((redis.redis_db, redis.redis_key_prefix), (0, "plugin_daemon"))

    def test_secrets_not_in_repr(self):
        """The repr of a config shows no key or password."""
        config = load_config(
            _environ(
                SERVER_KEY="secret-server",
                DIFY_INNER_API_KEY="secret-inner",
                ADMIN_API_ENABLED="true",
                ADMIN_API_KEY="secret-admin",
                DB_PASSWORD="secret-db",
                REDIS_PASSWORD="secret-redis",
            )
        )
        self.assertNotIn("secret", repr(config))


class SourceTests(SynchronousTestCase):
    """Values come from the environment first, then from the .env text."""

    def test_environment_beats_dotenv(self):
        """A variable set in both places takes the environment's value."""
        config = load_config(_environ(SERVER_PORT="6000"), "SERVER_PORT=7000\nSERVER_HOST=127.0.0.1\n")
        self.assertEqual((config.server_port, config.server_host), (6000, "127.0.0.1"))

    def test_dotenv_alone(self):
        """Required variables may come from the .env text only."""
        text = "".join(f"{name}={value}\n" for name, value in _REQUIRED.items())
        self.assertEqual(load_config({}, text).server_key, "server-key")

    def test_empty_environment_value_hides_dotenv(self):
        """An empty variable in the environment hides .env and means the default."""
        config = load_config(_environ(SERVER_PORT=""), "SERVER_PORT=7000\n")
        self.assertEqual(config.server_port, 5002)

    def test_every_variable_read(self):
        """Across local, serverless and PostgreSQL setups every listed variable is looked up."""
        looked_up: set[str] = set()
        for overrides in ({}, _SERVERLESS, _POSTGRES):
            environ = RecordingEnvironment(_environ(**overrides))
            load_config(environ)
            looked_up |= environ.looked_up
        self.assertEqual(set(VARIABLES) - looked_up, set())

    def test_nothing_else_read(self):
        """No variable outside VARIABLES is looked up."""
        environ = RecordingEnvironment(_environ(**_POSTGRES))
        load_config(environ)
        self.assertEqual(environ.looked_up - set(VARIABLES), set())


class DotenvTests(SynchronousTestCase):
    """parse_dotenv understands the usual .env dialect."""

    def test_plain(self):
        """KEY=VALUE lines, blank lines and comment lines."""
        text = "# a comment\n\nA=1\n  B = two words  \n"
        self.assertEqual(parse_dotenv(text), {"A": "1", "B": "two words"})

    def test_export(self):
        """An export prefix is dropped."""
        self.assertEqual(parse_dotenv("export A=1\n"), {"A": "1"})

    def test_quotes(self):
        """Single quotes are literal, double quotes know backslash escapes."""
        text = "A='x # y \\n'\nB=\"a\\\"b\\nc\"\nC=\"\"\n"
        self.assertEqual(parse_dotenv(text), {"A": "x # y \\n", "B": 'a"b\nc', "C": ""})

    def test_inline_comment(self):
        """A # after a blank starts a comment; a # inside a value does not."""
        text = "A=1 # one\nB=x#y\nC= # nothing\nD='q' # quoted\n"
        self.assertEqual(parse_dotenv(text), {"A": "1", "B": "x#y", "C": "", "D": "q"})

    def test_later_line_wins(self):
        """A repeated key takes its last value."""
        self.assertEqual(parse_dotenv("A=1\nA=2\n"), {"A": "2"})

    def test_crlf(self):
        """Windows line ends are accepted."""
        self.assertEqual(parse_dotenv("A=1\r\nB=2\r\n"), {"A": "1", "B": "2"})

    def test_not_an_assignment(self):
        """A line without = is refused, naming the line."""
        error = self.assertRaises(ConfigError, parse_dotenv, "A=1\nnonsense\n")
        self.assertEqual(error.variable, ".env")
        self.assertIn("line 2", error.problem)

    def test_bad_key(self):
        """A key that is not an identifier is refused."""
        error = self.assertRaises(ConfigError, parse_dotenv, "1A=1\n")
        self.assertIn("line 1", error.problem)

    def test_unclosed_quote(self):
        """A quote without its closing twin is refused."""
        for text in ("A='x\n", 'A="x\n'):
            error = self.assertRaises(ConfigError, parse_dotenv, text)
            self.assertIn("closing quote", error.problem)

    def test_text_after_quote(self):
        """Text after a closing quote, other than a comment, is refused."""
        error = self.assertRaises(ConfigError, parse_dotenv, "A='x'y\n")
        self.assertIn("after the closing quote", error.problem)

    def test_read_missing(self):
        """read_dotenv of a missing file is None."""
        self.assertIsNone(read_dotenv(self.mktemp()))

    def test_read_existing(self):
        """read_dotenv returns the file's text."""
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as dotenv:
            dotenv.write("A=\u00e9\n")
        self.assertEqual(read_dotenv(path), "A=\u00e9\n")


class BadValueTests(SynchronousTestCase):
    """Each bad value raises a ConfigError naming its variable."""

    def assert_refused(self, variable: str, *fragments: str, **overrides: str) -> ConfigError:
        """Loading with ``overrides`` fails because of ``variable`` alone."""
        error = self.assertRaises(ConfigError, load_config, _environ(**overrides))
        self.assertNotIsInstance(error, ConfigErrors)
        self.assertEqual(error.variable, variable)
        for fragment in fragments:
            self.assertIn(fragment, error.problem)
        self.assertIn(variable, str(error))
        return error

    def test_bad_integer(self):
        """A non-numeric integer names its variable."""
        self.assert_refused("SERVER_PORT", "not an integer", SERVER_PORT="http")

    def test_float_for_integer(self):
        """A decimal fraction is not an integer."""
        self.assert_refused("PLUGIN_MAX_EXECUTION_TIMEOUT", "not an integer", PLUGIN_MAX_EXECUTION_TIMEOUT="1.5")

    def test_port_zero(self):
        """Port 0 is out of range."""
        self.assert_refused("SERVER_PORT", "between 1 and 65535", SERVER_PORT="0")

    def test_port_too_large(self):
        """Port 70000 is out of range."""
        self.assert_refused("PLUGIN_REMOTE_INSTALLING_PORT", "70000", PLUGIN_REMOTE_INSTALLING_PORT="70000")

    def test_size_zero(self):
        """A size of 0 is refused."""
        self.assert_refused("MAX_PLUGIN_PACKAGE_SIZE", "at least 1", MAX_PLUGIN_PACKAGE_SIZE="0")

    def test_negative(self):
        """A negative count is refused."""
        self.assert_refused("MAX_SERVERLESS_RETRY_TIMES", "at least 0", MAX_SERVERLESS_RETRY_TIMES="-1")

    def test_cache_size_over_uint16(self):
        """Cache sizes are 16-bit, as in Go."""
        self.assert_refused("PLUGIN_MEDIA_CACHE_SIZE", "65535", PLUGIN_MEDIA_CACHE_SIZE="65536")

    def test_bad_boolean(self):
        """A boolean outside Go's ParseBool set names its variable."""
        for text in ("yes", "on", "tRue", "2"):
            self.assert_refused("FORCE_VERIFYING_SIGNATURE", "not a boolean", FORCE_VERIFYING_SIGNATURE=text)

    def test_go_booleans(self):
        """Every spelling of Go's ParseBool is understood."""
        for text in ("1", "t", "T", "TRUE", "true", "True"):
            self.assertTrue(load_config(_environ(PLUGIN_IGNORE_UV_LOCK=text)).local_runtime.plugin_ignore_uv_lock)
        for text in ("0", "f", "F", "FALSE", "false", "False"):
            self.assertFalse(load_config(_environ(PIP_VERBOSE=text)).local_runtime.pip_verbose)
            self.assertFalse(load_config(_environ(PIP_PREFER_OFFLINE=text)).local_runtime.pip_prefer_offline)

    def test_bad_float(self):
        """A non-numeric or infinite float names its variable."""
        for text in ("soon", "inf", "nan"):
            self.assert_refused("REDIS_SENTINEL_SOCKET_TIMEOUT", REDIS_SENTINEL_SOCKET_TIMEOUT=text)

    def test_float(self):
        """A float value is parsed."""
        config = load_config(_environ(REDIS_SENTINEL_SOCKET_TIMEOUT="0.1"))
        self.assertEqual(config.redis.redis_sentinel_socket_timeout, 0.1)

    def test_unknown_platform(self):
        """PLATFORM is local or serverless."""
        self.assert_refused("PLATFORM", "local, serverless", PLATFORM="kubernetes")

    def test_unknown_ssl_mode(self):
        """DB_SSL_MODE is disable or require."""
        self.assert_refused("DB_SSL_MODE", "disable, require", DB_SSL_MODE="verify-full")

    def test_unknown_db_type(self):
        """An unknown DB_TYPE is refused."""
        self.assert_refused("DB_TYPE", "sqlite, postgresql, pgbouncer", DB_TYPE="oracle")

    def test_mysql_family(self):
        """MySQL, OceanBase and seekdb are not supported by difydaemon."""
        for db_type in ("mysql", "oceanbase", "seekdb"):
            self.assert_refused("DB_TYPE", "not supported by difydaemon", DB_TYPE=db_type)

    def test_other_cloud_storage(self):
        """The Go daemon's other stores are refused as not supported yet, naming PLUGIN_STORAGE_TYPE."""
        for storage_type in (
            "tencent_cos", "azure_blob", "gcs", "aliyun_oss", "huawei_obs", "volcengine_tos", "baidu_bos",
        ):
            self.assert_refused(
                "PLUGIN_STORAGE_TYPE", f"{storage_type!r} is not supported yet", "local, aws_s3",
                PLUGIN_STORAGE_TYPE=storage_type,
            )

    def test_unknown_storage(self):
        """A store nobody knows is refused with the list of the known ones."""
        self.assert_refused("PLUGIN_STORAGE_TYPE", "must be one of local, aws_s3, tencent_cos", PLUGIN_STORAGE_TYPE="s3")

    def test_bad_time_zone(self):
        """SERVER_TZ must name a known zone."""
        self.assert_refused("SERVER_TZ", "time zone", SERVER_TZ="Mars/Olympus")

    def test_inner_api_url_scheme(self):
        """DIFY_INNER_API_URL must be an http(s) URL."""
        self.assert_refused("DIFY_INNER_API_URL", "http://", DIFY_INNER_API_URL="api:5001")

    def test_local_instances(self):
        """PLUGIN_LOCAL_INSTANCES is at least 1."""
        self.assert_refused("PLUGIN_LOCAL_INSTANCES", "at least 1", PLUGIN_LOCAL_INSTANCES="0")
        config = load_config(_environ(PLUGIN_LOCAL_INSTANCES="3"))
        self.assertEqual(config.local_runtime.plugin_local_instances, 3)

    def test_instance_scaling(self):
        """PLUGIN_LOCAL_MAX_INSTANCES defaults to PLUGIN_LOCAL_INSTANCES and may not be below it."""
        config = load_config(_environ(PLUGIN_LOCAL_INSTANCES="2"))
        self.assertEqual(config.local_runtime.plugin_local_max_instances, 2)
        self.assertEqual(config.local_runtime.plugin_local_scale_down_delay, 60)
        self.assert_refused(
            "PLUGIN_LOCAL_MAX_INSTANCES", "below PLUGIN_LOCAL_INSTANCES",
            PLUGIN_LOCAL_INSTANCES="3", PLUGIN_LOCAL_MAX_INSTANCES="2",
        )
        self.assert_refused("PLUGIN_LOCAL_SCALE_DOWN_DELAY", "at least 1", PLUGIN_LOCAL_SCALE_DOWN_DELAY="0")
        config = load_config(_environ(PLUGIN_LOCAL_MAX_INSTANCES="4", PLUGIN_LOCAL_SCALE_DOWN_DELAY="30"))
        self.assertEqual(
            (config.local_runtime.plugin_local_max_instances, config.local_runtime.plugin_local_scale_down_delay),
            (4, 30),
        )

    def test_idle_timeout(self):
        """PLUGIN_IDLE_TIMEOUT defaults to 0, never stopping; a positive value is seconds."""
        self.assertIsNone(load_config(_environ()).local_runtime.plugin_idle_timeout_seconds)
        self.assertEqual(load_config(_environ(PLUGIN_IDLE_TIMEOUT="90")).local_runtime.plugin_idle_timeout_seconds, 90.0)
        self.assert_refused("PLUGIN_IDLE_TIMEOUT", "at least 0", PLUGIN_IDLE_TIMEOUT="-1")

    def test_heartbeat_timeout(self):
        """PLUGIN_HEARTBEAT_TIMEOUT is a whole number of seconds, at least 1."""
        self.assert_refused("PLUGIN_HEARTBEAT_TIMEOUT", "at least 1", PLUGIN_HEARTBEAT_TIMEOUT="0")
        self.assert_refused("PLUGIN_HEARTBEAT_TIMEOUT", "not an integer", PLUGIN_HEARTBEAT_TIMEOUT="soon")
        config = load_config(_environ(PLUGIN_HEARTBEAT_TIMEOUT="5"))
        self.assertEqual(config.local_runtime.plugin_heartbeat_timeout_seconds, 5.0)

    def test_front_door_bounds(self):
        """SERVER_MAX_CONNECTIONS and ENDPOINT_READ_LIMIT are whole numbers, at least 1."""
        for name in ("SERVER_MAX_CONNECTIONS", "ENDPOINT_READ_LIMIT"):
            self.assert_refused(name, "at least 1", **{name: "0"})
            self.assert_refused(name, "not an integer", **{name: "many"})
        config = load_config(_environ(SERVER_MAX_CONNECTIONS="3", ENDPOINT_READ_LIMIT="1024"))
        self.assertEqual((config.server_max_connections, config.endpoint_read_limit), (3, 1024))

    def test_shutdown_grace_period(self):
        """SHUTDOWN_GRACE_PERIOD is a whole number of seconds; 0 ends open calls at once, negatives are refused."""
        self.assert_refused("SHUTDOWN_GRACE_PERIOD", "at least 0", SHUTDOWN_GRACE_PERIOD="-1")
        self.assert_refused("SHUTDOWN_GRACE_PERIOD", "not an integer", SHUTDOWN_GRACE_PERIOD="8s")
        self.assertEqual(load_config(_environ(SHUTDOWN_GRACE_PERIOD="0")).shutdown_grace_period_seconds, 0.0)
    def test_env_passthrough(self):
        """PLUGIN_ENV_PASSTHROUGH is a list of exact names, empty by default; a pattern is refused, named."""
        self.assertEqual(load_config(_environ()).local_runtime.plugin_env_passthrough, ())
        config = load_config(_environ(PLUGIN_ENV_PASSTHROUGH=" OPENAI_BASE_URL, HF_HOME ,"))
        self.assertEqual(config.local_runtime.plugin_env_passthrough, ("OPENAI_BASE_URL", "HF_HOME"))
        self.assert_refused("PLUGIN_ENV_PASSTHROUGH", "'AWS_*' is not a variable name", PLUGIN_ENV_PASSTHROUGH="A,AWS_*")

    def test_run_as_user(self):
        """PLUGIN_RUN_AS_USER is a user name or uid, empty by default; what cannot name a user is refused."""
        self.assertEqual(load_config(_environ()).local_runtime.plugin_run_as_user, "")
        self.assertEqual(load_config(_environ(PLUGIN_RUN_AS_USER="difyplugins")).local_runtime.plugin_run_as_user, "difyplugins")
        self.assertEqual(load_config(_environ(PLUGIN_RUN_AS_USER=" 1500 ")).local_runtime.plugin_run_as_user, "1500")
        for bad in ("-1", "a b", "1000:1000", "x,y"):
            self.assert_refused("PLUGIN_RUN_AS_USER", "is not a user name or uid", PLUGIN_RUN_AS_USER=bad)

    def test_env_passthrough_refuses_daemon_credentials(self):
        """PLUGIN_ENV_PASSTHROUGH naming the daemon's own credentials is refused, naming them."""
        self.assert_refused(
            "PLUGIN_ENV_PASSTHROUGH",
            "SERVER_KEY, DB_PASSWORD: the daemon's own credentials are never passed to plugins",
            PLUGIN_ENV_PASSTHROUGH="HF_HOME,SERVER_KEY,DB_PASSWORD",
        )

    def test_blanks_around_numbers(self):
        """Blanks around a typed value are ignored."""
        self.assertEqual(load_config(_environ(SERVER_PORT=" 6000 ")).server_port, 6000)

    def test_several_problems(self):
        """All problems are reported at once, in documentation order."""
        error = self.assertRaises(
            ConfigError,
            load_config,
            _environ(DB_TYPE="mysql", SERVER_PORT="x", PIP_VERBOSE="maybe"),
        )
        self.assertIsInstance(error, ConfigErrors)
        self.assertEqual(
            [each.variable for each in error.errors],
            ["SERVER_PORT", "DB_TYPE", "PIP_VERBOSE"],
        )
        self.assertEqual(error.variable, "SERVER_PORT")
        for variable in ("SERVER_PORT", "DB_TYPE", "PIP_VERBOSE"):
            self.assertIn(variable, str(error))


class RequiredTests(SynchronousTestCase):
    """Missing required variables are named."""

    def test_each_required(self):
        """Without one of the four always-required variables loading fails naming it."""
        for variable in ("SERVER_KEY", "DIFY_INNER_API_URL", "DIFY_INNER_API_KEY", "PLATFORM"):
            environ = _environ()
            del environ[variable]
            error = self.assertRaises(ConfigError, load_config, environ)
            self.assertEqual((error.variable, error.problem[:11]), (variable, "is required"))

    def test_empty_is_missing(self):
        """A required variable set to the empty string is missing."""
        error = self.assertRaises(ConfigError, load_config, _environ(SERVER_KEY=""))
        self.assertEqual(error.variable, "SERVER_KEY")

    def test_nothing_set(self):
        """An empty environment names every required variable."""
        error = self.assertRaises(ConfigErrors, load_config, {})
        self.assertEqual(
            [each.variable for each in error.errors],
            [
                "SERVER_KEY",
                "DIFY_INNER_API_URL",
                "DIFY_INNER_API_KEY",
                "PLATFORM",
                "PLUGIN_REMOTE_INSTALLING_HOST",
                "PLUGIN_REMOTE_INSTALLING_PORT",
            ],
        )

    def test_remote_disabled(self):
        """With remote debugging off, its host and port are not required."""
        environ = _environ(PLUGIN_REMOTE_INSTALLING_ENABLED="false")
        del environ["PLUGIN_REMOTE_INSTALLING_HOST"]
        del environ["PLUGIN_REMOTE_INSTALLING_PORT"]
        remote = load_config(environ).remote
        self.assertEqual(
            (remote.plugin_remote_installing_enabled, remote.plugin_remote_installing_host, remote.plugin_remote_installing_port),
            (False, "", None),
        )

    def test_remote_enabled(self):
        """With remote debugging on, a missing host is named."""
        environ = _environ()
        del environ["PLUGIN_REMOTE_INSTALLING_HOST"]
        error = self.assertRaises(ConfigError, load_config, environ)
        self.assertEqual(error.variable, "PLUGIN_REMOTE_INSTALLING_HOST")


class DatabaseTests(SynchronousTestCase):
    """DB_TYPE chooses SQLite or PostgreSQL and their defaults."""

    def test_postgresql_defaults(self):
        """PostgreSQL defaults to database dify_plugin, created through postgres."""
        db = load_config(_environ(**_POSTGRES)).db
        self.assertEqual(
            (db.db_type, db.engine, db.db_host, db.db_port, db.db_username, db.db_password),
            ("postgresql", "postgresql", "127.0.0.1", 5432, "postgres", ""),
        )
        self.assertEqual((db.db_database, db.db_default_database), ("dify_plugin", "postgres"))

    def test_pgbouncer(self):
        """pgbouncer is PostgreSQL."""
        db = load_config(_environ(**dict(_POSTGRES, DB_TYPE="pgbouncer"))).db
        self.assertEqual((db.db_type, db.engine), ("pgbouncer", "postgresql"))

    def test_postgresql_requires_server(self):
        """PostgreSQL needs DB_HOST, DB_PORT and DB_USERNAME."""
        error = self.assertRaises(ConfigErrors, load_config, _environ(DB_TYPE="postgresql"))
        self.assertEqual([each.variable for each in error.errors], ["DB_HOST", "DB_PORT", "DB_USERNAME"])
        self.assertIn("when DB_TYPE is postgresql", error.errors[0].problem)

    def test_sqlite_path(self):
        """For sqlite, DB_DATABASE is the file path."""
        db = load_config(_environ(DB_TYPE="sqlite", DB_DATABASE="/var/lib/difydaemon/state.db")).db
        self.assertEqual(db.db_database, "/var/lib/difydaemon/state.db")

    def test_pool(self):
        """DB_MAX_OPEN_CONNS sizes the pool and must be at least 1."""
        db = load_config(_environ(**dict(_POSTGRES, DB_MAX_OPEN_CONNS="5"))).db
        self.assertEqual(db.db_max_open_conns, 5)
        error = self.assertRaises(ConfigError, load_config, _environ(DB_MAX_OPEN_CONNS="0"))
        self.assertEqual(error.variable, "DB_MAX_OPEN_CONNS")


class DatabaseTimeoutTests(SynchronousTestCase):
    """DB_CONNECT_TIMEOUT, DB_READ_TIMEOUT and DB_STARTUP_TIMEOUT: Go durations in seconds."""

    def test_defaults(self):
        """Connect 5 s, read 30 s, start-up wait 30 s."""
        db = load_config(_environ(**_POSTGRES)).db
        self.assertEqual((db.db_connect_timeout, db.db_read_timeout, db.db_startup_timeout), (5.0, 30.0, 30.0))

    def test_go_durations_and_seconds(self):
        """Go's duration syntax and bare seconds both give seconds."""
        db = load_config(
            _environ(**dict(_POSTGRES, DB_CONNECT_TIMEOUT="1m30s", DB_READ_TIMEOUT="250ms", DB_STARTUP_TIMEOUT="7"))
        ).db
        self.assertEqual((db.db_connect_timeout, db.db_read_timeout, db.db_startup_timeout), (90.0, 0.25, 7.0))

    def test_startup_zero(self):
        """DB_STARTUP_TIMEOUT may be 0: one try."""
        self.assertEqual(load_config(_environ(DB_STARTUP_TIMEOUT="0s")).db.db_startup_timeout, 0.0)

    def test_refused(self):
        """A non-duration, a negative one, or a zero connect/read timeout is refused by name."""
        for name, value in (
            ("DB_CONNECT_TIMEOUT", "five"),
            ("DB_READ_TIMEOUT", "-1s"),
            ("DB_READ_TIMEOUT", "0"),
            ("DB_CONNECT_TIMEOUT", "5 s"),
            ("DB_STARTUP_TIMEOUT", "1x"),
        ):
            error = self.assertRaises(ConfigError, load_config, _environ(**{name: value}))
            self.assertEqual(error.variable, name, value)

    def test_parse_duration(self):
        """parse_duration reads what Go's time.ParseDuration reads, and nothing else."""
        self.assertEqual(
            [parse_duration(text) for text in ("1h2m3.5s", "1.5us", "+2s", ".5s", "0", "30")],
            [3723.5, 1.5e-06, 2.0, 0.5, 0.0, 30.0],
        )
        self.assertEqual([parse_duration(text) for text in ("", "s", "5s5", "1d", "-5s")], [None] * 5)


class BufferTests(SynchronousTestCase):
    """The legacy PLUGIN_STDIO_* names win only when customised."""

    def test_runtime_names(self):
        """The new names set the buffers."""
        config = load_config(_environ(PLUGIN_RUNTIME_BUFFER_SIZE="2048", PLUGIN_RUNTIME_MAX_BUFFER_SIZE="65536"))
        self.assertEqual((config.plugin_runtime_buffer_size, config.plugin_runtime_max_buffer_size), (2048, 65536))

    def test_legacy_customised(self):
        """Customised legacy names win over the new ones."""
        config = load_config(
            _environ(
                PLUGIN_RUNTIME_BUFFER_SIZE="2048",
                PLUGIN_RUNTIME_MAX_BUFFER_SIZE="65536",
                PLUGIN_STDIO_BUFFER_SIZE="4096",
                PLUGIN_STDIO_MAX_BUFFER_SIZE="131072",
            )
        )
        self.assertEqual((config.plugin_runtime_buffer_size, config.plugin_runtime_max_buffer_size), (4096, 131072))

    def test_legacy_at_default(self):
        """Legacy names left at their defaults (or 0) do not override the new ones."""
        for initial, maximum in (("1024", "5242880"), ("0", "0")):
            config = load_config(
                _environ(
                    PLUGIN_RUNTIME_BUFFER_SIZE="2048",
                    PLUGIN_RUNTIME_MAX_BUFFER_SIZE="65536",
                    PLUGIN_STDIO_BUFFER_SIZE=initial,
                    PLUGIN_STDIO_MAX_BUFFER_SIZE=maximum,
                )
            )
            self.assertEqual((config.plugin_runtime_buffer_size, config.plugin_runtime_max_buffer_size), (2048, 65536))

    def test_maximum_below_initial(self):
        """A maximum smaller than the initial buffer is refused."""
        error = self.assertRaises(
            ConfigError,
            load_config,
            _environ(PLUGIN_RUNTIME_BUFFER_SIZE="4096", PLUGIN_RUNTIME_MAX_BUFFER_SIZE="1024"),
        )
        self.assertEqual(error.variable, "PLUGIN_RUNTIME_MAX_BUFFER_SIZE")


class ProxyTests(SynchronousTestCase):
    """Proxies fall back to the lower-case variables."""

    def test_lowercase_fallback(self):
        """Unset upper-case proxies take the lower-case values."""
        local = load_config(
            _environ(http_proxy="http://p:1", https_proxy="http://p:2", no_proxy="localhost")
        ).local_runtime
        self.assertEqual((local.http_proxy, local.https_proxy, local.no_proxy), ("http://p:1", "http://p:2", "localhost"))

    def test_uppercase_wins(self):
        """Upper-case proxies win over lower-case ones."""
        local = load_config(_environ(HTTP_PROXY="http://upper", http_proxy="http://lower")).local_runtime
        self.assertEqual(local.http_proxy, "http://upper")

    def test_empty_uppercase_falls_back(self):
        """An empty upper-case proxy falls back too."""
        local = load_config(_environ(HTTPS_PROXY="", https_proxy="http://lower")).local_runtime
        self.assertEqual(local.https_proxy, "http://lower")

    def test_none(self):
        """Without proxies the values are empty and no environment is added."""
        local = load_config(_environ()).local_runtime
        self.assertEqual((local.http_proxy, local.proxy_environment()), ("", {}))

    def test_proxy_environment(self):
        """Configured proxies are passed on under both spellings."""
        local = load_config(_environ(HTTP_PROXY="http://p:1", no_proxy="localhost")).local_runtime
        self.assertEqual(
            local.proxy_environment(),
            {"HTTP_PROXY": "http://p:1", "http_proxy": "http://p:1", "NO_PROXY": "localhost", "no_proxy": "localhost"},
        )


class ListTests(SynchronousTestCase):
    """Comma-separated lists and whitespace-split arguments."""

    def test_public_keys(self):
        """Third-party key paths are split on commas, blanks and empty items dropped."""
        packages = load_config(
            _environ(
                THIRD_PARTY_SIGNATURE_VERIFICATION_ENABLED="true",
                THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS=" /keys/a.pem, /keys/b.pem,,",
            )
        ).packages
        self.assertTrue(packages.third_party_signature_verification_enabled)
        self.assertEqual(packages.third_party_signature_verification_public_keys, ("/keys/a.pem", "/keys/b.pem"))

    def test_single_public_key(self):
        """One path without commas is a list of one."""
        packages = load_config(_environ(THIRD_PARTY_SIGNATURE_VERIFICATION_PUBLIC_KEYS="/k.pem")).packages
        self.assertEqual(packages.third_party_signature_verification_public_keys, ("/k.pem",))

    def test_extra_args(self):
        """Extra installer and compileall arguments split on whitespace."""
        local = load_config(
            _environ(PIP_EXTRA_ARGS="--no-cache  --index-strategy unsafe-best-match", PYTHON_COMPILE_ALL_EXTRA_ARGS="-q")
        ).local_runtime
        self.assertEqual(local.pip_extra_argv, ("--no-cache", "--index-strategy", "unsafe-best-match"))
        self.assertEqual(local.python_compile_all_extra_argv, ("-q",))

    def test_sentinels(self):
        """Redis sentinels are a list of host:port."""
        redis = load_config(
            _environ(REDIS_USE_SENTINEL="true", REDIS_SENTINELS="a:26379,b:26379", REDIS_SENTINEL_SERVICE_NAME="m")
        ).redis
        self.assertEqual(redis.redis_sentinels, ("a:26379", "b:26379"))
        self.assertTrue(redis.configured)


class ServerlessTests(SynchronousTestCase):
    """The connector is required only on the serverless platform."""

    def test_serverless(self):
        """A serverless config carries the connector."""
        config = load_config(_environ(**_SERVERLESS))
        self.assertEqual(config.platform, "serverless")
        self.assertEqual(config.serverless.dify_plugin_serverless_connector_url, "http://connector:5004")
        self.assertEqual(config.serverless.dify_plugin_serverless_connector_api_key, "connector-key")

    def test_serverless_requires_connector(self):
        """Without the connector, serverless names both missing variables."""
        error = self.assertRaises(ConfigErrors, load_config, _environ(PLATFORM="serverless"))
        self.assertEqual(
            [each.variable for each in error.errors],
            ["DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL", "DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY"],
        )
        self.assertIn("when PLATFORM is serverless", error.problem)

    def test_empty_connector_key(self):
        """An empty connector key is set (sent as an empty Authorization), not missing."""
        config = load_config(
            _environ(PLATFORM="serverless", DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL="http://c:1",
                     DIFY_PLUGIN_SERVERLESS_CONNECTOR_API_KEY="")
        )
        self.assertEqual(config.serverless.dify_plugin_serverless_connector_api_key, "")

    def test_local_does_not_require_connector(self):
        """The local platform loads without any connector variable."""
        self.assertIsNone(load_config(_environ()).serverless.dify_plugin_serverless_connector_url)

    def test_connector_url_scheme(self):
        """The connector URL must be an http(s) URL."""
        error = self.assertRaises(
            ConfigError, load_config, _environ(**dict(_SERVERLESS, DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL="connector"))
        )
        self.assertEqual(error.variable, "DIFY_PLUGIN_SERVERLESS_CONNECTOR_URL")

    def test_request_bytes_positive(self):
        """MAX_SERVERLESS_REQUEST_BYTES must be above 0."""
        error = self.assertRaises(ConfigError, load_config, _environ(MAX_SERVERLESS_REQUEST_BYTES="0"))
        self.assertEqual(error.variable, "MAX_SERVERLESS_REQUEST_BYTES")

    def test_working_path_only_defaults_on_local(self):
        """PLUGIN_WORKING_PATH defaults to cwd on local and stays empty on serverless."""
        self.assertEqual(load_config(_environ()).local_runtime.plugin_working_path, "cwd")
        self.assertEqual(load_config(_environ(**_SERVERLESS)).local_runtime.plugin_working_path, "")


class AdminTests(SynchronousTestCase):
    """The admin key must be at least 10 characters when the admin API is on."""

    def test_short_key(self):
        """A 9-character key is refused when enabled."""
        error = self.assertRaises(ConfigError, load_config, _environ(ADMIN_API_ENABLED="true", ADMIN_API_KEY="123456789"))
        self.assertEqual(error.variable, "ADMIN_API_KEY")
        self.assertIn("10 characters", error.problem)
        self.assertNotIn("123456789", str(error))

    def test_missing_key(self):
        """No key at all is refused when enabled."""
        error = self.assertRaises(ConfigError, load_config, _environ(ADMIN_API_ENABLED="true"))
        self.assertEqual(error.variable, "ADMIN_API_KEY")

    def test_ten_characters(self):
        """A 10-character key is enough."""
        config = load_config(_environ(ADMIN_API_ENABLED="true", ADMIN_API_KEY="1234567890"))
        self.assertEqual((config.admin_api_enabled, config.admin_api_key), (True, "1234567890"))

    def test_disabled(self):
        """When disabled, a short key is not checked."""
        self.assertFalse(load_config(_environ(ADMIN_API_KEY="short")).admin_api_enabled)


class RedisTests(SynchronousTestCase):
    """Redis settings are parsed and checked."""

    def test_in_use(self):
        """Redis is in use when REDIS_HOST is set or Sentinel is on, not by default."""
        self.assertFalse(load_config(_environ()).redis.in_use)
        self.assertTrue(load_config(_environ(REDIS_HOST="redis")).redis.in_use)
        sentinel = _environ(REDIS_USE_SENTINEL="true", REDIS_SENTINELS="s:26379", REDIS_SENTINEL_SERVICE_NAME="m")
        self.assertTrue(load_config(sentinel).redis.in_use)

    def test_sentinel_needs_sentinels_and_service(self):
        """REDIS_USE_SENTINEL=true without sentinels or service name, or with a sentinel lacking a port, is refused."""
        error = self.assertRaises(ConfigErrors, load_config, _environ(REDIS_USE_SENTINEL="true"))
        self.assertEqual(
            [e.variable for e in error.errors], ["REDIS_SENTINELS", "REDIS_SENTINEL_SERVICE_NAME"]
        )
        for sentinels in ("s", "s:", "s:port", ":26379", "s:0", "s:70000"):
            error = self.assertRaises(
                ConfigError,
                load_config,
                _environ(REDIS_USE_SENTINEL="true", REDIS_SENTINELS=sentinels, REDIS_SENTINEL_SERVICE_NAME="m"),
            )
            self.assertEqual(error.variable, "REDIS_SENTINELS")

    def test_azure_identity_refused_when_used(self):
        """Entra ID authentication is refused when Redis is in use, accepted (unused) otherwise."""
        error = self.assertRaises(
            ConfigError, load_config, _environ(REDIS_HOST="redis", REDIS_USE_AZURE_MANAGED_IDENTITY="true")
        )
        self.assertEqual(error.variable, "REDIS_USE_AZURE_MANAGED_IDENTITY")
        self.assertTrue(load_config(_environ(REDIS_USE_AZURE_MANAGED_IDENTITY="true")).redis.redis_use_azure_managed_identity)

    def test_connection(self):
        """Host, port and db are read."""
        redis = load_config(_environ(REDIS_HOST="redis", REDIS_PORT="6379", REDIS_DB="2")).redis
        self.assertEqual((redis.redis_host, redis.redis_port, redis.redis_db, redis.configured), ("redis", 6379, 2, True))

    def test_cert_reqs(self):
        """REDIS_SSL_CERT_REQS is upper-cased and checked."""
        self.assertEqual(load_config(_environ(REDIS_SSL_CERT_REQS="cert_none")).redis.redis_ssl_cert_reqs, "CERT_NONE")
        error = self.assertRaises(ConfigError, load_config, _environ(REDIS_SSL_CERT_REQS="strict"))
        self.assertEqual(error.variable, "REDIS_SSL_CERT_REQS")

    def test_azure_identity_needs_db_zero(self):
        """Managed identity requires REDIS_DB 0."""
        error = self.assertRaises(
            ConfigError, load_config, _environ(REDIS_USE_AZURE_MANAGED_IDENTITY="true", REDIS_DB="1")
        )
        self.assertEqual(error.variable, "REDIS_DB")


class ClusterTests(SynchronousTestCase):
    """CLUSTER_ADVERTISE_HOST is a bare host."""

    def test_unset(self):
        """Unset or blank, it is None (detected at start-up)."""
        self.assertIsNone(load_config(_environ()).cluster.cluster_advertise_host)
        self.assertIsNone(load_config(_environ(CLUSTER_ADVERTISE_HOST="  ")).cluster.cluster_advertise_host)

    def test_hosts(self):
        """Host names and IPv4 and IPv6 addresses are accepted, trimmed."""
        for host in ("daemon-1", "daemon-1.plugins.svc.cluster.local", "10.0.0.5", "fd00::5", " 10.0.0.6 "):
            config = load_config(_environ(CLUSTER_ADVERTISE_HOST=host))
            self.assertEqual(config.cluster.cluster_advertise_host, host.strip())

    def test_refused(self):
        """A URL, a host with a port, or text with blanks is refused naming the variable."""
        for host in ("http://daemon:5002", "daemon:5002", "two words", "[fd00::5]", "-daemon"):
            error = self.assertRaises(ConfigError, load_config, _environ(CLUSTER_ADVERTISE_HOST=host))
            self.assertEqual(error.variable, "CLUSTER_ADVERTISE_HOST")


class ExampleAndDocumentationTests(SynchronousTestCase):
    """.env.example and docs/configuration.md cover every variable."""

    def test_example_loads_alone(self):
        """.env.example as the only input gives a working local SQLite config."""
        config = load_config({}, _read(_ENV_EXAMPLE))
        self.assertEqual(config.server_key, "lYkiYYT6owG+71oLerGzA7GXCgOT++6ovaezWAjpCjf+Sjc3ZtU+qUEi")
        self.assertEqual(config.dify_inner_api_key, "QaHbTe77CtuXmsfyhR7+vRjI/+XbV1AaFy691iy+kGDv2Jvy0/eAh8Y1")
        self.assertEqual(config.dify_inner_api_url, "http://api:5001")
        self.assertEqual(config.platform, "local")
        self.assertEqual((config.db.db_type, config.db.db_database), ("sqlite", "difydaemon.db"))
        self.assertEqual(config.storage.plugin_storage_local_root, "./storage")
        self.assertEqual(config.local_runtime.plugin_working_path, "./cwd")
        self.assertEqual(
            (config.remote.plugin_remote_installing_host, config.remote.plugin_remote_installing_port),
            ("0.0.0.0", 5003),
        )
        self.assertTrue(config.packages.force_verifying_signature)

    def test_example_matches_defaults(self):
        """.env.example only restates defaults, apart from the sample values it must set."""
        from_example = load_config({}, _read(_ENV_EXAMPLE))
        sample = {
            name: value
            for name, value in parse_dotenv(_read(_ENV_EXAMPLE)).items()
            if name
            in (
                "SERVER_KEY",
                "DIFY_INNER_API_URL",
                "DIFY_INNER_API_KEY",
                "PLATFORM",
                "PLUGIN_REMOTE_INSTALLING_HOST",
                "PLUGIN_REMOTE_INSTALLING_PORT",
                "PLUGIN_STORAGE_LOCAL_ROOT",
                "PLUGIN_WORKING_PATH",
                "REDIS_SENTINEL_SOCKET_TIMEOUT",
            )
        }
        from_defaults = load_config(sample)
        self.assertEqual(from_example, from_defaults)

    def test_example_lists_every_variable(self):
        """Every variable appears in .env.example as an assignment (possibly commented out)."""
        text = _read(_ENV_EXAMPLE)
        missing = [
            name for name in VARIABLES if not re.search(rf"^(# )?{re.escape(name)}=", text, re.MULTILINE)
        ]
        self.assertEqual(missing, [])

    def test_example_comments_every_variable(self):
        """Every assignment in .env.example directly follows its comment line."""
        lines = _read(_ENV_EXAMPLE).splitlines()
        uncommented = [
            line
            for previous, line in zip(lines, lines[1:])
            if re.match(r"[A-Za-z_]+=", line) and not previous.startswith("#")
        ]
        self.assertEqual(uncommented, [])

    def test_example_assigns_only_known_variables(self):
        """.env.example sets nothing the daemon does not read."""
        self.assertEqual(set(parse_dotenv(_read(_ENV_EXAMPLE))) - set(VARIABLES), set())

    def test_documentation_lists_every_variable(self):
        """Every variable has a row in docs/configuration.md."""
        text = _read(_CONFIGURATION_DOC)
        missing = [name for name in VARIABLES if f"| `{name}` |" not in text]
        self.assertEqual(missing, [])


class S3StorageTests(SynchronousTestCase):
    """PLUGIN_STORAGE_TYPE=aws_s3 and the S3 variables, with Go's names and defaults."""

    def s3(self, **overrides):
        return load_config(_environ(PLUGIN_STORAGE_TYPE="aws_s3", **overrides)).storage

    def test_go_defaults(self):
        """A bucket alone is enough on AWS: the credential chain, path style, no endpoint."""
        storage = self.s3(PLUGIN_STORAGE_OSS_BUCKET="plugins")
        self.assertEqual(storage.plugin_storage_type, "aws_s3")
        self.assertEqual(storage.plugin_storage_oss_bucket, "plugins")
        self.assertEqual(
            (storage.s3_use_aws, storage.s3_use_aws_managed_iam, storage.s3_use_path_style, storage.s3_endpoint),
            (True, False, True, ""),
        )

    def test_compatible_store(self):
        """S3_USE_AWS=false takes the endpoint and the keys; the secret is kept out of repr."""
        storage = self.s3(
            PLUGIN_STORAGE_OSS_BUCKET="plugins", S3_USE_AWS="false", S3_ENDPOINT="http://minio:9000",
            AWS_ACCESS_KEY="id", AWS_SECRET_KEY="s3cret", AWS_REGION="eu-west-1", S3_USE_PATH_STYLE="false",
        )
        self.assertEqual(
            (storage.s3_endpoint, storage.aws_access_key, storage.aws_secret_key, storage.aws_region),
            ("http://minio:9000", "id", "s3cret", "eu-west-1"),
        )
        self.assertFalse(storage.s3_use_path_style)
        self.assertNotIn("s3cret", repr(storage))

    def test_bucket_required(self):
        """aws_s3 without PLUGIN_STORAGE_OSS_BUCKET is refused, naming it."""
        error = self.assertRaises(ConfigError, self.s3)
        self.assertEqual(error.variable, "PLUGIN_STORAGE_OSS_BUCKET")
        self.assertIn("is required when PLUGIN_STORAGE_TYPE is aws_s3", error.problem)

    def test_compatible_store_needs_endpoint_and_keys(self):
        """S3_USE_AWS=false without an endpoint and keys names S3_ENDPOINT and AWS_ACCESS_KEY."""
        error = self.assertRaises(ConfigErrors, self.s3, PLUGIN_STORAGE_OSS_BUCKET="b", S3_USE_AWS="false")
        self.assertEqual([e.variable for e in error.errors], ["S3_ENDPOINT", "AWS_ACCESS_KEY"])

    def test_half_a_key_pair(self):
        """An access key without its secret names AWS_SECRET_KEY."""
        error = self.assertRaises(ConfigError, self.s3, PLUGIN_STORAGE_OSS_BUCKET="b", AWS_ACCESS_KEY="id")
        self.assertEqual(error.variable, "AWS_SECRET_KEY")

    def test_managed_iam_needs_no_keys(self):
        """With S3_USE_AWS_MANAGED_IAM the keys are not required, even for a compatible store."""
        storage = self.s3(
            PLUGIN_STORAGE_OSS_BUCKET="b", S3_USE_AWS="false", S3_ENDPOINT="http://s3:9000",
            S3_USE_AWS_MANAGED_IAM="true",
        )
        self.assertTrue(storage.s3_use_aws_managed_iam)

    def test_endpoint_is_a_url(self):
        """S3_ENDPOINT must be an http(s) URL."""
        error = self.assertRaises(ConfigError, self.s3, PLUGIN_STORAGE_OSS_BUCKET="b", S3_ENDPOINT="minio:9000")
        self.assertEqual(error.variable, "S3_ENDPOINT")

    def test_bad_boolean(self):
        """S3_USE_PATH_STYLE is a Go boolean."""
        error = self.assertRaises(ConfigError, self.s3, PLUGIN_STORAGE_OSS_BUCKET="b", S3_USE_PATH_STYLE="yes")
        self.assertEqual(error.variable, "S3_USE_PATH_STYLE")

    def test_local_ignores_s3_requirements(self):
        """With the local store the S3 variables are parsed but nothing of S3 is required."""
        storage = load_config(_environ(S3_USE_AWS="false")).storage
        self.assertEqual(storage.plugin_storage_type, "local")
        self.assertFalse(storage.s3_use_aws)

    def test_other_stores_variables_parsed(self):
        """The other stores' variables are read with their Go names, booleans checked."""
        storage = load_config(
            _environ(AZURE_BLOB_STORAGE_CONTAINER_NAME="c", HUAWEI_OBS_PATH_STYLE="true")
        ).storage
        self.assertEqual(
            dict(storage.other_storage_variables),
            {"AZURE_BLOB_STORAGE_CONTAINER_NAME": "c", "HUAWEI_OBS_PATH_STYLE": True},
        )
        error = self.assertRaises(ConfigError, load_config, _environ(AZURE_BLOB_STORAGE_USE_MANAGED_IDENTITY="maybe"))
        self.assertEqual(error.variable, "AZURE_BLOB_STORAGE_USE_MANAGED_IDENTITY")

    def test_storage_secrets_never_passed_to_plugins(self):
        """PLUGIN_ENV_PASSTHROUGH may not name a storage credential."""
        for name in ("AWS_SECRET_KEY", "GCS_CREDENTIALS", "AZURE_BLOB_STORAGE_CONNECTION_STRING"):
            error = self.assertRaises(ConfigError, load_config, _environ(PLUGIN_ENV_PASSTHROUGH=name))
            self.assertEqual(error.variable, "PLUGIN_ENV_PASSTHROUGH")
