"""
What the parent-death launcher adds to starting a child
(:mod:`difydaemon.runtimes.parent_death`).

Two workloads, each run directly and through the launcher, interleaved
(direct, launched, direct, ...), on the real reactor:

- ``plugin start``: the real SDK echo plugin (its venv built once) started
  by a :class:`~difydaemon.runtimes.local.LocalRuntime`, from ``start()``
  to its first heartbeat; besides the wall time, the CPU time its process
  used by then (launcher included: the pid is the same across ``exec``),
  which a busy machine does not blur;
- ``/bin/true``: from spawn to exit: the launcher's own cost, with nothing
  behind it.

One line per workload and variant: medians and p90 in milliseconds, and
the difference of the medians.

Usage::

    .venv/bin/python bench/parent_death_launch.py [--starts 20] [--trues 100]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import react

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import cpu_seconds, percentile  # noqa: E402
from difydaemon.runtimes.child_environment import plugin_environment  # noqa: E402
from difydaemon.runtimes.local import LocalRuntime  # noqa: E402
from difydaemon.runtimes.parent_death import ParentDeathSignal, child_argv  # noqa: E402
from difydaemon.testing import sdk  # noqa: E402
from difydaemon.testing.packages import echo_plugin_files, write_files  # noqa: E402


class _Ended(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred = Deferred()

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


async def _true_seconds(reactor, parent_death) -> float:
    protocol = _Ended()
    started = reactor.seconds()
    argv = child_argv(parent_death, ["/bin/true"])
    reactor.spawnProcess(protocol, argv[0], argv, env={"PATH": os.defpath})
    await protocol.ended
    return reactor.seconds() - started


async def _plugin_start(reactor, python: str, working_dir: str, parent_death) -> tuple[float, float]:
    """Wall and CPU seconds from ``start()`` to the first heartbeat of one plugin process."""
    runtime = LocalRuntime(
        reactor, "acme/echo:0.0.1@" + "0" * 64, "acme/echo", working_dir, python,
        env=plugin_environment(os.environ), stop_grace_period=1.0, parent_death=parent_death,
    )
    started = reactor.seconds()
    await runtime.start()
    wall = reactor.seconds() - started
    [instance] = runtime.instances
    cpu = sum(cpu_seconds(instance.pid))
    await runtime.stop()
    return wall, cpu


def _line(workload: str, variant: str, what: str, seconds: list[float]) -> str:
    milliseconds = [s * 1000 for s in seconds]
    return (
        f"{workload:13} {variant:9} {what:5} n={len(milliseconds):4}  median {statistics.median(milliseconds):7.1f} ms"
        f"  p90 {percentile(milliseconds, 0.9):7.1f} ms"
    )


async def _main(reactor, starts: int, trues: int) -> None:
    launcher = ParentDeathSignal(sys.executable)
    working_dir = write_files(tempfile.mkdtemp(prefix="parent-death-bench-"), echo_plugin_files())
    try:
        python = await sdk.environment_builder(reactor).build(working_dir, "3.12", lambda message: None)
        await _plugin_start(reactor, python, working_dir, None)  # warm the page cache
        results: dict[tuple[str, str, str], list[float]] = {}
        for _ in range(starts):
            for variant, parent_death in (("direct", None), ("launched", launcher)):
                wall, cpu = await _plugin_start(reactor, python, working_dir, parent_death)
                results.setdefault(("plugin start", variant, "wall"), []).append(wall)
                results.setdefault(("plugin start", variant, "cpu"), []).append(cpu)
        for _ in range(trues):
            for variant, parent_death in (("direct", None), ("launched", launcher)):
                wall = await _true_seconds(reactor, parent_death)
                results.setdefault(("/bin/true", variant, "wall"), []).append(wall)
    finally:
        shutil.rmtree(working_dir, ignore_errors=True)
    print(f"launcher interpreter: {sys.executable} (cores: {os.cpu_count()}, load {os.getloadavg()[0]:.2f})")
    for workload, what in (("plugin start", "wall"), ("plugin start", "cpu"), ("/bin/true", "wall")):
        for variant in ("direct", "launched"):
            print(_line(workload, variant, what, results[workload, variant, what]))
        added = statistics.median(results[workload, "launched", what]) - statistics.median(results[workload, "direct", what])
        print(f"{workload:13} {what:5} added by the launcher: {added * 1000:.1f} ms (difference of medians)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=20, help="plugin starts per variant")
    parser.add_argument("--trues", type=int, default=100, help="/bin/true runs per variant")
    arguments = parser.parse_args()
    react(lambda reactor: _main(reactor, arguments.starts, arguments.trues))


if __name__ == "__main__":
    main()
