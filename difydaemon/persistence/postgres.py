"""
:class:`PostgresPersistence`: the daemon's database on PostgreSQL, through
txpostgres (psycopg2 in asynchronous mode, driven by the reactor; no
threads).

Each operation of :mod:`difydaemon.persistence.sql` runs in one
``runInteraction`` of a pooled connection; its reads marked ``{lock}`` are
``SELECT ... FOR UPDATE``.
"""

from __future__ import annotations

import functools
from datetime import datetime, timezone

import psycopg2
from twisted.internet.defer import Deferred, DeferredLock, FirstError, succeed
from twisted.logger import Logger
from txpostgres import txpostgres
from zope.interface import implementer

from difydaemon.interfaces import IPersistence
from difydaemon.persistence.sql import Dialect, SQLPersistence

log = Logger()


def decode_time(value: datetime) -> datetime:
    """psycopg2 gives timestamptz in the session's zone; records want UTC."""
    return value.astimezone(timezone.utc)


POSTGRES = Dialect(
    name="postgres",
    lock=" FOR UPDATE",
    encode_time=lambda moment: moment,
    decode_time=decode_time,
    integrity_error=psycopg2.IntegrityError,
    # any constant shared by every replica of the daemon
    migration_lock="SELECT pg_advisory_xact_lock(4851772640319)",
)


@functools.lru_cache(maxsize=1024)
def to_pyformat(sql: str) -> str:
    """``?`` placeholders -> psycopg2's ``%s`` (literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PostgresTransaction:
    """The ``tx`` of the shared operations on a txpostgres cursor."""

    dialect = POSTGRES

    def __init__(self, cursor) -> None:
        self._cursor = cursor

    async def execute(self, sql: str, params=()) -> list:
        if params:
            await self._cursor.execute(to_pyformat(sql), tuple(params))
        else:
            # without parameters psycopg2 does no %-substitution at all
            await self._cursor.execute(sql)
        if self._cursor.description is None:
            return []
        return self._cursor.fetchall()


class _ConnectionPool(txpostgres.ConnectionPool):
    """A txpostgres pool that uses the injected reactor, not the global one."""

    def __init__(self, reactor, size: int, *connargs, **connkw) -> None:
        self.reactor = reactor
        super().__init__(None, *connargs, min=size, **connkw)


def _close_pool(pool: _ConnectionPool) -> None:
    for connection in list(pool.connections):
        # a connection whose connect() raised has nothing to close
        if connection.pollable() is None:
            continue
        try:
            connection.close()
        except Exception:
            log.failure("closing a PostgreSQL connection")


@implementer(IPersistence)
class PostgresPersistence(SQLPersistence):
    """
    IPersistence on PostgreSQL.

    The pool connects on first use (usually :meth:`migrate` at startup); a
    failed connect fails that call and the next call tries again.

    :param reactor: the reactor; drives the connections and stamps rows.
    :param dsn: a libpq connection string (``"host=... dbname=..."`` or a
        ``postgresql://`` URL); may be empty when ``connect_params`` say it
        all.
    :param pool_size: how many connections the pool opens.
    :param connect_params: more keyword arguments of ``psycopg2.connect``
        (``host``, ``port``, ``user``, ``password``, ``dbname``,
        ``sslmode``, ``options``...); they win over the DSN.
    """

    _dialect = POSTGRES

    def __init__(self, reactor, dsn: str = "", pool_size: int = 5, **connect_params) -> None:
        super().__init__(reactor)
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self._dsn = dsn
        self._pool_size = pool_size
        self._connect_params = connect_params
        self._pool = None
        self._closed = False
        self._start_lock = DeferredLock()

    async def _ready_pool(self) -> _ConnectionPool:
        if self._pool is not None:
            return self._pool
        await self._start_lock.acquire()
        try:
            if self._closed:
                raise RuntimeError("PostgresPersistence is closed")
            if self._pool is None:
                pool = _ConnectionPool(
                    self._reactor, self._pool_size, self._dsn, **self._connect_params
                )
                try:
                    await pool.start()
                except FirstError as e:
                    # report the driver's own error, not DeferredList's wrapper
                    _close_pool(pool)
                    e.subFailure.raiseException()
                except BaseException:
                    _close_pool(pool)
                    raise
                self._pool = pool
            return self._pool
        finally:
            self._start_lock.release()

    async def _run(self, operation, args):
        pool = await self._ready_pool()

        def interaction(cursor):
            # runInteraction needs a Deferred, never a bare coroutine
            return Deferred.fromCoroutine(operation(_PostgresTransaction(cursor), *args))

        return await pool.runInteraction(interaction)

    def _transact(self, operation, *args) -> Deferred:
        return Deferred.fromCoroutine(self._run(operation, args))

    def migrate(self) -> Deferred:
        """
        Apply pending migrations, each in its own transaction, under an
        advisory lock so replicas starting together do not race.
        """
        return Deferred.fromCoroutine(self._migrate())

    def close(self) -> Deferred:
        """Disconnect every pooled connection; later calls fail."""
        self._closed = True
        if self._pool is not None:
            pool, self._pool = self._pool, None
            _close_pool(pool)
        return succeed(None)
