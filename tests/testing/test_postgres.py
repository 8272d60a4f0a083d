"""Tests for difydaemon.testing.postgres: the private PostgreSQL cluster of outage tests."""

from __future__ import annotations

import os

import psycopg2
from twisted.internet import reactor, task
from txpostgres import txpostgres

from difydaemon.testing.cases import AsyncTestCase
from difydaemon.testing.postgres import PrivatePostgres, private_postgres_for


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def _live_states(pids: list) -> set:
    """The states of those of ``pids`` still running: a backend that was exiting (the test's own
    connection just closed) becomes a zombie or goes, and cannot be stopped."""
    return {_state(pid) for pid in pids} - {"Z", "X", "gone"}


class PrivatePostgresTests(AsyncTestCase):
    """A cluster of the test's own: start, freeze, stop, destroy."""

    timeout = 120

    async def _select_one(self, cluster) -> list:
        connection = txpostgres.Connection(reactor=reactor)
        await connection.connect(cluster.dsn())
        try:
            return await connection.runQuery("SELECT 1")
        finally:
            connection.close()

    async def test_lifecycle(self):
        """It serves once started, its processes stop and resume, it refuses once stopped, and destroy removes it."""
        cluster = PrivatePostgres(reactor)
        self.addCleanup(cluster.destroy)
        await cluster.start()
        self.assertNotEqual(cluster.port, 5432)
        self.assertEqual(await self._select_one(cluster), [(1,)])
        cluster.freeze()
        pids = cluster._pids()
        self.assertGreater(len(pids), 1)
        # SIGSTOP takes effect asynchronously: wait (bounded) until it has
        for _ in range(100):
            if _live_states(pids) == {"T"}:
                break
            await task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(_live_states(pids), {"T"})
        self.assertEqual(_state(pids[0]), "T")  # the postmaster itself
        cluster.thaw()
        self.assertEqual(await self._select_one(cluster), [(1,)])
        await cluster.stop()
        with self.assertRaises(psycopg2.OperationalError):
            await self._select_one(cluster)
        await cluster.start()
        self.assertEqual(await self._select_one(cluster), [(1,)])
        cluster.destroy()
        self.assertFalse(os.path.exists(cluster.directory))
        self.assertEqual(cluster._pids(), [])


class SharedClusterTests(AsyncTestCase):
    """private_postgres_for shares one cluster per test class."""

    timeout = 120

    async def test_shared_then_destroyed_after_the_last_test(self):
        """Two tests of a class get the same running cluster; the second one's clean-up destroys it."""

        class Case:
            def __init__(self, name):
                self._testMethodName = name
                self.cleanups = []

            def addCleanup(self, f, *args):
                self.cleanups.append((f, args))

            def test_one(self):
                pass

            def test_two(self):
                pass

        first, second = Case("test_one"), Case("test_two")
        cluster = await private_postgres_for(first, reactor)
        self.addCleanup(cluster.destroy)
        await cluster.stop()
        for f, args in first.cleanups:
            f(*args)
        self.assertTrue(os.path.exists(cluster.directory))
        again = await private_postgres_for(second, reactor)
        self.assertIs(again, cluster)
        self.assertEqual(await PrivatePostgresTests._select_one(self, again), [(1,)])
        for f, args in second.cleanups:
            f(*args)
        self.assertFalse(os.path.exists(cluster.directory))
