"""
How PostgresPersistence behaves around a database outage, on a private
PostgreSQL cluster (never the machine's shared server): the time of a warm
call, of a call while the server is stopped (it must fail at once), of the
first call after the server is back (a new connection), and of a call while
the server is frozen with SIGSTOP (it must fail after the read time-out,
then after the connect time-out).

Usage: ``python bench/database_outage.py [--rounds 5] [--timeout 1]``
(as root, or as a user who may run ``initdb``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import Deferred  # noqa: E402

from difydaemon.errors import DatabaseUnavailableError  # noqa: E402
from difydaemon.persistence.postgres import PostgresPersistence  # noqa: E402
from difydaemon.testing.postgres import PrivatePostgres  # noqa: E402

TENANT = "0193a8a4-0000-7000-8000-0000000000b1"


async def timed(call) -> tuple:
    """(milliseconds, error message or None) of one call."""
    start = time.perf_counter()
    try:
        await call()
        error = None
    except DatabaseUnavailableError as e:
        error = e.message
    return (time.perf_counter() - start) * 1000, error


def report(name: str, samples: list) -> None:
    times = [ms for ms, _ in samples]
    errors = sorted({error or "ok" for _, error in samples})
    print(f"{name:<38} median {statistics.median(times):8.2f} ms  max {max(times):8.2f} ms  -> {'; '.join(errors)}")


async def main(reactor, rounds: int, timeout: float) -> None:
    cluster = PrivatePostgres(reactor)
    try:
        await cluster.start()
        persistence = PostgresPersistence(
            reactor, cluster.dsn("bench"), pool_size=4, connect_timeout=timeout, read_timeout=timeout,
            default_database="postgres",
        )
        await persistence.migrate()

        def call():
            return persistence.get_installation(TENANT, "acme/echo")

        warm, down, first_back, frozen_read, frozen_connect = [], [], [], [], []
        for _ in range(rounds):
            for _ in range(20):
                warm.append(await timed(call))
            await cluster.stop()
            down.append(await timed(call))
            await cluster.start()
            first_back.append(await timed(call))
            cluster.freeze()
            frozen_read.append(await timed(call))
            frozen_connect.append(await timed(call))
            cluster.thaw()
            await timed(call)
        report("warm call", warm)
        report("server stopped", down)
        report("first call after restart", first_back)
        report("server frozen, connection open", frozen_read)
        report("server frozen, new connection", frozen_connect)
        await persistence.close()
    finally:
        cluster.destroy()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=1.0, help="connect and read time-outs, seconds")
    arguments = parser.parse_args()
    task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, arguments.rounds, arguments.timeout)))
