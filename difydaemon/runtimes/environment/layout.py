"""
Where a plugin's files and venv live, and the pure decisions about them
(``runtimes.md`` §1.2–§1.3): the working directory of an identifier, the
Python version a manifest asks for, the dependency file to install from, and
the marker that says a venv is complete.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection

from difydaemon.errors import InternalServerError
from difydaemon.packaging.identifier import PluginIdentifier, parse_identifier

VENV_DIR = ".venv"
VENV_PYTHON = os.path.join(VENV_DIR, "bin", "python")
MARKER_PATH = os.path.join(VENV_DIR, "dify", "plugin.json")
DEFAULT_RUNNER_VERSION = "3.12"
REQUIREMENTS_TXT = "requirements.txt"
PYPROJECT_TOML = "pyproject.toml"
UV_LOCK = "uv.lock"
# Wheels a package ships for offline installs (as community repackaging
# tools and ``dify plugin package --offline`` make them).
WHEELS_DIR = "wheels"

_RUNNER_VERSION = re.compile(r"(\d{1,3})\.(\d{1,3})(?:\.\d{1,4})?", re.ASCII)


def working_dir_for(working_path: str, identifier: str | PluginIdentifier) -> str:
    """
    The directory a plugin is unpacked into and run from.

    ``$PLUGIN_WORKING_PATH/<author>/<name>-<version>@<checksum>``: the identity
    ``author/name:version`` with ``:`` replaced by ``-``, so the author is a
    directory level (``runtimes.md`` §1.2).  An identifier without an author
    lives directly under ``working_path``.

    :raises UniqueIdentifierError: when ``identifier`` breaks the grammar,
        which also keeps ``..`` and absolute parts out of the path.
    """
    parsed = identifier if isinstance(identifier, PluginIdentifier) else parse_identifier(identifier)
    leaf = f"{parsed.name}-{parsed.version}@{parsed.checksum}"
    if parsed.author is None:
        return os.path.join(working_path, leaf)
    return os.path.join(working_path, parsed.author, leaf)


def runner_version(version: str | None) -> str:
    """
    The ``major.minor`` Python version a manifest's ``meta.runner.version`` asks for.

    Empty means 3.12, the only version the Go daemon ever uses; a patch part
    is dropped.

    :raises InternalServerError: when the text is not a Python version.
    """
    text = (version or "").strip()
    if not text:
        return DEFAULT_RUNNER_VERSION
    match = _RUNNER_VERSION.fullmatch(text)
    if match is None:
        raise InternalServerError(f"meta.runner.version {text!r} is not a Python version")
    return f"{int(match.group(1))}.{int(match.group(2))}"


def choose_dependency_file(present: Collection[str], pip_mirror_url: str | None) -> str:
    """
    The dependency file to install from, given the names present in the working directory.

    ``requirements.txt`` when a mirror is set or the package ships a
    ``wheels/`` folder, and it exists; otherwise
    ``pyproject.toml`` first, then ``requirements.txt`` (``runtimes.md`` §1.3
    step 5).

    :raises InternalServerError: when neither file is present.
    """
    if (pip_mirror_url or WHEELS_DIR in present) and REQUIREMENTS_TXT in present:
        return REQUIREMENTS_TXT
    if PYPROJECT_TOML in present:
        return PYPROJECT_TOML
    if REQUIREMENTS_TXT in present:
        return REQUIREMENTS_TXT
    raise InternalServerError(f"the plugin has neither {PYPROJECT_TOML} nor {REQUIREMENTS_TXT}")


def marker_content(timestamp: float) -> bytes:
    """The content of ``.venv/dify/plugin.json``: ``{"timestamp":<unix seconds>}``."""
    return json.dumps({"timestamp": int(timestamp)}, separators=(",", ":")).encode("ascii")


def venv_is_valid(working_dir: str) -> bool:
    """Whether ``.venv``, ``.venv/bin/python`` and the marker all exist."""
    return (
        os.path.isdir(os.path.join(working_dir, VENV_DIR))
        and os.path.exists(os.path.join(working_dir, VENV_PYTHON))
        and os.path.isfile(os.path.join(working_dir, MARKER_PATH))
    )
