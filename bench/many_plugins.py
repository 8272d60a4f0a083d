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

Targets (issue 14): idle total RSS <= 250 MB for 100 plugins; a cold
plugin's first call <= 1.5 s p50.

Usage: ``python bench/many_plugins.py [--plugins 100] [--cold-calls 20] [--idle-timeout 5]``
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
from bench.harness import TENANT, Daemon, http_call, percentile  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402
from difydaemon.testing.proc import command_line, descendants  # noqa: E402

PATH = f"/plugin/{TENANT}/dispatch/tool/invoke"


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


async def call(port: int, number: int) -> float:
    """One echo call to ``acme/echo<number>``; its latency in seconds."""
    body = json.dumps(
        {"user_id": "u1", "data": {"provider": "echo", "tool": "echo", "tool_parameters": {"text": "hi"}, "credentials": {}}}
    ).encode()
    started = time.perf_counter()
    status, reply = await http_call(
        "POST", port, PATH, body, {"Content-Type": "application/json", "X-Plugin-ID": f"acme/echo{number}"}
    )
    seconds = time.perf_counter() - started
    if status != 200 or b'"echo"' not in reply:
        raise RuntimeError(f"call to acme/echo{number} failed: {status} {reply[:300]!r}")
    return seconds


async def install_all(daemon: Daemon, count: int, parallel: int) -> None:
    """Install ``count`` echo plugins, ``parallel`` at a time."""
    numbers = iter(range(count))

    async def worker():
        for number in numbers:
            await daemon.upload_install(build_package(echo_plugin_files(name=f"echo{number}")))

    await asyncio.gather(*(worker() for _ in range(parallel)))


async def until(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.2)
    return False


async def run(args, idle_timeout: int | None, prepared: str) -> dict:
    """One daemon: install, settle, measure."""
    extra = {"PLUGIN_IDLE_TIMEOUT": str(idle_timeout)} if idle_timeout else {}
    daemon = Daemon(extra_env=extra, prepared_venvs=prepared)
    figures = {}
    try:
        await daemon.wait_ready()
        pid = daemon.process.pid
        started = time.perf_counter()
        await install_all(daemon, args.plugins, args.parallel)
        figures["install_s"] = time.perf_counter() - started
        if idle_timeout:
            if not await until(lambda: not plugin_processes(pid), args.plugins * 2 + idle_timeout + 60):
                raise RuntimeError(f"plugins still running: {len(plugin_processes(pid))}")
        else:
            await asyncio.sleep(3)  # let the last ones settle
        figures["plugin_processes"] = len(plugin_processes(pid))
        figures["daemon_rss"] = rss_mb(pid)
        figures["total_rss"] = total_rss_mb(pid)
        samples = []
        for number in range(min(args.cold_calls, args.plugins)):
            samples.append(await call(daemon.port, number))
        figures["first_call"] = samples
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
    asyncio.run(main(parser.parse_args()))
