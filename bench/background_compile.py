"""
An SDK plugin's start from a venv without bytecode, alone and beside the
daemon's background compilation of site-packages, interleaved (A B C A B C
...): the time from spawning ``python -m main`` to its first heartbeat, and
the plugin's own CPU seconds (what it compiled itself shows there).

- ``alone``: nothing compiles beside it;
- ``name order``: ``nice compileall`` of site-packages, as the daemon did
  before it predicted the plugin's imports;
- ``import order``: the daemon's background compilation now: the plugin's
  imports predicted in a thread of this process (as in the daemon's), then
  ``nice compileall`` of those first, in reverse, then of site-packages.

The venv is the echo plugin's, built once with uv from the tests' uv cache;
its ``__pycache__`` directories are removed before each start.

Usage: ``python bench/background_compile.py [--rounds 8]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from difydaemon.runtimes.environment.import_order import compile_first  # noqa: E402
from difydaemon.runtimes.environment.interpreters import find_uv  # noqa: E402
from difydaemon.testing.packages import echo_plugin_files, write_files  # noqa: E402
from difydaemon.testing.sdk import python312, test_uv_cache_dir  # noqa: E402


def build(directory: str) -> str:
    """The echo plugin with its venv in ``directory``; its site-packages, relative."""
    write_files(directory, echo_plugin_files())
    env = dict(os.environ, UV_CACHE_DIR=test_uv_cache_dir(), VIRTUAL_ENV=os.path.join(directory, ".venv"))
    uv = find_uv(None)
    subprocess.run([uv, "venv", ".venv", "--python", python312()], cwd=directory, env=env, check=True, capture_output=True)
    subprocess.run([uv, "pip", "install", "-r", "requirements.txt"], cwd=directory, env=env, check=True, capture_output=True)
    lib = os.path.join(".venv", "lib")
    [name] = [n for n in os.listdir(os.path.join(directory, lib)) if n.startswith("python")]
    return os.path.join(lib, name, "site-packages")


def remove_bytecode(directory: str, site_packages: str) -> None:
    for root, dirs, _ in os.walk(os.path.join(directory, site_packages)):
        if "__pycache__" in dirs:
            shutil.rmtree(os.path.join(root, "__pycache__"))
            dirs.remove("__pycache__")


def compile_beside(directory: str, site_packages: str, first_of) -> tuple[threading.Thread, list]:
    """Start the background compilation (in a thread, as the daemon's coroutine); its process lands in the list."""
    started = []

    def run():
        first = first_of() if first_of is not None else []
        argv = ["nice", "-n", "10", os.path.join(".venv", "bin", "python"), "-m", "compileall", "-q", *first, site_packages]
        started.append(subprocess.Popen(argv, cwd=directory, stdout=subprocess.DEVNULL, start_new_session=True))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, started


def start_plugin(directory: str) -> tuple[float, float]:
    """Seconds to the first heartbeat, and the plugin's CPU seconds by then."""
    env = dict(os.environ, INSTALL_METHOD="local")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    start = time.perf_counter()
    process = subprocess.Popen(
        [os.path.join(directory, ".venv", "bin", "python"), "-m", "main"],
        cwd=directory, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    seen = b""
    while b"heartbeat" not in seen:
        chunk = os.read(process.stdout.fileno(), 65536)
        if not chunk:
            raise RuntimeError("the plugin exited before its first heartbeat")
        seen = seen[-64:] + chunk
    elapsed = time.perf_counter() - start
    process.kill()
    _, _, usage = os.wait4(process.pid, 0)
    process.stdin.close()
    process.stdout.close()
    return elapsed, usage.ru_utime + usage.ru_stime


def main(args) -> None:
    directory = tempfile.mkdtemp(prefix="difydaemon-bench-compile-")
    try:
        site_packages = build(directory)
        modes = {
            "alone": None,
            "name order": lambda: None,
            "import order": lambda: lambda: compile_first(directory, [site_packages], None),
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
        for _ in range(args.rounds):
            for name, mode in modes.items():
                remove_bytecode(directory, site_packages)
                beside = None if mode is None else compile_beside(directory, site_packages, mode())
                results[name].append(start_plugin(directory))
                if beside is not None:
                    thread, started = beside
                    thread.join()
                    for process in started:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait()
        print(f"cores: {os.cpu_count()}; uncompiled start of the echo plugin to its first heartbeat ({args.rounds} interleaved rounds):")
        for name, values in results.items():
            walls = " ".join(f"{wall:.2f}" for wall, _ in values)
            print(
                f"  {name:12s}: median {median(w for w, _ in values):.2f} s, plugin CPU {median(c for _, c in values):.2f} s  ({walls})"
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    main(parser.parse_args())
