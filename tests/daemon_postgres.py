"""
A database of its own on the real PostgreSQL for a whole-daemon test: made
for the test, dropped after it, named to the daemon through the DB_*
variables.
"""

from __future__ import annotations

import secrets

import psycopg2
from psycopg2.extensions import parse_dsn
from twisted.internet import reactor
from txpostgres import txpostgres

from tests.persistence.test_postgres import postgres_dsn


async def fresh_database(test, prefix: str = "difydaemon_e2e_") -> dict:
    """
    Create a database for ``test`` (dropped at its cleanup, after the
    daemon's stop if the daemon is started afterwards) and return the
    variables that point a daemon at it.
    """
    name = prefix + secrets.token_hex(6)
    dsn = parse_dsn(postgres_dsn())
    admin = txpostgres.Connection(reactor=reactor)
    try:
        await admin.connect(**dict(dsn, dbname="postgres"))
    except psycopg2.OperationalError as e:
        test.fail(f"PostgreSQL at {postgres_dsn()!r} is not reachable ({e}); this test is required")
    test.addCleanup(admin.close)
    await admin.runOperation(f"CREATE DATABASE {name}")
    test.addCleanup(admin.runOperation, f"DROP DATABASE {name} WITH (FORCE)")
    return {
        "DB_TYPE": "postgresql",
        "DB_HOST": dsn.get("host", "127.0.0.1"),
        "DB_PORT": dsn.get("port", "5432"),
        "DB_USERNAME": dsn.get("user", "postgres"),
        "DB_PASSWORD": dsn.get("password", ""),
        "DB_DATABASE": name,
    }


async def connect(environ: dict) -> txpostgres.Connection:
    """A connection to the database ``environ`` (from :func:`fresh_database`) names."""
    connection = txpostgres.Connection(reactor=reactor)
    await connection.connect(
        host=environ["DB_HOST"], port=environ["DB_PORT"], user=environ["DB_USERNAME"],
        password=environ["DB_PASSWORD"], dbname=environ["DB_DATABASE"],
    )
    return connection
