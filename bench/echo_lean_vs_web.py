"""
The echo tool four ways in one run, interleaved (A B C D A B C D ...): the
plugin driven directly over stdio; the daemon as tap.py builds it (dispatch
served by the lean channel); the same daemon over connections that each
served a management call first, as connections of Dify's one pooled client
do ("mixed"); and a second daemon serving every request through
twisted.web (``DaemonSite`` without its dispatch gate, patched in that
daemon's process only by a ``sitecustomize`` on its PYTHONPATH).

Prints, per path: p50 / p99 of one call in flight, calls/s with N in
flight, each daemon's ratio to the direct path, and each daemon's own CPU
per call during its N-in-flight bursts (its twistd process, from /proc).

Usage: ``python bench/echo_lean_vs_web.py [--rounds 3] [--calls 300] [--inflight 50] [--burst 2000]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.echo_overhead import (  # noqa: E402
    daemon_latency,
    daemon_throughput,
    direct_latency,
    direct_throughput,
)
from bench.harness import REPO, TENANT, Daemon, DirectPlugin, HTTPConnection, cpu_seconds, percentile  # noqa: E402
from difydaemon.runtimes.environment import working_dir_for  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402

WEB_ONLY = """\
from difydaemon.api.site import DaemonSite
DaemonSite.buildProtocol = DaemonSite.build_web_protocol
"""


async def start(daemons, extra_env=None):
    daemon = Daemon(extra_env=extra_env)
    daemons.append(daemon)
    await daemon.wait_ready()
    identifier = await daemon.upload_install(build_package(echo_plugin_files()))
    return daemon, identifier


async def pool(daemon, size, management_first=False):
    connections = []
    for _ in range(size):
        connection = HTTPConnection(daemon.port)
        await connection.open()
        if management_first:
            status, _ = await connection.request("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=10")
            assert status == 200, status
        connections.append(connection)
    return connections


async def main(args):
    print(f"cores: {os.cpu_count()}")
    patch_dir = tempfile.mkdtemp(prefix="difydaemon-bench-web-only-")
    with open(os.path.join(patch_dir, "sitecustomize.py"), "w") as f:
        f.write(WEB_ONLY)
    daemons, plugin = [], None
    try:
        lean, identifier = await start(daemons)
        web, _ = await start(daemons, {"PYTHONPATH": patch_dir + os.pathsep + REPO})
        plugin = DirectPlugin(os.path.abspath(working_dir_for(lean.working, identifier)))
        await plugin.start()
        pools = {
            "lean": await pool(lean, args.inflight),
            "mixed": await pool(lean, args.inflight, management_first=True),
            "web": await pool(web, args.inflight),
        }
        for name in pools:
            await daemon_latency(pools[name][0], 50)
        await direct_latency(plugin, 50)
        latency = {"direct": [], "lean": [], "mixed": [], "web": []}
        rate = {"direct": [], "lean": [], "mixed": [], "web": []}
        cpu = {"lean": [], "mixed": [], "web": []}
        processes = {"lean": lean.process.pid, "mixed": lean.process.pid, "web": web.process.pid}

        async def timed_burst(name):
            before = sum(cpu_seconds(processes[name]))
            rate[name].append(await daemon_throughput(pools[name], args.burst))
            cpu[name].append((sum(cpu_seconds(processes[name])) - before) / args.burst * 1e6)

        for _ in range(args.rounds):
            latency["direct"] += await direct_latency(plugin, args.calls)
            latency["lean"] += await daemon_latency(pools["lean"][0], args.calls)
            latency["mixed"] += await daemon_latency(pools["mixed"][0], args.calls)
            latency["web"] += await daemon_latency(pools["web"][0], args.calls)
            rate["direct"].append(await direct_throughput(plugin, args.burst, args.inflight))
            await timed_burst("lean")
            await timed_burst("mixed")
            await timed_burst("web")
        p50 = {name: percentile(samples, 0.5) * 1e3 for name, samples in latency.items()}
        p99 = {name: percentile(samples, 0.99) * 1e3 for name, samples in latency.items()}
        rates = {name: median(values) for name, values in rate.items()}
        for name in ("direct", "lean", "mixed", "web"):
            line = (f"{name:6s}: 1 in flight p50 {p50[name]:.2f} ms p99 {p99[name]:.2f} ms; "
                    f"{args.inflight} in flight {rates[name]:.0f} calls/s")
            if name != "direct":
                line += (f"; added p50 {p50[name] - p50['direct']:.2f} ms, "
                         f"throughput ratio {rates[name] / rates['direct']:.2f}, "
                         f"daemon CPU {median(cpu[name]):.0f} us/call")
            print(line)
        print(f"({len(latency['direct'])} calls each and {args.rounds} interleaved rounds of {args.burst} calls; "
              f"throughputs are medians; per-round ratios "
              + "; ".join(f"{name} " + ", ".join(f"{a / d:.2f}" for a, d in zip(rate[name], rate["direct"]))
                          for name in ("lean", "mixed", "web"))
              + ")")
        for connections in pools.values():
            for connection in connections:
                connection.close()
    finally:
        if plugin is not None:
            await plugin.stop()
        for daemon in daemons:
            daemon.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--inflight", type=int, default=50)
    parser.add_argument("--burst", type=int, default=2000)
    asyncio.run(main(parser.parse_args()))
