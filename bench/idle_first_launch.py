"""
A replica's first launch of a plugin installed through another replica,
with idle stop on: built ahead (what the registry now does on the news of
an install, or at a reconciliation: unpack and venv, no process) against
not built (the first call unpacks, builds the venv and starts the plugin).

Each run gets a fresh working directory, as a replica that never had the
plugin; the uv cache is the tests' shared one (warm, as a daemon's own
cache is after its first installs), with no prepared venv.  The two modes
alternate, one run of each per round; the time is ``launch_installed``
until the plugin's first heartbeat.  Medians, and every run.

    .venv/bin/python bench/idle_first_launch.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from twisted.internet import defer, task

from difydaemon.blocking import ThreadPoolRunner
from difydaemon.packaging.package import PackagePolicy, decode_package
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.runtimes.child_environment import plugin_environment
from difydaemon.runtimes.launch import LocalRuntimeFactory
from difydaemon.storage.memory import MemoryObjectStorage
from difydaemon.storage.paths import StoragePaths
from difydaemon.testing.packages import build_package
from difydaemon.testing.plugins import behaviour_plugin_files
from difydaemon.testing.sdk import environment_builder

POLICY = PackagePolicy(max_size=52428800, force_verify=False, enforce_langgenius=False, public_keys=())


async def first_launch(reactor, runner, built: bool, version: int) -> float:
    """Seconds from launch_installed to a ready plugin on a replica that never had it."""
    working_path = tempfile.mkdtemp(prefix="difydaemon-idle-first-launch-")
    try:
        persistence, storage, paths = MemoryPersistence(reactor), MemoryObjectStorage(), StoragePaths()
        data = build_package(behaviour_plugin_files(version=f"0.0.{version}"))
        decoded = decode_package(data, POLICY)
        identifier = decoded.identifier.raw
        # what the installing replica left in the shared database and storage
        await persistence.install_plugin("tenant", identifier, "acme/echo", "local", "package", {}, {})
        await persistence.save_declaration(identifier, "acme/echo", decoded.declaration)
        await storage.save(paths.installed_package(identifier), data)
        factory = LocalRuntimeFactory(
            reactor, persistence, storage, paths, runner,
            environment_builder(reactor, prepared_venvs_dir=os.path.join(working_path, ".prepared")),
            working_path, plugin_environment(os.environ), 52428800,
            runtime_options={"readiness_timeout": 60.0, "session_timeout": 60.0, "stop_grace_period": 2.0},
        )
        if built:
            await factory.build_installed(identifier, lambda line: None)
        started = time.monotonic()
        runtime = await factory.launch_installed(identifier, lambda line: None)
        elapsed = time.monotonic() - started
        await runtime.stop()
        return elapsed
    finally:
        shutil.rmtree(working_path, ignore_errors=True)


async def main(reactor, rounds: int) -> None:
    runner = ThreadPoolRunner(reactor, "bench-idle-first-launch")
    times: dict[bool, list[float]] = {False: [], True: []}
    version = 100
    try:
        for _ in range(rounds):
            for built in (False, True):
                version += 1
                times[built].append(await first_launch(reactor, runner, built, version))
    finally:
        runner.stop()
    cores = os.cpu_count()
    for built, label in ((False, "not built"), (True, "built ahead")):
        runs = ", ".join(f"{t:.2f}" for t in times[built])
        print(f"first launch, {label}: median {statistics.median(times[built]):.2f} s ({runs}); {cores} cores")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, options.rounds)))
