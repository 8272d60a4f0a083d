"""
The daemon's resident memory: idle, after the echo plugin is installed and
warmed up, and after many echo invocations through the HTTP API (N in
flight over keep-alive connections that also carry a management call every
so often, as connections of Dify's one pooled client do).

``performance.md`` asks for at most 60 MB idle and no growth beyond 10 %
after 100k invocations; growth is measured from the warmed-up figure, since
the first calls load code and fill caches once.

Usage: ``python bench/daemon_memory.py [--invocations 100000] [--inflight 50] [--management-every 100]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.echo_overhead import HEADERS, PATH, dispatch_body  # noqa: E402
from bench.harness import TENANT, Daemon, HTTPConnection  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402

MANAGEMENT = f"/plugin/{TENANT}/management/list?page=1&page_size=10"


def rss_mb(pid: int) -> float:
    """A live process's resident set, in MB (``VmRSS`` of ``/proc/<pid>/status``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def decoder_children(pid: int) -> list:
    """The resident sets (MB) of the daemon's package decoder children (``difydaemon.packaging.child``)."""
    sizes = []
    children = []
    # a child's parent is the thread that started it (a pool thread, here)
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(child) for child in f.read().split()]
        except OSError:
            pass  # the thread ended meanwhile
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"difydaemon.packaging.child" in f.read():
                    sizes.append(rss_mb(child))
        except (OSError, RuntimeError):
            pass  # exited meanwhile
    return sizes


async def invocations(connections, total, management_every):
    """``total`` echo calls spread over ``connections``; a management call every ``management_every``."""
    body = dispatch_body()
    counts = {"left": total, "done": 0}

    async def worker(connection):
        while counts["left"] > 0:
            counts["left"] -= 1
            counts["done"] += 1
            if management_every and counts["done"] % management_every == 0:
                status, _ = await connection.request("GET", MANAGEMENT)
                assert status == 200, status
            status, reply = await connection.request("POST", PATH, body, HEADERS)
            assert status == 200 and reply.count(b"data: ") == 2, reply

    await asyncio.gather(*(worker(c) for c in connections))


async def main(args):
    print(f"cores: {os.cpu_count()}")
    daemon = Daemon()
    connections = []
    try:
        await daemon.wait_ready()
        await asyncio.sleep(1.0)
        pid = daemon.process.pid
        idle = rss_mb(pid)
        await daemon.upload_install(build_package(echo_plugin_files()))
        # the upload's decoder child is gone; the spare it left waits for
        # the next package (none runs before the first upload)
        decoders = decoder_children(pid)
        for _ in range(args.inflight):
            connection = HTTPConnection(daemon.port)
            await connection.open()
            connections.append(connection)
        await invocations(connections, args.warm_up, args.management_every)
        warm = rss_mb(pid)
        samples = []
        started = time.perf_counter()
        done = 0
        step = max(args.invocations // 10, 1)
        while done < args.invocations:
            batch = min(step, args.invocations - done)
            await invocations(connections, batch, args.management_every)
            done += batch
            samples.append(rss_mb(pid))
        seconds = time.perf_counter() - started
        final = samples[-1]
        print(f"daemon RSS: idle {idle:.1f} MB; after install and {args.warm_up} calls {warm:.1f} MB; "
              f"after {args.invocations} more ({args.inflight} in flight, a management call every "
              f"{args.management_every}, {args.invocations / seconds:.0f} calls/s) {final:.1f} MB, "
              f"growth {100 * (final - warm) / warm:+.1f} %")
        print("  package decoder children after the install (a spare waiting for the next upload): "
              + (", ".join(f"{rss:.1f} MB" for rss in decoders) or "none"))
        print("  RSS every tenth of the run (MB): " + ", ".join(f"{s:.1f}" for s in samples))
    finally:
        for connection in connections:
            connection.close()
        daemon.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--invocations", type=int, default=100_000)
    parser.add_argument("--warm-up", type=int, default=2000)
    parser.add_argument("--inflight", type=int, default=50)
    parser.add_argument("--management-every", type=int, default=100,
                        help="a management call before every Nth echo call (0: none)")
    asyncio.run(main(parser.parse_args()))
