"""
What ``management/list`` costs the reactor with one plugin whose
declaration has about 200,000 YAML nodes installed, on PostgreSQL, and what
it does to echo latency while it is called in a loop.

One daemon (``twistd``, on a fresh PostgreSQL database) uploads and
installs the plugin: the echo plugin whose echo tool declares an output
schema of ``--fields`` fields (33,000: ~199,000 YAML nodes, 2.2 MB of
declaration JSON).  A second daemon then starts on the same database and
storage, as after a restart, and is measured: the first list call (nothing
held yet), then ``--lists`` more, each as the wall time of the call and the
CPU time of the daemon's main (reactor) thread, read from
``/proc/<pid>/task/<pid>/stat`` (10 ms ticks, so averaged over the calls);
then echo latency alone, while another connection calls list back to
back, and while it calls list every ``--list-pause`` seconds (the same
list load for every version).  ``--daemon-source DIR`` runs both daemons from another source tree
(an older version, to compare).

Usage: ``python bench/declaration_cost.py [--fields 33000] [--lists 40]
[--calls 300] [--list-pause 0.1] [--daemon-source DIR] [--dsn DSN]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psycopg2  # noqa: E402
from psycopg2.extensions import parse_dsn  # noqa: E402

from bench.echo_overhead import daemon_latency  # noqa: E402
from bench.harness import TENANT, Daemon, HTTPConnection, percentile  # noqa: E402
from difydaemon.testing.packages import build_package  # noqa: E402
from difydaemon.testing.plugins import large_declaration_plugin_files  # noqa: E402

LIST_PATH = f"/plugin/{TENANT}/management/list?page=1&page_size=10"


def reactor_cpu(pid: int) -> float:
    """User + system CPU seconds of the process's main thread (the reactor's)."""
    with open(f"/proc/{pid}/task/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Database:
    """A PostgreSQL database made for the run and dropped after it."""

    def __init__(self, dsn: str) -> None:
        self.parameters = parse_dsn(dsn)
        self.name = "difydaemon_bench_" + secrets.token_hex(6)
        self._admin(f"CREATE DATABASE {self.name}")

    def _admin(self, statement: str) -> None:
        connection = psycopg2.connect(**dict(self.parameters, dbname="postgres"))
        connection.autocommit = True
        try:
            connection.cursor().execute(statement)
        finally:
            connection.close()

    def environ(self) -> dict:
        return {
            "DB_TYPE": "postgresql",
            "DB_HOST": self.parameters.get("host", "127.0.0.1"),
            "DB_PORT": self.parameters.get("port", "5432"),
            "DB_USERNAME": self.parameters.get("user", "postgres"),
            "DB_PASSWORD": self.parameters.get("password", ""),
            "DB_DATABASE": self.name,
        }

    def drop(self) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


async def timed_lists(daemon: Daemon, connection: HTTPConnection, count: int) -> tuple[list, float, int]:
    """(wall seconds of each call, reactor CPU seconds of all, bytes of the last answer)."""
    walls = []
    cpu = reactor_cpu(daemon.process.pid)
    size = 0
    for _ in range(count):
        start = time.perf_counter()
        status, reply = await connection.request("GET", LIST_PATH)
        walls.append(time.perf_counter() - start)
        assert status == 200 and reply.startswith(b'{"code":0'), reply[:300]
        size = len(reply)
    return walls, reactor_cpu(daemon.process.pid) - cpu, size


async def list_loop(port: int, stop: asyncio.Event, done: list, pause: float) -> None:
    """List back to back, or ``pause`` seconds apart, until ``stop`` is set."""
    connection = HTTPConnection(port)
    await connection.open()
    try:
        while not stop.is_set():
            status, reply = await connection.request("GET", LIST_PATH)
            assert status == 200, reply[:300]
            done.append(1)
            if pause:
                await asyncio.sleep(pause)
    finally:
        connection.close()


async def echo_during_lists(port: int, connection: HTTPConnection, calls: int, pause: float) -> tuple[list, int]:
    stop = asyncio.Event()
    done: list = []
    lists = asyncio.ensure_future(list_loop(port, stop, done, pause))
    await asyncio.sleep(0.2)
    try:
        return await daemon_latency(connection, calls), len(done)
    finally:
        stop.set()
        await lists


async def echo_ready(connection: HTTPConnection, timeout: float = 120.0) -> None:
    """Wait until the restored plugin answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await daemon_latency(connection, 1)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def latency_line(label: str, samples: list, extra: str = "") -> str:
    return (
        f"{label}: p50 {percentile(samples, 0.5) * 1e3:.2f} ms, p99 {percentile(samples, 0.99) * 1e3:.2f} ms, "
        f"max {max(samples) * 1e3:.1f} ms ({len(samples)} calls{extra})"
    )


async def main(args) -> None:
    source = os.path.abspath(args.daemon_source) if args.daemon_source else None
    package = build_package(large_declaration_plugin_files(args.fields))
    database = Database(args.dsn)
    installer = measured = None
    try:
        environ = database.environ()
        if source:
            environ["PYTHONPATH"] = source
        installer = Daemon(extra_env=environ)
        await installer.wait_ready()
        await installer.upload_install(package)
        # the second daemon reads the first one's stored packages, as a restart would
        environ["PLUGIN_STORAGE_LOCAL_ROOT"] = os.path.join(installer.dir, "storage")
        measured = Daemon(extra_env=environ)
        await measured.wait_ready()
        connection = HTTPConnection(measured.port)
        await connection.open()
        await echo_ready(connection)
        first, first_cpu, size = await timed_lists(measured, connection, 1)
        walls, cpu, _ = await timed_lists(measured, connection, args.lists)
        await daemon_latency(connection, 50)
        alone = await daemon_latency(connection, args.calls)
        during, lists = await echo_during_lists(measured.port, connection, args.calls, 0.0)
        # the same number of lists per second whatever a list costs
        paced, paced_lists = await echo_during_lists(measured.port, connection, args.calls, args.list_pause)
        connection.close()
        print(f"daemon source: {source or 'this tree'}; {os.cpu_count()} cores; PostgreSQL")
        print(f"plugin: {args.fields} output-schema fields, list answer {size / 1e6:.2f} MB")
        print(f"first list after start: {first[0] * 1e3:.1f} ms wall, {first_cpu * 1e3:.0f} ms reactor CPU")
        print(
            f"list, next {args.lists} calls: median {percentile(walls, 0.5) * 1e3:.1f} ms wall, "
            f"reactor CPU {cpu / args.lists * 1e3:.1f} ms per call"
        )
        print(latency_line("echo alone", alone))
        print(latency_line("echo while list is called in a loop", during, f", {lists} lists meanwhile"))
        print(latency_line(f"echo while list is called every {args.list_pause * 1e3:.0f} ms", paced,
                           f", {paced_lists} lists meanwhile"))
    finally:
        for daemon in (measured, installer):
            if daemon is not None:
                daemon.stop()
        database.drop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--fields", type=int, default=33_000, help="output-schema fields (6 YAML nodes each)")
    parser.add_argument("--lists", type=int, default=40, help="list calls timed after the first")
    parser.add_argument("--calls", type=int, default=300, help="echo calls per measure")
    parser.add_argument("--list-pause", type=float, default=0.1, help="seconds between lists in the paced loop")
    parser.add_argument("--daemon-source", help="run the daemons from this source tree (to compare versions)")
    parser.add_argument(
        "--dsn", default=os.environ.get("DIFYDAEMON_TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
    )
    asyncio.run(main(parser.parse_args()))
