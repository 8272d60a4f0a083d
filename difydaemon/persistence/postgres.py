"""
:class:`PostgresPersistence`: the daemon's database on PostgreSQL, through
txpostgres (psycopg2 in asynchronous mode, driven by the reactor; no
threads).

Each operation of :mod:`difydaemon.persistence.sql` runs in one
transaction (``BEGIN`` .. ``COMMIT``) on a connection lent by a
:class:`~difydaemon.persistence.pool.ConnectionPool`; its reads marked
``{lock}`` are ``SELECT ... FOR UPDATE``.

Surviving the database going away:

- connections are opened when needed; connecting is bounded by
  ``connect_timeout`` and waiting for each statement's answer by
  ``read_timeout`` (a stopped or unreachable server never hangs a call);
- a connection that breaks, idle or in use, is closed and replaced;
- an operation whose connection broke runs once more on a new connection
  when that cannot repeat a change: always for the operations marked
  :func:`~difydaemon.persistence.sql.read_only` (run as ``READ ONLY``
  transactions), and for the others only when the break came before
  ``COMMIT`` was sent (the server then rolled the transaction back);
- what still fails fails with
  :class:`~difydaemon.errors.DatabaseUnavailableError`
  (``database unavailable: ...``), and the next call tries again: the
  daemon is back as soon as the server is.
"""

from __future__ import annotations

import functools
from datetime import datetime, timezone

import psycopg2
import psycopg2.extensions
from twisted.internet import error as internet_error
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres
from zope.interface import implementer

from difydaemon.errors import DaemonError, DatabaseUnavailableError, InternalServerError
from difydaemon.interfaces import IPersistence
from difydaemon.persistence.pool import ConnectionPool, PoolClosedError
from difydaemon.persistence.sql import Dialect, SQLPersistence, is_read_only

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

#: SQLSTATEs of an error after which the connection is gone: class 08
#: (connection exception) and the shutdowns of class 57
_CONNECTION_GONE_STATES = ("57P01", "57P02", "57P03")
_DUPLICATE_DATABASE = "42P04"
_UNIQUE_VIOLATION = "23505"


@functools.lru_cache(maxsize=1024)
def to_pyformat(sql: str) -> str:
    """``?`` placeholders -> psycopg2's ``%s`` (literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


def quote_identifier(name: str) -> str:
    """
    ``name`` as a PostgreSQL quoted identifier: in double quotes, each
    double quote inside doubled.  Any text is safe inside; case and spaces
    are kept.

    :raises ValueError: for an empty name or one with a NUL character,
        which PostgreSQL cannot store.
    """
    if not name or "\x00" in name:
        raise ValueError(f"not a usable PostgreSQL identifier: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def _closed(connection) -> bool:
    pollable = connection.pollable()
    return pollable is None or bool(pollable.closed)


def shielded(inner: Deferred) -> Deferred:
    """
    A Deferred with ``inner``'s result whose cancellation does not reach
    ``inner``: cancelling it fails it with ``CancelledError`` at once, and
    ``inner`` goes on; its later result is dropped (a failure logged at
    debug level, so none is left unhandled).
    """
    outer: Deferred = Deferred(lambda _: None)

    def settle(result):
        if outer.called:
            if isinstance(result, Failure):
                log.debug("a database call whose caller left failed: {reason}", reason=result.getErrorMessage())
            return None
        if isinstance(result, Failure):
            outer.errback(result)
        else:
            outer.callback(result)
        return None

    inner.addBoth(settle)
    return outer


def connection_gone(exc: BaseException, connection=None) -> bool:
    """
    Whether ``exc``, raised while using ``connection``, means the
    connection is unusable (as opposed to an SQL error on a healthy one).
    """
    if connection is not None and _closed(connection):
        return True
    if isinstance(exc, (psycopg2.InterfaceError, internet_error.ConnectionLost, internet_error.ConnectionDone)):
        return True
    if isinstance(exc, psycopg2.OperationalError):
        state = exc.pgcode
        return state is None or state.startswith("08") or state in _CONNECTION_GONE_STATES
    return False


def _describe(exc: BaseException) -> str:
    """A one-line description of a driver error."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines()]
    return "; ".join(line for line in lines if line) or type(exc).__name__


class _Timeout(Exception):
    """The server did not answer in time."""


def _within(reactor, d: Deferred, seconds: float, on_expiry) -> Deferred:
    """
    ``d``'s result, or a :class:`_Timeout` failure after ``seconds``, when
    ``on_expiry()`` is called (it closes the connection, which makes
    txpostgres give up on ``d``).  Never cancels ``d``: txpostgres cancels
    with libpq's blocking ``PQcancel``, which hangs on a stopped server.
    """
    outcome = Deferred()
    expired = []

    def expire():
        expired.append(True)
        try:
            on_expiry()
        finally:
            outcome.errback(_Timeout(seconds))

    timer = reactor.callLater(seconds, expire)

    def settle(result):
        if expired:
            # too late (or the expiry's own doing): the caller gets the timeout
            return None
        timer.cancel()
        if isinstance(result, Failure):
            outcome.errback(result)
        else:
            outcome.callback(result)
        return None

    d.addBoth(settle)
    return outcome


class _WatchedConnection(txpostgres.Connection):
    """
    A txpostgres connection that notices when the server closes it while
    it is idle.

    txpostgres keeps every connection registered for reading (to see
    ``NOTIFY``); when the server goes away, that read raises with nobody
    to tell, and the reactor logs an "Unhandled Error".  Here the error is
    taken as the connection being lost, and ``on_lost`` is told.
    """

    on_lost = None

    def doRead(self):
        try:
            return super().doRead()
        except psycopg2.Error:
            if self.on_lost is not None:
                self.on_lost(self)
            return internet_error.ConnectionLost("the database server closed the connection")


def _close(connection) -> None:
    if connection.pollable() is not None:
        connection.close()


class _Attempt:
    """How far one transaction got; decides whether it may run again."""

    def __init__(self) -> None:
        self.committing = False
        self.timed_out = False
        self.rollback_failed = False


class _PostgresTransaction:
    """The ``tx`` of the shared operations on one connection."""

    dialect = POSTGRES

    def __init__(self, persistence, connection, cursor, attempt: _Attempt) -> None:
        self._persistence = persistence
        self._connection = connection
        self._cursor = cursor
        self._attempt = attempt

    async def execute(self, sql: str, params=()) -> list:
        if params:
            await self._persistence._execute(
                self._connection, self._cursor, self._attempt, to_pyformat(sql), tuple(params)
            )
        else:
            # without parameters psycopg2 does no %-substitution at all
            await self._persistence._execute(self._connection, self._cursor, self._attempt, sql)
        if self._cursor.description is None:
            return []
        return self._cursor.fetchall()


@implementer(IPersistence)
class PostgresPersistence(SQLPersistence):
    """
    IPersistence on PostgreSQL.

    Nothing connects until the first call (usually :meth:`migrate` at
    start-up).

    :param reactor: the reactor; drives the connections, the time-outs, and
        stamps rows.
    :param dsn: a libpq connection string (``"host=... dbname=..."`` or a
        ``postgresql://`` URL); may be empty when ``connect_params`` say it
        all.
    :param pool_size: connections open at most.
    :param max_idle: idle connections kept (``pool_size`` when None).
    :param max_lifetime: seconds after which a connection is replaced; 0
        for never.
    :param connect_timeout: seconds a connection attempt may take.
    :param read_timeout: seconds to wait for the answer to one statement
        before the connection is taken for dead.
    :param default_database: a database to connect to when the target
        database does not exist, to create it (None: never create it).
    :param connect_params: more keyword arguments of ``psycopg2.connect``
        (``host``, ``port``, ``user``, ``password``, ``dbname``,
        ``sslmode``, ``options``...); they win over the DSN.
    """

    _dialect = POSTGRES

    def __init__(
        self, reactor, dsn: str = "", pool_size: int = 5, *, max_idle: int | None = None,
        max_lifetime: float = 0, connect_timeout: float = 5.0, read_timeout: float = 30.0,
        default_database: str | None = None, **connect_params,
    ) -> None:
        super().__init__(reactor)
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self._dsn = dsn
        self._connect_params = connect_params
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._default_database = default_database
        self._pool = ConnectionPool(
            reactor, self._connect, _close, pool_size, max_idle=max_idle, max_lifetime=max_lifetime
        )
        #: False from a failure to reach the database until the next success
        self.available = True

    # -- connections ----------------------------------------------------------

    def _connect(self, dbname: str | None = None) -> Deferred:
        return Deferred.fromCoroutine(self._open(dbname))

    async def _open(self, dbname: str | None):
        connection = _WatchedConnection(reactor=self._reactor)
        params = dict(self._connect_params)
        if dbname is not None:
            params["dbname"] = dbname
        try:
            d = connection.connect(self._dsn, **params)
            await _within(self._reactor, d, self._connect_timeout, lambda: _close(connection))
        except _Timeout:
            self._unavailable()
            raise DatabaseUnavailableError(
                f"could not connect to {self._where(dbname)} within {self._connect_timeout:g} s"
            ) from None
        except psycopg2.Error as exc:
            _close(connection)
            self._unavailable()
            raise DatabaseUnavailableError(f"cannot connect to {self._where(dbname)}: {_describe(exc)}") from exc
        connection.on_lost = self._pool.lost
        return connection

    def _parameters(self) -> dict:
        """The connection parameters of the DSN and the keywords together."""
        return psycopg2.extensions.parse_dsn(psycopg2.extensions.make_dsn(self._dsn, **self._connect_params))

    def _where(self, dbname: str | None = None) -> str:
        """``host:port/dbname`` of the server, for messages (never the password)."""
        params = self._parameters()
        host = params.get("host") or "localhost"
        return f"{host}:{params.get('port') or 5432}/{dbname or params.get('dbname', '')}"

    def _unavailable(self) -> None:
        if self.available:
            self.available = False
            log.warn("the database is unavailable")

    def _available(self) -> None:
        if not self.available:
            self.available = True
            log.info("the database is available again")

    async def _execute(self, connection, cursor, attempt: _Attempt, sql: str, params=None):
        d = cursor.execute(sql, params) if params is not None else cursor.execute(sql)

        def expire():
            attempt.timed_out = True
            _close(connection)

        await _within(self._reactor, d, self._read_timeout, expire)

    # -- transactions -----------------------------------------------------------

    async def _attempt(self, connection, attempt: _Attempt, operation, args, read_only: bool):
        cursor = connection.cursor()
        await self._execute(connection, cursor, attempt, "BEGIN READ ONLY" if read_only else "BEGIN")
        try:
            result = await operation(_PostgresTransaction(self, connection, cursor, attempt), *args)
        except BaseException:
            if not attempt.timed_out and not _closed(connection):
                try:
                    await self._execute(connection, cursor, attempt, "ROLLBACK")
                except Exception:
                    # the connection's state is unknown: it must not be lent again
                    attempt.rollback_failed = True
            raise
        attempt.committing = True
        await self._execute(connection, cursor, attempt, "COMMIT")
        return result

    async def _run(self, operation, args):
        read_only = is_read_only(operation)
        retried = False
        while True:
            try:
                connection = await self._pool.acquire()
            except PoolClosedError:
                raise InternalServerError("the database connection is closed") from None
            attempt = _Attempt()
            try:
                result = await self._attempt(connection, attempt, operation, args, read_only)
            except BaseException as exc:
                gone = attempt.timed_out or attempt.rollback_failed or connection_gone(exc, connection)
                self._pool.release(connection, reusable=not gone)
                if not gone or isinstance(exc, DaemonError):
                    # an SQL error, or the operation's own answer: not an outage
                    raise
                # the others most likely died with it
                self._pool.discard_idle()
                self._unavailable()
                if not retried and not attempt.timed_out and (read_only or not attempt.committing):
                    retried = True
                    log.info(
                        "lost the database connection during {operation}; trying once more",
                        operation=operation.__name__,
                    )
                    continue
                raise self._lost(exc, attempt) from exc
            self._pool.release(connection)
            self._available()
            return result

    def _lost(self, exc: BaseException, attempt: _Attempt) -> DatabaseUnavailableError:
        if attempt.timed_out:
            return DatabaseUnavailableError(f"no answer from the database within {self._read_timeout:g} s")
        if attempt.committing:
            return DatabaseUnavailableError(
                "the connection broke while committing; the change may or may not have been saved"
            )
        return DatabaseUnavailableError(f"the connection broke: {_describe(exc)}")

    def _transact(self, operation, *args) -> Deferred:
        # A caller that goes away (Klein cancels a handler whose client
        # left) must not cancel the transaction halfway: a statement still
        # in flight would leave the connection unusable, and a write would
        # be cut at an unknown point.  It runs to its end; only the answer
        # is dropped.
        return shielded(Deferred.fromCoroutine(self._run(operation, args)))

    # -- start-up and shutdown ---------------------------------------------------

    async def _ensure_database(self) -> None:
        """Create the target database if it does not exist (through the default one)."""
        target = self._parameters().get("dbname")
        if not target or target == self._default_database:
            return
        try:
            connection = await self._pool.acquire()
        except DatabaseUnavailableError as exc:
            first_failure = exc
        else:
            self._pool.release(connection)
            return
        try:
            admin = await self._connect(self._default_database)
        except DatabaseUnavailableError:
            # the server itself is unreachable: say what the first try met
            raise first_failure from None
        try:
            attempt = _Attempt()
            cursor = admin.cursor()
            await self._execute(admin, cursor, attempt, "SELECT 1 FROM pg_database WHERE datname = %s", (target,))
            if cursor.fetchall():
                # it exists: the first failure was something else
                raise first_failure
            try:
                await self._execute(admin, cursor, attempt, "CREATE DATABASE " + quote_identifier(target))
            except psycopg2.Error as exc:
                if exc.pgcode not in (_DUPLICATE_DATABASE, _UNIQUE_VIOLATION):
                    raise InternalServerError(
                        f"database {target!r} does not exist and could not be created: {_describe(exc)}"
                    ) from exc
                # another replica created it meanwhile
            else:
                log.info("created database {database}", database=target)
        except _Timeout:
            raise DatabaseUnavailableError(
                f"no answer from the database within {self._read_timeout:g} s"
            ) from None
        finally:
            _close(admin)

    def migrate(self) -> Deferred:
        """
        Create the database if it is missing and a default database was
        given, then apply pending migrations, each in its own transaction,
        under an advisory lock so replicas starting together do not race.
        """
        return Deferred.fromCoroutine(self._prepare())

    async def _prepare(self) -> None:
        if self._default_database:
            await self._ensure_database()
        await self._migrate()

    def close(self) -> Deferred:
        """Disconnect idle connections now and lent ones when returned; later calls fail."""
        self._pool.close()
        return succeed(None)
