"""
:class:`SQLitePersistence`: the embedded default database (stdlib
:mod:`sqlite3`).

One connection is used from one worker thread: every transaction runs
entirely in that thread (``BEGIN IMMEDIATE`` .. ``COMMIT``), so the reactor
thread never waits on the disk and transactions never interleave.  The
shared operations of :mod:`difydaemon.persistence.sql` are coroutines that
never suspend against SQLite, so the worker drives each one to completion
with a single ``send``.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from datetime import datetime, timezone

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from difydaemon.interfaces import IPersistence
from difydaemon.persistence.sql import Dialect, SQLPersistence


def encode_time(moment: datetime) -> str:
    """
    ISO-8601 UTC text with microseconds; the fixed width makes text order
    equal time order, which ``ORDER BY created_at`` relies on.
    """
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def decode_time(text: str) -> datetime:
    """The aware UTC datetime of a value written by :func:`encode_time`."""
    return datetime.fromisoformat(text).astimezone(timezone.utc)


SQLITE = Dialect(
    name="sqlite",
    lock="",
    encode_time=encode_time,
    decode_time=decode_time,
    integrity_error=sqlite3.IntegrityError,
    migration_lock=None,
)


def run_inline(function, *args) -> Deferred:
    """
    Run ``function(*args)`` on the calling thread and return a fired
    Deferred: the ``run_blocking`` of unit tests on ``:memory:``.
    """
    try:
        return succeed(function(*args))
    except BaseException:
        return fail()


def _drive(coroutine):
    # The coroutine only awaits _SQLiteTransaction.execute, which never
    # suspends: it must finish on the first send.
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise RuntimeError("a SQLite operation tried to wait inside its transaction")


class _SQLiteTransaction:
    """The ``tx`` of the shared operations on an open SQLite transaction."""

    dialect = SQLITE

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    async def execute(self, sql: str, params=()) -> list:
        return self._connection.execute(sql, tuple(params)).fetchall()


@implementer(IPersistence)
class SQLitePersistence(SQLPersistence):
    """
    IPersistence on a SQLite file.

    :param reactor: the reactor; its ``seconds()`` stamps rows.
    :param path: the database file, or ``":memory:"``.
    :param threadpool: a started :class:`ThreadPool` owned by the caller to
        run the database work in.  When neither this nor ``run_blocking`` is
        given, a private one-thread pool is made, started now and stopped by
        :meth:`close` (or at reactor shutdown).
    :param run_blocking: ``run_blocking(function, *args) -> Deferred``
        replacing the thread pool entirely; unit tests pass
        :func:`run_inline` to get fired Deferreds without threads.
    """

    _dialect = SQLITE

    def __init__(self, reactor, path: str, threadpool=None, run_blocking=None) -> None:
        super().__init__(reactor)
        self._path = path
        self._connection = None
        # Serializes transactions even when the caller's pool has several
        # threads: there is one connection.
        self._connection_lock = threading.Lock()
        self._own_pool = None
        self._shutdown_trigger = None
        self._closed = False
        self._given_pool = None
        if run_blocking is not None:
            self._run_blocking = run_blocking
        else:
            self._given_pool = threadpool

            def run_in_pool(function, *args):
                return deferToThreadPool(reactor, self._pool(), function, *args)

            self._run_blocking = run_in_pool

    def _pool(self):
        # Made on first use, so that building the daemon starts no thread.
        if self._given_pool is not None:
            return self._given_pool
        if self._own_pool is None:
            pool = ThreadPool(minthreads=1, maxthreads=1, name="difydaemon-sqlite")
            pool.start()
            self._own_pool = pool
            self._shutdown_trigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._stop_pool
            )
        return self._own_pool

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            if self._path != ":memory:" and not self._path.startswith("file:"):
                private_database_file(self._path)
            connection = sqlite3.connect(
                self._path, isolation_level=None, check_same_thread=False
            )
            if self._path != ":memory:":
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA busy_timeout=5000")
            self._connection = connection
        return self._connection

    def _run_transaction(self, operation, args):
        with self._connection_lock:
            if self._closed:
                raise RuntimeError("SQLitePersistence is closed")
            connection = self._connect()
            connection.execute("BEGIN IMMEDIATE")
            try:
                result = _drive(operation(_SQLiteTransaction(connection), *args))
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
            return result

    def _transact(self, operation, *args) -> Deferred:
        return self._run_blocking(self._run_transaction, operation, args)

    def migrate(self) -> Deferred:
        """Apply pending migrations, each in its own transaction."""
        return Deferred.fromCoroutine(self._migrate())

    def _close_connection(self) -> None:
        with self._connection_lock:
            self._closed = True
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def _stop_pool(self) -> None:
        if self._own_pool is not None:
            pool, self._own_pool = self._own_pool, None
            pool.stop()

    async def _close(self) -> None:
        if not self._closed:
            await self._run_blocking(self._close_connection)
        if self._shutdown_trigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        # Joining the idle worker is quick: it has no work left.
        self._stop_pool()

    def close(self) -> Deferred:
        """Close the connection, then stop the private thread pool if any."""
        return Deferred.fromCoroutine(self._close())


#: What the database file may allow: its owner only.
PRIVATE_MODE = 0o600


def private_database_file(path: str) -> None:
    """
    Make ``path`` a file only its owner can read before SQLite opens it:
    created 0600 when missing, group and others' bits removed from one
    that has them (with its ``-wal`` and ``-shm``, which SQLite creates
    with the database file's mode).  The database holds plugin credentials
    and the endpoints' and debugging keys; umask 022 would make it
    world-readable.  Blocking: called from the database thread.
    """
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    except FileExistsError:
        pass
    else:
        os.close(descriptor)
    for name in (path, path + "-wal", path + "-shm"):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(name, mode & 0o700)
