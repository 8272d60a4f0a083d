"""
The daemon's database (``http-api.md`` §5), behind
:class:`~difydaemon.interfaces.IPersistence`.

- :class:`SQLitePersistence` ``(reactor, path, threadpool=None, run_blocking=None)``:
  the embedded default; all SQLite work in a worker thread.
- :class:`PostgresPersistence` ``(reactor, dsn="", pool_size=5, *, max_idle=None,
  max_lifetime=0, connect_timeout=5.0, read_timeout=30.0, default_database=None,
  **connect_params)``: PostgreSQL through txpostgres, on a pool
  (:mod:`~difydaemon.persistence.pool`) that replaces broken connections.
- :class:`MemoryPersistence` ``(reactor)``: dictionaries, for unit tests.

Call ``migrate()`` once at startup before anything else and ``close()`` at
shutdown.  The schema lives in ``migrations/*.sql``.
"""

import importlib

#: where each backend lives: importing PostgreSQL's (psycopg2, txpostgres)
#: costs the daemon about 8 MB of resident memory, for nothing on the
#: embedded default, so the backends are imported when first asked for.
_BACKENDS = {
    "MemoryPersistence": "difydaemon.persistence.memory",
    "PostgresPersistence": "difydaemon.persistence.postgres",
    "SQLitePersistence": "difydaemon.persistence.sqlite",
    "run_inline": "difydaemon.persistence.sqlite",
}

__all__ = sorted(_BACKENDS)


def __getattr__(name: str):
    module = _BACKENDS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
