"""
:class:`FilesystemObjectStorage`: IObjectStorage in a directory, the
default object store.

A key is a path below the root.  Every file operation runs in a thread
pool.  Writes go to a temporary file next to the target that is then
renamed over it, so a reader sees the old bytes or the new ones, never a
part; temporary files carry :data:`TEMPORARY_SUFFIX` and are never listed.
"""

from __future__ import annotations

import os
import secrets

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from difydaemon.errors import ObjectNotFoundError
from difydaemon.interfaces import IObjectStorage
from difydaemon.storage.keys import check_key, check_prefix

TEMPORARY_SUFFIX = ".difydaemon-tmp"


@implementer(IObjectStorage)
class FilesystemObjectStorage:
    """
    IObjectStorage on a local directory.

    :param reactor: the reactor the results are delivered on.
    :param root: the directory holding every key; made if missing.
    :param threadpool: the thread pool for file I/O; the reactor's own pool
        (``reactor.getThreadPool()``) when None.  The caller owns it.
    """

    def __init__(self, reactor, root: str, threadpool=None) -> None:
        self._reactor = reactor
        self._root = os.path.abspath(root)
        self._threadpool = threadpool

    def _run(self, function, *args) -> Deferred:
        pool = self._threadpool
        if pool is None:
            pool = self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, function, *args)

    def _path(self, segments) -> str:
        return os.path.join(self._root, *segments)

    def save(self, key: str, data: bytes) -> Deferred:
        try:
            path = self._path(check_key(key))
        except ValueError:
            return fail()
        return self._run(_write_atomically, path, bytes(data))

    def load(self, key: str) -> Deferred:
        try:
            path = self._path(check_key(key))
        except ValueError:
            return fail()
        return self._run(_read, path, key)

    def exists(self, key: str) -> Deferred:
        try:
            path = self._path(check_key(key))
        except ValueError:
            return fail()
        return self._run(os.path.isfile, path)

    def delete(self, key: str) -> Deferred:
        try:
            path = self._path(check_key(key))
        except ValueError:
            return fail()
        return self._run(_remove, path)

    def list(self, prefix: str) -> Deferred:
        try:
            segments = check_prefix(prefix)
        except ValueError:
            return fail()
        return self._run(_list_below, self._root, self._path(segments))


def _write_atomically(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    temporary = os.path.join(
        directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}{TEMPORARY_SUFFIX}"
    )
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise ObjectNotFoundError(f"object {key} not found") from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        pass


def _list_below(root: str, top: str) -> list:
    keys = []
    if not os.path.isdir(top):
        return keys
    for directory, _, files in os.walk(top):
        relative = os.path.relpath(directory, root)
        for name in files:
            if name.endswith(TEMPORARY_SUFFIX):
                continue
            path = name if relative == os.curdir else os.path.join(relative, name)
            keys.append(path.replace(os.sep, "/"))
    return sorted(keys)
