"""
``dify plugin package --offline``: the wheels of a plugin's requirements for
the target platforms, put in the package's ``wheels/`` folder, and a
``requirements.txt`` that installs from that folder alone
(``--no-index --find-links=./wheels/``, as the community repackaging tools
write it), so that the package installs on a machine with no index.

uv cannot save wheels (it installs them), so ``pip download`` runs them,
with ``--only-binary=:all:`` because an air-gapped machine may lack the
compilers a source distribution needs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence

from difydaemon.cli.errors import CommandError

#: The platforms Dify's plugin daemons run on: Linux on x86-64 and on ARM.
DEFAULT_PLATFORMS = ("manylinux2014_x86_64", "manylinux2014_aarch64")
DEFAULT_PYTHON_VERSION = "3.12"
WHEELS_DIR = "wheels"
OFFLINE_OPTIONS = (b"--no-index", b"--find-links=./wheels/")

Runner = Callable[[Sequence[str]], None]


def download_commands(
    python: str, requirements: str, destination: str, python_version: str, platforms: Sequence[str]
) -> list[list[str]]:
    """One ``pip download`` per platform, wheels only, into ``destination``."""
    return [
        [
            python, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
            "--python-version", python_version, "--platform", platform,
            "--dest", destination, "-r", requirements,
        ]
        for platform in platforms
    ]


def offline_requirements(text: bytes) -> bytes:
    """``requirements.txt`` with the options that make it install from ``./wheels/`` alone, once."""
    lines = text.splitlines()
    missing = [option for option in OFFLINE_OPTIONS if option not in (line.strip() for line in lines)]
    return b"\n".join([*missing, *lines]) + b"\n"


def run_command(argv: Sequence[str]) -> None:
    """Run a download; a failure raises :class:`CommandError` quoting its last line."""
    try:
        result = subprocess.run(list(argv), capture_output=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise CommandError(f"downloading wheels failed: {error}") from None
    if result.returncode != 0:
        last = result.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise CommandError(f"downloading wheels failed (exit {result.returncode}): {last[0]}")


def with_wheels(
    files: dict[str, bytes],
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    python_version: str = DEFAULT_PYTHON_VERSION,
    run: Runner = run_command,
    python: str = sys.executable,
) -> dict[str, bytes]:
    """
    ``files`` plus ``wheels/*.whl`` for every platform, and an offline
    ``requirements.txt``.

    :raises CommandError: no ``requirements.txt``, or a download failed.
    """
    requirements = files.get("requirements.txt")
    if requirements is None:
        raise CommandError("--offline needs a requirements.txt (or a pyproject.toml with a uv.lock)")
    with tempfile.TemporaryDirectory(prefix="dify-offline-") as scratch:
        path = os.path.join(scratch, "requirements.txt")
        # pip must not read our own --no-index line
        with open(path, "wb") as handle:
            handle.write(b"\n".join(line for line in requirements.splitlines() if line.strip() not in OFFLINE_OPTIONS))
        destination = os.path.join(scratch, WHEELS_DIR)
        os.makedirs(destination)
        for argv in download_commands(python, path, destination, python_version, platforms):
            run(argv)
        wheels = {}
        for name in sorted(os.listdir(destination)):
            if name.endswith(".whl"):
                with open(os.path.join(destination, name), "rb") as handle:
                    wheels[f"{WHEELS_DIR}/{name}"] = handle.read()
    result = {name: content for name, content in files.items() if not name.startswith(f"{WHEELS_DIR}/")}
    result.update(wheels)
    result["requirements.txt"] = offline_requirements(requirements)
    return result
