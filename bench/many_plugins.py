"""
Many installed plugins on a small machine: idle stop against keeping them
all running.

Installs ``--plugins`` echo plugins (``acme/echo0`` ... each its own
identifier, all with the same dependencies) into a daemon twice:

- with ``PLUGIN_IDLE_TIMEOUT``: once every plugin has gone idle, the total
  resident memory of the daemon and all its descendants, then the latency
  of the first call to ``--cold-calls`` idle plugins, one after the other
  (each a cold start: launch, first heartbeat, the call);
- with the default (every plugin kept running): the same total memory, and
  the latency of a call to a running plugin.

Each cold call is interleaved with a cold start of the same plugin driven
directly over stdio, without the daemon (launch, first heartbeat, the echo
answer): the floor the daemon's figure is read against, in the same run.
The daemon logs in JSON meanwhile, and its cold calls are split into phases
from its own events: request in -> plugin spawned (the daemon's wake-up
path), spawned -> first heartbeat (the plugin's interpreter and SDK import),
first heartbeat -> answer (the request relayed and answered).

Targets (issue 14): idle total RSS <= 250 MB for 100 plugins; a cold
plugin's first call <= 1.5 s p50.

With ``--restart-window``, the idle-stop daemon is then restarted: the
first call to the last plugin installed, and the peak memory and plugin
processes over that window (a restore that launched every plugin would
hold them all at once, and make the call wait its turn).

Usage: ``python bench/many_plugins.py [--plugins 100] [--cold-calls 20] [--idle-timeout 5] [--parallel 4] [--restart-window 30]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.daemon_memory import rss_mb  # noqa: E402
from bench.echo_overhead import ECHO  # noqa: E402
from bench.harness import TENANT, Daemon, DirectPlugin, http_call, percentile  # noqa: E402
from difydaemon.runtimes.environment import working_dir_for  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402
from difydaemon.testing.proc import command_line, descendants  # noqa: E402

PATH = f"/plugin/{TENANT}/dispatch/tool/invoke"
SPAWNED = "plugin {plugin_id} instance {pid} spawned"
READY = "plugin {plugin_id} instance {pid} ready after {seconds:.2f} s"


def plugin_processes(daemon_pid: int) -> list[int]:
    """The daemon's descendants running a plugin (``-m main``)."""
    return [pid for pid in descendants(daemon_pid) if b"-m\0main" in command_line(pid)]


def total_rss_mb(daemon_pid: int) -> float:
    """The resident memory of the daemon and every process below it."""
    total = 0.0
    for pid in [daemon_pid, *descendants(daemon_pid)]:
        try:
            total += rss_mb(pid)
        except (OSError, RuntimeError):
            pass  # gone meanwhile
    return total


async def call(port: int, number: int) -> tuple[float, float]:
    """One echo call to ``acme/echo<number>``: when it began (wall clock, as the daemon's log) and its latency in seconds."""
    body = json.dumps(
        {"user_id": "u1", "data": {"provider": "echo", "tool": "echo", "tool_parameters": {"text": "hi"}, "credentials": {}}}
    ).encode()
    began = time.time()
    started = time.perf_counter()
    status, reply = await http_call(
        "POST", port, PATH, body, {"Content-Type": "application/json", "X-Plugin-ID": f"acme/echo{number}"}
    )
    seconds = time.perf_counter() - started
    if status != 200 or b'"echo"' not in reply:
        raise RuntimeError(f"call to acme/echo{number} failed: {status} {reply[:300]!r}")
    return began, seconds


async def direct_cold_start(working_dir: str) -> tuple[float, float]:
    """
    Launch the plugin in ``working_dir`` without the daemon, until its echo
    answer: seconds in all, and from its first heartbeat to the answer.
    """
    plugin = DirectPlugin(working_dir)
    started = time.perf_counter()
    await plugin.start()
    up = time.perf_counter()
    await plugin.invoke(ECHO)
    answered = time.perf_counter()
    await plugin.stop()
    return answered - started, answered - up


def daemon_events(log_path: str) -> list[dict]:
    """The daemon's JSON log events that mark a plugin instance spawned or ready."""
    events = []
    with open(log_path, "rb") as log:
        for line in log:
            if b"spawned" not in line and b"ready after" not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("log_format") in (SPAWNED, READY):
                events.append(event)
    return events


def cold_phases(events: list[dict], number: int, began: float, seconds: float) -> tuple[float, float, float] | None:
    """
    One cold call split by the daemon's events: (request in -> spawned,
    spawned -> first heartbeat, first heartbeat -> answer), or None when
    the log lacks them.
    """
    ended = began + seconds
    plugin_id = f"acme/echo{number}"

    def first(log_format):
        times = [
            e["log_time"] for e in events
            if e["log_format"] == log_format and e.get("plugin_id") == plugin_id and began <= e["log_time"] <= ended
        ]
        return min(times) if times else None

    spawned, ready = first(SPAWNED), first(READY)
    if spawned is None or ready is None:
        return None
    return spawned - began, ready - spawned, ended - ready


async def install_all(daemon: Daemon, count: int, parallel: int) -> dict[int, str]:
    """Install ``count`` echo plugins, ``parallel`` at a time; their identifiers by number."""
    numbers = iter(range(count))
    identifiers = {}

    async def worker():
        for number in numbers:
            identifiers[number] = await daemon.upload_install(build_package(echo_plugin_files(name=f"echo{number}")))

    await asyncio.gather(*(worker() for _ in range(parallel)))
    return identifiers


async def until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.2)
    return False


async def measure_restart(daemon: Daemon, number: int, window: float) -> tuple[float, float, int]:
    """
    Restart the daemon with every plugin installed and call ``acme/echo<number>``
    as soon as it is ready: that call's latency, and the peak total RSS and
    plugin process count sampled over ``window`` seconds from then.
    """
    daemon.restart()
    await daemon.wait_ready(60)
    pid = daemon.process.pid
    peak_rss, peak_processes, sampling = 0.0, 0, True

    async def sample():
        nonlocal peak_rss, peak_processes
        while sampling:
            peak_rss = max(peak_rss, total_rss_mb(pid))
            peak_processes = max(peak_processes, len(plugin_processes(pid)))
            await asyncio.sleep(0.25)

    sampler = asyncio.ensure_future(sample())
    started = time.monotonic()
    _, seconds = await call(daemon.port, number)
    await asyncio.sleep(max(0.0, window - (time.monotonic() - started)))
    sampling = False
    await sampler
    return seconds, peak_rss, peak_processes


async def run(args, idle_timeout: int | None, prepared: str) -> dict:
    """One daemon: install, settle, measure."""
    extra = {"LOG_OUTPUT_FORMAT": "json"}
    if idle_timeout:
        extra["PLUGIN_IDLE_TIMEOUT"] = str(idle_timeout)
    daemon = Daemon(extra_env=extra, prepared_venvs=prepared)
    figures = {}
    try:
        await daemon.wait_ready()
        pid = daemon.process.pid
        started = time.perf_counter()
        identifiers = await install_all(daemon, args.plugins, args.parallel)
        figures["install_s"] = time.perf_counter() - started
        if idle_timeout:
            if not await until(lambda: not plugin_processes(pid), args.plugins * 2 + idle_timeout + 60):
                raise RuntimeError(f"plugins still running: {len(plugin_processes(pid))}")
        else:
            await asyncio.sleep(3)  # let the last ones settle
        figures["plugin_processes"] = len(plugin_processes(pid))
        figures["daemon_rss"] = rss_mb(pid)
        figures["total_rss"] = total_rss_mb(pid)
        samples, began, direct = [], [], []
        for number in range(min(args.cold_calls, args.plugins)):
            working_dir = os.path.abspath(working_dir_for(daemon.working, identifiers[number]))
            # interleaved, each first every other time: the machine's swings fall on both
            if idle_timeout and args.direct and number % 2:
                direct.append(await direct_cold_start(working_dir))
            at, seconds = await call(daemon.port, number)
            began.append(at)
            samples.append(seconds)
            if idle_timeout and args.direct and not number % 2:
                direct.append(await direct_cold_start(working_dir))
        figures["first_call"] = samples
        figures["direct"] = direct
        if idle_timeout:
            events = daemon_events(daemon.log.name)
            phases = [cold_phases(events, n, at, seconds) for n, (at, seconds) in enumerate(zip(began, samples))]
            figures["phases"] = [p for p in phases if p is not None]
            if args.restart_window:
                # the last one installed: the last a restore launching every plugin would reach
                figures["restart"] = await measure_restart(daemon, args.plugins - 1, args.restart_window)
    finally:
        daemon.stop()
    return figures


def report(name: str, figures: dict, plugins: int) -> None:
    calls = figures["first_call"]
    print(
        f"{name}: {plugins} plugins installed in {figures['install_s']:.0f} s; "
        f"{figures['plugin_processes']} plugin processes; daemon RSS {figures['daemon_rss']:.1f} MB; "
        f"daemon + plugins RSS {figures['total_rss']:.1f} MB"
    )
    print(
        f"  first call to {len(calls)} plugins, one after the other: p50 {percentile(calls, 0.5) * 1000:.0f} ms, "
        f"p90 {percentile(calls, 0.9) * 1000:.0f} ms, max {max(calls) * 1000:.0f} ms"
    )
    direct_runs = figures.get("direct")
    if direct_runs:
        direct = [total for total, _ in direct_runs]
        differences = [a - b for a, b in zip(calls, direct)]
        print(
            f"  the same plugins started directly, interleaved (launch -> first heartbeat -> answer): "
            f"p50 {percentile(direct, 0.5) * 1000:.0f} ms, p90 {percentile(direct, 0.9) * 1000:.0f} ms; "
            f"daemon minus direct, per pair: median {percentile(differences, 0.5) * 1000:.0f} ms; "
            f"direct first heartbeat -> answer: median {percentile([tail for _, tail in direct_runs], 0.5) * 1000:.1f} ms"
        )
    phases = figures.get("phases")
    if phases:
        medians = [percentile([p[i] for p in phases], 0.5) * 1000 for i in range(3)]
        print(
            f"  cold call phases from the daemon's log, medians of {len(phases)}: request in -> spawned "
            f"{medians[0]:.1f} ms; spawned -> first heartbeat {medians[1]:.0f} ms; first heartbeat -> answer {medians[2]:.1f} ms"
        )
    restart = figures.get("restart")
    if restart:
        seconds, peak_rss, peak_processes = restart
        print(
            f"  after a restart: first call to the last plugin installed {seconds * 1000:.0f} ms; "
            f"peak daemon + plugins RSS {peak_rss:.1f} MB, peak plugin processes {peak_processes}"
        )


async def main(args):
    print(f"cores: {os.cpu_count()}; plugins: {args.plugins}")
    prepared = tempfile.mkdtemp(prefix="difydaemon-bench-prepared-")
    try:
        idle = await run(args, args.idle_timeout, prepared)
        report(f"PLUGIN_IDLE_TIMEOUT={args.idle_timeout}", idle, args.plugins)
        if not args.skip_running:
            running = await run(args, None, prepared)
            report("all kept running", running, args.plugins)
    finally:
        shutil.rmtree(prepared, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--plugins", type=int, default=100)
    parser.add_argument("--cold-calls", type=int, default=20)
    parser.add_argument("--idle-timeout", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=4, help="installs at once")
    parser.add_argument("--skip-running", action="store_true", help="measure only the idle-stop daemon")
    parser.add_argument(
        "--restart-window", type=float, default=0,
        help="then restart the idle-stop daemon, call its last plugin and watch memory for this many seconds (0: no restart)",
    )
    parser.add_argument(
        "--no-direct", dest="direct", action="store_false",
        help="do not interleave direct cold starts of the same plugins with the daemon's cold calls",
    )
    asyncio.run(main(parser.parse_args()))
