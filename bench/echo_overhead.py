"""
Echo tool through the daemon's HTTP API against the same plugin driven
directly over stdio, interleaved (A B A B ...), in one run:

- upload -> install task success -> first answer (the daemon path only),
  with fresh daemon caches (only uv's is warm), with a dependency set never
  installed before on caches filled by another plugin (``--new-requirement``
  names what it adds to the echo plugin's), and with a prepared venv (each
  daemon is stopped only once its install's background compilation is
  over and kept, as a daemon that keeps running would keep it);
- echo round trip, one in flight: p50 / p99 of each path;
- echo, N in flight: calls/s of each path.

Usage: ``python bench/echo_overhead.py [--rounds 3] [--calls 300] [--inflight 50] [--burst 2000]
[--upload-repeats 1] [--upload-only] [--new-requirement LINE]``
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
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import TENANT, Daemon, DirectPlugin, HTTPConnection, percentile  # noqa: E402
from difydaemon.runtimes.environment import working_dir_for  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402

ECHO = {
    "user_id": "u1",
    "type": "tool",
    "action": "invoke_tool",
    "provider": "echo",
    "tool": "echo",
    "tool_parameters": {"text": "hi"},
    "credentials": {},
}


def dispatch_body() -> bytes:
    return json.dumps(
        {"user_id": "u1", "data": {"provider": "echo", "tool": "echo", "tool_parameters": {"text": "hi"}, "credentials": {}}}
    ).encode()


HEADERS = {"Content-Type": "application/json", "X-Plugin-ID": "acme/echo"}
PATH = f"/plugin/{TENANT}/dispatch/tool/invoke"


async def daemon_latency(connection, calls):
    body = dispatch_body()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        status, reply = await connection.request("POST", PATH, body, HEADERS)
        samples.append(time.perf_counter() - start)
        assert status == 200 and reply.count(b"data: ") == 2, reply
    return samples


async def direct_latency(plugin, calls):
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        chunks = await plugin.invoke(ECHO)
        samples.append(time.perf_counter() - start)
        assert chunks == 2
    return samples


async def daemon_throughput(connections, total):
    body = dispatch_body()
    remaining = [total]

    async def worker(connection):
        while remaining[0] > 0:
            remaining[0] -= 1
            status, reply = await connection.request("POST", PATH, body, HEADERS)
            assert status == 200 and reply.count(b"data: ") == 2, reply

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    return total / (time.perf_counter() - start)


async def direct_throughput(plugin, total, inflight):
    remaining = [total]

    async def worker():
        while remaining[0] > 0:
            remaining[0] -= 1
            assert await plugin.invoke(ECHO) == 2

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return total / (time.perf_counter() - start)


async def first_answer(prepared, extra_requirements=(), keep=True):
    """Upload -> installed -> first answer on a fresh daemon; with ``keep``, stopped once its fresh build is kept."""
    daemon = Daemon(prepared_venvs=prepared)
    try:
        await daemon.wait_ready()
        package = build_package(echo_plugin_files(extra_requirements=extra_requirements))
        start = time.perf_counter()
        await daemon.upload_install(package)
        connection = HTTPConnection(daemon.port)
        await connection.open()
        status, reply = await connection.request("POST", PATH, dispatch_body(), HEADERS)
        elapsed = time.perf_counter() - start
        connection.close()
        assert status == 200 and b'"hi"' in reply, reply
        if keep and not await daemon.wait_kept():
            print("  (the install was not kept for later builds: the next runs build afresh)")
        return elapsed
    finally:
        daemon.stop()


async def main(args):
    print(f"cores: {os.cpu_count()}")
    cold, new_set, warm = [], [], []
    for repeat in range(args.upload_repeats):
        # Fresh daemon caches each time; only uv's cache stays warm.
        prepared = tempfile.mkdtemp(prefix="difydaemon-bench-prepared-")
        cold.append(await first_answer(prepared))
        # A requirements file never seen before (the nonce makes sure of it),
        # on caches the first plugin filled.
        new_set.append(await first_answer(prepared, (args.new_requirement, f"# bench nonce {os.getpid()}.{repeat}")))
        # a copy of the prepared venv compiles nothing in the background: nothing to wait for
        warm.append(await first_answer(prepared, keep=False))
        if repeat < args.upload_repeats - 1:
            shutil.rmtree(prepared, ignore_errors=True)
    repeats = f"median of {args.upload_repeats}" if args.upload_repeats > 1 else "one run"
    print(
        f"upload -> installed -> first answer ({repeats}, warm uv cache): "
        f"{median(cold):.2f} s with nothing cached by the daemon, "
        f"{median(new_set):.2f} s for a new dependency set (+{args.new_requirement or 'nothing'}), "
        f"{median(warm):.2f} s with a prepared venv"
    )
    if args.upload_repeats > 1:
        print("  runs: " + "; ".join(f"{a:.2f} / {b:.2f} / {c:.2f}" for a, b, c in zip(cold, new_set, warm)))
    if args.upload_only:
        return

    daemon = Daemon(prepared_venvs=prepared)
    plugin = None
    try:
        await daemon.wait_ready()
        identifier = await daemon.upload_install(build_package(echo_plugin_files()))
        plugin = DirectPlugin(os.path.abspath(working_dir_for(daemon.working, identifier)))
        await plugin.start()
        connection = HTTPConnection(daemon.port)
        await connection.open()
        pool = []
        for _ in range(args.inflight):
            c = HTTPConnection(daemon.port)
            await c.open()
            pool.append(c)
        await daemon_latency(connection, 50)
        await direct_latency(plugin, 50)
        lat_daemon, lat_direct, tp_daemon, tp_direct = [], [], [], []
        for _ in range(args.rounds):
            lat_direct += await direct_latency(plugin, args.calls)
            lat_daemon += await daemon_latency(connection, args.calls)
            tp_direct.append(await direct_throughput(plugin, args.burst, args.inflight))
            tp_daemon.append(await daemon_throughput(pool, args.burst))
        p50_direct, p50_daemon = percentile(lat_direct, 0.5) * 1e3, percentile(lat_daemon, 0.5) * 1e3
        print(
            f"echo, 1 in flight: direct p50 {p50_direct:.2f} ms p99 {percentile(lat_direct, 0.99) * 1e3:.2f} ms; "
            f"daemon p50 {p50_daemon:.2f} ms p99 {percentile(lat_daemon, 0.99) * 1e3:.2f} ms; "
            f"added p50 {p50_daemon - p50_direct:.2f} ms ({len(lat_direct)} calls each, {args.rounds} interleaved rounds)"
        )
        med_direct = sorted(tp_direct)[len(tp_direct) // 2]
        med_daemon = sorted(tp_daemon)[len(tp_daemon) // 2]
        print(
            f"echo, {args.inflight} in flight: direct {med_direct:.0f} calls/s, daemon {med_daemon:.0f} calls/s, "
            f"ratio {med_daemon / med_direct:.2f} (medians of {args.rounds} interleaved rounds of {args.burst} calls)"
        )
        for c in pool + [connection]:
            c.close()
    finally:
        if plugin is not None:
            await plugin.stop()
        daemon.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--inflight", type=int, default=50)
    parser.add_argument("--burst", type=int, default=2000)
    parser.add_argument("--upload-repeats", type=int, default=1, help="upload measurements to take the median of")
    parser.add_argument("--upload-only", action="store_true", help="measure only upload -> first answer")
    parser.add_argument(
        "--new-requirement",
        default="",
        help="a requirements.txt line the 'new dependency set' plugin adds to the echo plugin's (e.g. a package not in the SDK's set)",
    )
    asyncio.run(main(parser.parse_args()))
