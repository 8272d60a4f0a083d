"""
A large package upload: the daemon's peak resident memory, and how long
the reactor stalls meanwhile (``/health/check`` asked every few
milliseconds on another connection: its slowest answer while the upload is
read, parsed, decoded and stored).

The package is the echo plugin with ``--size`` MB of incompressible bytes,
stored as they are (``--deflated``: deflated, which adds the package
decoder's inflating to what is measured); ``MAX_PLUGIN_PACKAGE_SIZE`` is
raised to let it in.  Peak memory is the daemon's ``VmHWM`` (high-water mark
of its resident set) after the upload, against its ``VmRSS`` before.

Usage: ``python bench/upload_memory.py [--size 60] [--deflated] [--interval 0.005]``
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
import zipfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import TENANT, Daemon, HTTPConnection, percentile, upload_form  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402

MEGABYTE = 1024 * 1024


def memory_mb(pid: int, field: str) -> float:
    """``VmRSS`` or ``VmHWM`` of a live process, in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for {pid}")


def with_stored_entry(package: bytes, name: str, content: bytes) -> bytes:
    """``package`` with one more entry, stored uncompressed."""
    output = io.BytesIO(package)
    with zipfile.ZipFile(output, "a") as archive:
        info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_STORED
        archive.writestr(info, content)
    return output.getvalue()


async def ping(port: int, interval: float, latencies: list, stop: asyncio.Event) -> None:
    """``/health/check`` on one keep-alive connection until ``stop``; each answer's latency."""
    connection = HTTPConnection(port)
    await connection.open()
    try:
        while not stop.is_set():
            started = time.perf_counter()
            status, _ = await connection.request("GET", "/health/check")
            latencies.append(time.perf_counter() - started)
            assert status == 200, status
            await asyncio.sleep(interval)
    finally:
        connection.close()


async def main(args) -> None:
    files = dict(echo_plugin_files())
    blob = os.urandom(int(args.size * MEGABYTE))
    if args.deflated:
        files["data/blob.bin"] = blob
        package = build_package(files)
    else:
        package = with_stored_entry(build_package(files), "data/blob.bin", blob)
    del blob, files
    content_type, body = upload_form(package)
    daemon = Daemon(extra_env={"MAX_PLUGIN_PACKAGE_SIZE": str(int(args.size * MEGABYTE) + 10 * MEGABYTE)})
    try:
        await daemon.wait_ready()
        pid = daemon.process.pid
        # a few calls first, so that code loaded on first use is not counted
        for _ in range(20):
            connection = HTTPConnection(daemon.port)
            await connection.open()
            await connection.request("GET", f"/plugin/{TENANT}/management/list?page=1&page_size=1")
            connection.close()
        before = memory_mb(pid, "VmRSS")
        idle_latencies: list = []
        stop = asyncio.Event()
        pinger = asyncio.ensure_future(ping(daemon.port, args.interval, idle_latencies, stop))
        await asyncio.sleep(1.0)
        stop.set()
        await pinger
        latencies: list = []
        stop = asyncio.Event()
        pinger = asyncio.ensure_future(ping(daemon.port, args.interval, latencies, stop))
        started = time.perf_counter()
        uploader = HTTPConnection(daemon.port)
        await uploader.open()
        status, reply = await uploader.request(
            "POST", f"/plugin/{TENANT}/management/install/upload/package", body, {"Content-Type": content_type}
        )
        elapsed = time.perf_counter() - started
        uploader.close()
        stop.set()
        await pinger
        envelope = json.loads(reply)
        assert status == 200 and envelope["code"] == 0, reply[:300]
        print(f"package: {len(package) / MEGABYTE:.1f} MB (multipart body {len(body) / MEGABYTE:.1f} MB)")
        print(f"upload answered in {elapsed:.2f} s: {envelope['data']['unique_identifier'][:40]}...")
        print(f"daemon RSS before: {before:.0f} MB; peak (VmHWM): {memory_mb(pid, 'VmHWM'):.0f} MB; "
              f"after: {memory_mb(pid, 'VmRSS'):.0f} MB")
        print(f"/health/check while idle: p50 {percentile(idle_latencies, 0.5) * 1000:.1f} ms, "
              f"max {max(idle_latencies) * 1000:.1f} ms ({len(idle_latencies)} calls)")
        print(f"/health/check during the upload: p50 {percentile(latencies, 0.5) * 1000:.1f} ms, "
              f"max {max(latencies) * 1000:.1f} ms ({len(latencies)} calls)")
    finally:
        daemon.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=60.0, help="MB of incompressible data in the package")
    parser.add_argument("--deflated", action="store_true", help="deflate the data (the decoder then inflates it)")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between two health checks")
    asyncio.run(main(parser.parse_args()))
