"""
The daemon's own CPU per echo call: ``twistd difydaemon`` with the echo
plugin installed, driven over keep-alive HTTP; the twistd process's user +
system time (from /proc, the plugin's own process not included) over each
burst, divided by the calls.

Usage: ``python bench/echo_daemon_cpu.py [--rounds 3] [--inflight 50] [--burst 2000]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.echo_overhead import HEADERS, PATH, dispatch_body  # noqa: E402
from bench.harness import Daemon, HTTPConnection  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process (not its children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def burst(connections, total):
    body = dispatch_body()
    remaining = [total]

    async def worker(connection):
        while remaining[0] > 0:
            remaining[0] -= 1
            status, reply = await connection.request("POST", PATH, body, HEADERS)
            assert status == 200 and reply.count(b"data: ") == 2, reply

    await asyncio.gather(*(worker(c) for c in connections))


async def main(args):
    print(f"cores: {os.cpu_count()}")
    daemon = Daemon()
    try:
        await daemon.wait_ready()
        await daemon.upload_install(build_package(echo_plugin_files()))
        pool = []
        for _ in range(args.inflight):
            c = HTTPConnection(daemon.port)
            await c.open()
            pool.append(c)
        pid = daemon.process.pid
        await burst(pool, 500)
        many, one = [], []
        for _ in range(args.rounds):
            for connections, out in ((pool, many), (pool[:1], one)):
                calls = args.burst if connections is pool else args.burst // 4
                (user, system), wall = cpu_seconds(pid), time.perf_counter()
                await burst(connections, calls)
                rate = calls / (time.perf_counter() - wall)
                user_after, system_after = cpu_seconds(pid)
                user, system = (user_after - user) / calls * 1e6, (system_after - system) / calls * 1e6
                out.append((user + system, rate, system))
        for label, runs in ((f"{args.inflight} in flight", many), ("1 in flight", one)):
            print(f"echo, {label}: daemon CPU {median(c for c, _, _ in runs):.0f} us/call "
                  f"({', '.join(f'{c:.0f}' for c, _, _ in runs)}; of which system {median(s for _, _, s in runs):.0f}), "
                  f"{median(r for _, r, _ in runs):.0f} calls/s (medians of {args.rounds} rounds)")
        for c in pool:
            c.close()
    finally:
        daemon.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inflight", type=int, default=50)
    parser.add_argument("--burst", type=int, default=2000)
    asyncio.run(main(parser.parse_args()))
