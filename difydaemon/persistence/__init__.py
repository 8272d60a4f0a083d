"""
The daemon's database (``http-api.md`` §5), behind
:class:`~difydaemon.interfaces.IPersistence`.

- :class:`SQLitePersistence` ``(reactor, path, threadpool=None, run_blocking=None)``:
  the embedded default; all SQLite work in a worker thread.
- :class:`PostgresPersistence` ``(reactor, dsn="", pool_size=5, **connect_params)``:
  PostgreSQL through txpostgres.
- :class:`MemoryPersistence` ``(reactor)``: dictionaries, for unit tests.

Call ``migrate()`` once at startup before anything else and ``close()`` at
shutdown.  The schema lives in ``migrations/*.sql``.
"""

from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.persistence.postgres import PostgresPersistence
from difydaemon.persistence.sqlite import SQLitePersistence, run_inline

__all__ = ["MemoryPersistence", "PostgresPersistence", "SQLitePersistence", "run_inline"]
