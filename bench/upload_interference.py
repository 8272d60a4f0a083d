"""
Echo latency through the daemon alone and while heavy packages are being
uploaded, interleaved (alone, during, alone, during ...), in one run.

The daemon runs as in production (``twistd``, embedded SQLite, filesystem
storage) with the echo plugin installed.  One keep-alive connection calls
the echo tool one call at a time; during an upload workload another
connection uploads a heavy package back to back until those calls are done.
The heavy package is shaped like the heaviest official one
(triggers/telegram_trigger: seven ~200 kB event YAML files with deep output
schemas); it is uploaded as it is (the YAML weighs) and with ``--blob-mb``
of incompressible data added (the multipart body and the zip weigh too).
``--package`` uploads a given ``.difypkg`` instead.  ``--variants``
different packages (a nonce in the README) are uploaded in turn, so the
first upload of each also stores it.

Prints the heavy package, then one line per workload with the core count.

Usage: ``python bench/upload_interference.py [--rounds 3] [--calls 300] [--blob-mb 40]
[--variants 2] [--package PATH] [--daemon-source DIR]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.echo_overhead import daemon_latency  # noqa: E402
from bench.harness import TENANT, Daemon, HTTPConnection, percentile, upload_form  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files, heavy_trigger_plugin_files  # noqa: E402

UPLOAD_PATH = f"/plugin/{TENANT}/management/install/upload/package"


def heavy_workloads(args) -> list[tuple[str, list[bytes]]]:
    """(description, packages) of each upload workload."""
    if args.package:
        with open(args.package, "rb") as handle:
            data = handle.read()
        return [(f"{os.path.basename(args.package)} (zip {len(data) / 1e6:.1f} MB)", [data])]
    workloads = []
    for blob_mb in (0, args.blob_mb):
        packages = [
            build_package(heavy_trigger_plugin_files(blob_bytes=blob_mb * 1024 * 1024, nonce=f"variant {index}"))
            for index in range(args.variants)
        ]
        extra = f" + {blob_mb} MiB incompressible" if blob_mb else ""
        workloads.append((f"the YAML-heavy package{extra} (zip {len(packages[0]) / 1e6:.1f} MB)", packages))
    return workloads


async def upload_loop(port: int, bodies, stop: asyncio.Event, durations: list) -> None:
    """Upload the packages in turn until ``stop`` is set (the upload under way finishes)."""
    connection = HTTPConnection(port)
    await connection.open()
    try:
        index = 0
        while not stop.is_set():
            content_type, body = bodies[index % len(bodies)]
            headers = {"Content-Type": content_type}
            index += 1
            start = time.perf_counter()
            status, reply = await connection.request("POST", UPLOAD_PATH, body, headers)
            durations.append(time.perf_counter() - start)
            assert status == 200 and b'"code":0' in reply, reply[:300]
    finally:
        connection.close()


async def echo_during_uploads(port: int, connection, bodies, calls: int, durations: list) -> list:
    stop = asyncio.Event()
    uploads = asyncio.ensure_future(upload_loop(port, bodies, stop, durations))
    # Let the first upload start before measuring.
    await asyncio.sleep(0.2)
    try:
        return await daemon_latency(connection, calls)
    finally:
        stop.set()
        await uploads


def line(label: str, samples: list, extra: str) -> str:
    return (
        f"{label} ({os.cpu_count()} cores): p50 {percentile(samples, 0.5) * 1e3:.2f} ms, "
        f"p99 {percentile(samples, 0.99) * 1e3:.2f} ms, max {max(samples) * 1e3:.1f} ms ({extra})"
    )


async def main(args) -> None:
    workloads = heavy_workloads(args)
    if not args.package:
        event_kb = len(heavy_trigger_plugin_files(events=1)["events/event_0.yaml"]) / 1000
        print(f"YAML-heavy package: synthetic, shaped like telegram_trigger: 7 event files x {event_kb:.0f} kB "
              f"of YAML with deep output schemas; {args.variants} variants of each package uploaded in turn")
    uploads = [(label, [upload_form(package) for package in packages]) for label, packages in workloads]
    daemon = Daemon(extra_env={"PYTHONPATH": os.path.abspath(args.daemon_source)} if args.daemon_source else None)
    try:
        await daemon.wait_ready()
        await daemon.upload_install(build_package(echo_plugin_files()))
        connection = HTTPConnection(daemon.port)
        await connection.open()
        await daemon_latency(connection, 50)
        alone: list = []
        during: dict = {label: ([], []) for label, _ in uploads}
        for _ in range(args.rounds):
            alone += await daemon_latency(connection, args.calls)
            for label, bodies in uploads:
                samples, durations = during[label]
                samples += await echo_during_uploads(daemon.port, connection, bodies, args.calls, durations)
        connection.close()
        rounds = f"{len(alone)} calls, {args.rounds} interleaved rounds"
        print(line("echo alone", alone, rounds))
        for label, (samples, durations) in during.items():
            print(line(f"echo during uploads of {label}", samples,
                       f"{rounds}; {len(durations)} uploads, median {median(durations):.2f} s, "
                       f"max {max(durations):.2f} s each"))
    finally:
        daemon.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=300, help="echo calls per workload and round")
    parser.add_argument("--blob-mb", type=int, default=40, help="incompressible MiB added to the heavy package")
    parser.add_argument("--variants", type=int, default=2, help="different heavy packages uploaded in turn")
    parser.add_argument("--package", help="upload this .difypkg instead of the synthetic one")
    parser.add_argument("--daemon-source", help="run the daemon from this source tree (to compare versions)")
    asyncio.run(main(parser.parse_args()))
