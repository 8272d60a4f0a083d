"""
What the daemon's child processes inherit from its environment: an allow-list.

A plugin is third-party code, and so is everything ``uv`` builds for it (a
source distribution's ``setup.py`` runs during the install; a wheel's ``.pth``
file runs whenever the venv's Python starts, byte-compilation included).
None of it may see the daemon's own secrets (``DB_PASSWORD``,
``SERVER_KEY``, ``DIFY_INNER_API_KEY``, ``REDIS_PASSWORD``, object storage
keys...), so a child gets the variables named here and nothing else:

- every child: :data:`ALLOWED_VARIABLES` (``PATH``, ``HOME``, locale, time
  zone, temporary directory, CA bundles, proxies) and the ``LC_*`` locale
  variables, the configured proxies on top (``HTTP_PROXY``... resolved by
  the configuration, in both cases), and the names an operator lists in
  ``PLUGIN_ENV_PASSTHROUGH``;
- ``uv`` steps also get uv's own ``UV_*`` configuration (private index URLs
  and their credentials, TLS and timeout settings), except the variables in
  :data:`UV_REDIRECTING_VARIABLES`, which would make uv install somewhere
  else than the plugin's venv.  Plugin processes never see ``UV_*``.

Names are matched exactly (``http_proxy`` is not ``HTTP_PROXY``).  Nothing
is left out by the look of its name: whatever is not allowed is dropped.
``PYTHONPATH``, ``PYTHONHOME`` and the other ``PYTHON*`` variables are
dropped with the rest: they point the plugin's Python 3.12 at the daemon's
own libraries.  uv reads no ``PIP_*`` variable, so none is passed; a build
backend that needs one can have it through ``PLUGIN_ENV_PASSTHROUGH``.

Everything here is a pure function of its arguments.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

#: The variables every child inherits when the daemon has them.
ALLOWED_VARIABLES: tuple[str, ...] = (
    "PATH",
    "HOME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TEMP",
    "TMP",
    # CA bundles: behind a TLS-intercepting proxy nothing reaches PyPI or a
    # model provider without them.  They name files, they hold no secret.
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
)

#: Name prefixes every child inherits (the locale categories).
ALLOWED_PREFIXES: tuple[str, ...] = ("LC_",)

#: The prefix of uv's own configuration, passed to uv steps only.
UV_PREFIX = "UV_"

#: ``UV_*`` variables never passed: each would make uv build or install
#: outside the plugin's venv (another interpreter, the system Python, a
#: project environment elsewhere).
UV_REDIRECTING_VARIABLES: frozenset[str] = frozenset(
    {
        "UV_PYTHON",
        "UV_SYSTEM_PYTHON",
        "UV_BREAK_SYSTEM_PACKAGES",
        "UV_PROJECT_ENVIRONMENT",
    }
)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def passthrough_names(text: str | None) -> tuple[str, ...]:
    """
    The names of ``PLUGIN_ENV_PASSTHROUGH``: comma-separated, blanks around
    names and empty items ignored.

    :raises ValueError: naming the first item that is not a variable name
        (a pattern such as ``AWS_*`` or a ``NAME=value`` pair is refused:
        each variable is listed by its exact name).
    """
    names = []
    for item in (text or "").split(","):
        name = item.strip()
        if not name:
            continue
        if _NAME.match(name) is None:
            raise ValueError(f"{name!r} is not a variable name (list exact names, separated by commas)")
        if name not in names:
            names.append(name)
    return tuple(names)


def is_allowed(name: str) -> bool:
    """Whether every child inherits the variable ``name``."""
    return name in ALLOWED_VARIABLES or name.startswith(ALLOWED_PREFIXES)


def plugin_environment(
    environ: Mapping[str, str],
    proxies: Mapping[str, str] | None = None,
    passthrough: Iterable[str] = (),
) -> dict[str, str]:
    """
    The environment a plugin process starts from (the runtime adds
    ``INSTALL_METHOD=local``): the allowed variables of ``environ``, the
    ``passthrough`` ones, then ``proxies`` over both.

    :param environ: the daemon's environment.
    :param proxies: resolved proxy variables (``LocalRuntimeConfig.proxy_environment``);
        empty values are left out.
    :param passthrough: the names listed in ``PLUGIN_ENV_PASSTHROUGH``.
    """
    passthrough = frozenset(passthrough)
    env = {name: value for name, value in environ.items() if is_allowed(name) or name in passthrough}
    env.update((name, value) for name, value in (proxies or {}).items() if value)
    return env


def uv_environment(
    environ: Mapping[str, str],
    proxies: Mapping[str, str] | None = None,
    passthrough: Iterable[str] = (),
) -> dict[str, str]:
    """
    The environment of the ``uv`` steps: :func:`plugin_environment` plus
    uv's own ``UV_*`` variables, except :data:`UV_REDIRECTING_VARIABLES`
    (unless the operator lists one in ``passthrough``).
    """
    env = plugin_environment(environ, proxies, passthrough)
    for name, value in environ.items():
        if name.startswith(UV_PREFIX) and name not in UV_REDIRECTING_VARIABLES:
            env[name] = value
    return env
