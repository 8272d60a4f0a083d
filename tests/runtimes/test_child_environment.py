"""Tests for difydaemon.runtimes.child_environment: what children inherit."""

from __future__ import annotations

from difydaemon.runtimes.child_environment import (
    passthrough_names,
    plugin_environment,
    uv_environment,
)
from difydaemon.testing.cases import SynchronousTestCase

#: What a daemon's environment may hold that no child may see.
SECRETS = {
    "DB_PASSWORD": "db-secret",
    "SERVER_KEY": "server-secret",
    "DIFY_INNER_API_KEY": "inner-secret",
    "REDIS_PASSWORD": "redis-secret",
    "ADMIN_API_KEY": "admin-secret",
    "AWS_SECRET_KEY": "aws-secret",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "FOO_SECRET": "foo-secret",
    "REMOTE_INSTALL_KEY": "debug-key",
    "PYTHONPATH": "/daemon/site-packages",
    "PYTHONHOME": "/daemon",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PIP_INDEX_URL": "https://user:pass@pypi.example/simple",
}

#: The ordinary variables every child inherits.
ORDINARY = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/home/daemon",
    "LANG": "C.UTF-8",
    "LC_ALL": "en_US.UTF-8",
    "LC_CTYPE": "en_US.UTF-8",
    "TZ": "Europe/Paris",
    "TMPDIR": "/var/tmp",
    "SSL_CERT_FILE": "/etc/ssl/ca.pem",
    "SSL_CERT_DIR": "/etc/ssl/certs",
    "REQUESTS_CA_BUNDLE": "/etc/ssl/ca.pem",
    "HTTPS_PROXY": "http://proxy:3128",
    "no_proxy": "localhost",
}

UV = {
    "UV_INDEX_URL": "https://nexus.example/simple",
    "UV_INDEX_NEXUS_USERNAME": "nexus",
    "UV_INDEX_NEXUS_PASSWORD": "nexus-secret",
    "UV_HTTP_TIMEOUT": "60",
}

#: uv variables that would make it install outside the plugin's venv.
REDIRECTING_UV = {
    "UV_PYTHON": "/usr/bin/python3",
    "UV_SYSTEM_PYTHON": "1",
    "UV_BREAK_SYSTEM_PACKAGES": "1",
    "UV_PROJECT_ENVIRONMENT": "/elsewhere",
}


class PluginEnvironmentTests(SynchronousTestCase):
    """A plugin process gets the allow-list, the operator's list and the proxies, nothing else."""

    def test_only_allowed_variables(self):
        """Secrets, PYTHON*, PIP_* and UV_* are dropped; the ordinary variables are kept as they are."""
        environ = {**SECRETS, **ORDINARY, **UV, **REDIRECTING_UV}
        self.assertEqual(plugin_environment(environ), ORDINARY)

    def test_passthrough(self):
        """A variable the operator lists is inherited; a listed one that is unset is not invented."""
        environ = {**SECRETS, "OPENAI_BASE_URL": "http://llm:8000"}
        self.assertEqual(
            plugin_environment(environ, passthrough=("OPENAI_BASE_URL", "UNSET_VARIABLE")),
            {"OPENAI_BASE_URL": "http://llm:8000"},
        )

    def test_configured_proxies_win(self):
        """The configuration's resolved proxies replace the inherited ones; empty values are left out."""
        environ = {"HTTP_PROXY": "http://inherited:1", "http_proxy": "http://inherited:1"}
        proxies = {"HTTP_PROXY": "http://configured:2", "http_proxy": "http://configured:2", "NO_PROXY": ""}
        self.assertEqual(
            plugin_environment(environ, proxies),
            {"HTTP_PROXY": "http://configured:2", "http_proxy": "http://configured:2"},
        )

    def test_names_are_exact(self):
        """Look-alike names are not inherited: matching is by exact name or the LC_ prefix."""
        environ = {"PATHS": "x", "path": "x", "HOME_DIR": "x", "XLC_ALL": "x", "LC_": "kept"}
        self.assertEqual(plugin_environment(environ), {"LC_": "kept"})


class UvEnvironmentTests(SynchronousTestCase):
    """uv steps also get uv's own configuration, except what would redirect the install."""

    def test_uv_variables(self):
        """UV_* reaches uv steps, the redirecting ones and the secrets do not."""
        environ = {**SECRETS, **ORDINARY, **UV, **REDIRECTING_UV}
        self.assertEqual(uv_environment(environ), {**ORDINARY, **UV})

    def test_operator_may_list_a_redirecting_variable(self):
        """A redirecting UV_* variable the operator lists explicitly is passed."""
        environ = {"UV_PYTHON": "/opt/python3.12"}
        self.assertEqual(uv_environment(environ, passthrough=("UV_PYTHON",)), environ)


class PassthroughNamesTests(SynchronousTestCase):
    """PLUGIN_ENV_PASSTHROUGH is a comma-separated list of exact names."""

    def test_parsed(self):
        """Blanks and empty items are ignored, duplicates kept once, order kept."""
        self.assertEqual(passthrough_names(" B_2 ,, a,B_2, _C "), ("B_2", "a", "_C"))
        self.assertEqual(passthrough_names(""), ())
        self.assertEqual(passthrough_names(None), ())

    def test_refused(self):
        """Patterns, assignments and names with blanks are refused, naming the item."""
        for text, item in (("AWS_*", "'AWS_*'"), ("A,B=c", "'B=c'"), ("MY VAR", "'MY VAR'"), ("1ABC", "'1ABC'")):
            with self.assertRaises(ValueError) as raised:
                passthrough_names(text)
            self.assertIn(item, str(raised.exception))
