"""
Finding the executables a build needs: uv, and a Python interpreter of the
version a plugin asks for (``PYTHON_INTERPRETER_PATH``, ``PATH``, pyenv,
the usual directories), each asked its version without blocking the reactor.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence

from difydaemon.errors import InternalServerError
from difydaemon.runtimes.environment.steps import StepCommand, run_step
from difydaemon.runtimes.parent_death import ParentDeathSignal

_VERSION_PROBE = "import sys; print('%d.%d' % sys.version_info[:2])"
_PROBE_TIMEOUT = 30.0


def find_uv(uv_path: str | None) -> str:
    """
    The uv executable: ``UV_PATH``, else the binary of the ``uv`` package
    installed with the daemon, else ``uv`` on ``PATH``.

    :raises InternalServerError: when none is found, or ``uv_path`` is not executable.
    """
    if uv_path:
        if not _is_executable(uv_path):
            raise InternalServerError(f"UV_PATH {uv_path!r} is not an executable file")
        return uv_path
    try:
        import uv as uv_package

        return uv_package.find_uv_bin()
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("uv")
    if found is None:
        raise InternalServerError("uv not found: set UV_PATH or install the uv package")
    return found


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _pyenv_versions(pyenv_root: str, version: str) -> list[str]:
    """``<root>/versions/<version>[.N]/bin/python<version>``, newest patch first."""
    versions_dir = os.path.join(pyenv_root, "versions")
    try:
        names = os.listdir(versions_dir)
    except OSError:
        return []
    pattern = re.compile(re.escape(version) + r"(?:\.(\d+))?", re.ASCII)
    matching = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is not None:
            matching.append((int(match.group(1) or -1), name))
    matching.sort(reverse=True)
    return [os.path.join(versions_dir, name, "bin", f"python{version}") for _, name in matching]


def interpreter_candidates(
    version: str,
    environ: Mapping[str, str],
    search_dirs: Sequence[str] = ("/usr/bin", "/usr/local/bin"),
) -> list[str]:
    """
    Executables that should be Python ``version``, in the order they are tried.

    ``python<version>`` on ``PATH``, then pyenv's ``versions/<version>.*``
    (root from ``$PYENV_ROOT``, else ``~/.pyenv``), then ``search_dirs``.
    Only existing executables are listed, each once.  Names can lie (a pyenv
    shim fails when the version is not selected), so each is asked later.
    """
    name = f"python{version}"
    paths = [os.path.join(d, name) for d in environ.get("PATH", "").split(os.pathsep) if d]
    home = environ.get("HOME") or os.path.expanduser("~")
    pyenv_root = environ.get("PYENV_ROOT") or os.path.join(home, ".pyenv")
    paths += _pyenv_versions(pyenv_root, version)
    paths += [os.path.join(d, name) for d in search_dirs]
    seen: set[str] = set()
    candidates = []
    for path in paths:
        if path not in seen and _is_executable(path):
            seen.add(path)
            candidates.append(path)
    return candidates


async def find_interpreter(
    reactor,
    version: str,
    configured_path: str | None,
    environ: Mapping[str, str] | None = None,
    search_dirs: Sequence[str] = ("/usr/bin", "/usr/local/bin"),
    parent_death: ParentDeathSignal | None = None,
) -> str:
    """
    A Python interpreter of ``version`` (``"3.12"``) on this machine.

    ``configured_path`` (``PYTHON_INTERPRETER_PATH``) wins if it is that
    version; otherwise the :func:`interpreter_candidates` are tried.  Each is
    asked its version by running it (through ``parent_death`` when given),
    on the reactor, never blocking it.

    :raises InternalServerError: naming the version when none is found.
    """
    environ = os.environ if environ is None else environ
    candidates = interpreter_candidates(version, environ, search_dirs)
    if configured_path:
        candidates.insert(0, configured_path)
    probe_env = {key: value for key, value in environ.items() if key in ("PATH", "HOME", "PYENV_ROOT")}
    for candidate in candidates:
        if not _is_executable(candidate):
            continue
        outcome = await run_step(
            reactor,
            StepCommand(
                step=f"asking {candidate} its version",
                argv=(candidate, "-c", _VERSION_PROBE),
                env=probe_env,
                path="/",
            ),
            _PROBE_TIMEOUT,
            _PROBE_TIMEOUT,
            parent_death,
        )
        if outcome.succeeded and outcome.tail.splitlines()[-1:] == [version]:
            return candidate
    raise InternalServerError(
        f"no Python {version} interpreter found for the plugin runner "
        f"(tried PYTHON_INTERPRETER_PATH, PATH, pyenv and {', '.join(search_dirs)})"
    )
