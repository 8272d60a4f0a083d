"""The connector's configuration: ``SRI_*`` variables, defaults, refusals, and the daemon's build variables."""

from __future__ import annotations

import os

from difydaemon.config import SRI_VARIABLES, VARIABLES, ConfigError, ConfigErrors, load_sri_config, parse_dotenv
from difydaemon.testing.cases import SynchronousTestCase
from tests.cli.helpers import REPOSITORY

KEY = {"SRI_API_KEY": "connector-key"}


class SRIConfigTests(SynchronousTestCase):
    def test_defaults(self):
        """Only SRI_API_KEY is needed; the rest has the documented defaults."""
        config = load_sri_config(KEY)
        self.assertEqual(
            (config.sri_host, config.sri_port, config.sri_working_path, config.sri_function_host),
            ("0.0.0.0", 5004, "sri", "127.0.0.1"),
        )
        self.assertEqual(config.sri_daemon_url, "http://localhost:5002")
        self.assertEqual(config.sri_function_start_timeout, 60.0)
        self.assertEqual(config.sri_max_package_size, 52428800)

    def test_key_required(self):
        """Without SRI_API_KEY (or with an empty one) the connector refuses to start."""
        for environ in ({}, {"SRI_API_KEY": ""}):
            error = self.assertRaises(ConfigError, load_sri_config, environ)
            self.assertEqual(error.variable, "SRI_API_KEY")

    def test_key_not_in_repr(self):
        """The key never shows in the configuration's repr."""
        self.assertNotIn("connector-key", repr(load_sri_config(KEY)))

    def test_values(self):
        """Every SRI variable is read, from the environment over .env."""
        config = load_sri_config(
            {**KEY, "SRI_PORT": "6000", "SRI_FUNCTION_HOST": "10.1.2.3", "SRI_FUNCTION_START_TIMEOUT": "90s"},
            "SRI_HOST=127.0.0.1\nSRI_PORT=7000\nSRI_WORKING_PATH=/srv/sri\nSRI_DAEMON_URL=http://daemon:5002/\n"
            "SRI_MAX_PACKAGE_SIZE=1000\n",
        )
        self.assertEqual(
            (config.sri_host, config.sri_port, config.sri_working_path, config.sri_function_host),
            ("127.0.0.1", 6000, "/srv/sri", "10.1.2.3"),
        )
        self.assertEqual((config.sri_daemon_url, config.sri_function_start_timeout), ("http://daemon:5002", 90.0))
        self.assertEqual(config.sri_max_package_size, 1000)

    def test_build_variables_are_the_daemons(self):
        """PYTHON_INTERPRETER_PATH, UV_PATH, PIP_MIRROR_URL... are read as the daemon reads them."""
        config = load_sri_config(
            {**KEY, "UV_PATH": "/opt/uv", "PIP_MIRROR_URL": "https://mirror/simple", "PYTHON_INTERPRETER_PATH": "/py"}
        )
        local = config.local_runtime
        self.assertEqual((local.uv_path, local.pip_mirror_url, local.python_interpreter_path), ("/opt/uv", "https://mirror/simple", "/py"))

    def test_package_size_follows_the_daemons(self):
        """Without SRI_MAX_PACKAGE_SIZE the bound is MAX_PLUGIN_PACKAGE_SIZE."""
        self.assertEqual(load_sri_config({**KEY, "MAX_PLUGIN_PACKAGE_SIZE": "1234"}).sri_max_package_size, 1234)

    def test_bad_values(self):
        """Bad values are all reported, each naming its variable."""
        error = self.assertRaises(
            ConfigErrors,
            load_sri_config,
            {**KEY, "SRI_PORT": "0", "SRI_DAEMON_URL": "daemon:5002", "SRI_FUNCTION_HOST": "0.0.0.0"},
        )
        self.assertEqual(
            {e.variable for e in error.errors}, {"SRI_PORT", "SRI_DAEMON_URL", "SRI_FUNCTION_HOST"}
        )

    def test_key_never_passed_through(self):
        """PLUGIN_ENV_PASSTHROUGH may not hand the connector's key to functions."""
        error = self.assertRaises(ConfigError, load_sri_config, {**KEY, "PLUGIN_ENV_PASSTHROUGH": "SRI_API_KEY"})
        self.assertEqual(error.variable, "PLUGIN_ENV_PASSTHROUGH")


class SRIDocumentationTests(SynchronousTestCase):
    """Every SRI variable is documented and in the example file, which loads."""

    def read(self, name: str) -> str:
        with open(os.path.join(REPOSITORY, name)) as f:
            return f.read()

    def test_documented(self):
        """docs/configuration.md has a table row for every SRI variable."""
        text = self.read("docs/configuration.md")
        self.assertEqual([name for name in SRI_VARIABLES if f"| `{name}` |" not in text], [])

    def test_example_file(self):
        """.env.sri.example sets every SRI variable, only known ones, and loads as it is."""
        text = self.read(".env.sri.example")
        names = set(parse_dotenv(text))
        self.assertEqual(set(SRI_VARIABLES) - names, set())
        self.assertEqual(names - set(SRI_VARIABLES) - set(VARIABLES), set())
        self.assertEqual(load_sri_config({}, text).sri_port, 5004)
