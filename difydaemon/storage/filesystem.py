"""
:class:`FilesystemObjectStorage`: IObjectStorage in a directory, the
default object store.

A key is a path below the root.  Every file operation runs in a thread
pool.  Writes go to a temporary file next to the target that is then
renamed over it, so a reader sees the old bytes or the new ones, never a
part; temporary files carry :data:`TEMPORARY_SUFFIX` and are never listed.

Directories exist only to hold keys: a save that fails removes the
temporary file and the directories it made, and a delete removes the
directories it leaves empty, so a full or read-only disk leaves nothing
behind.  A failure of the disk is an
:class:`~difydaemon.errors.ObjectStorageError` naming the key and the
system's reason.
"""

from __future__ import annotations

import errno
import os
import secrets

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from difydaemon.errors import ObjectNotFoundError, ObjectStorageError
from difydaemon.interfaces import IObjectStorage
from difydaemon.storage.keys import check_key, check_prefix, storage_error

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
        return self._run(_write_atomically, self._root, path, key, bytes(data))

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
        return self._run(_remove, self._root, path, key)

    def list(self, prefix: str) -> Deferred:
        try:
            segments = check_prefix(prefix)
        except ValueError:
            return fail()
        return self._run(_list_below, self._root, self._path(segments))


#: how often a save is tried when a concurrent delete removes the
#: directory it has just made (see :func:`_prune`)
SAVE_ATTEMPTS = 3


def _storage_error(operation: str, key: str, error: OSError) -> ObjectStorageError:
    return storage_error(operation, key, error.strerror or str(error))


def _write_atomically(root: str, path: str, key: str, data: bytes) -> None:
    for attempt in range(SAVE_ATTEMPTS):
        made: list[str] = []
        try:
            _make_directories(root, os.path.dirname(path), made)
            _write_file(path, data)
            return
        except FileNotFoundError as error:
            _remove_empty(made)
            if attempt + 1 == SAVE_ATTEMPTS:
                raise _storage_error("save", key, error) from None
        except OSError as error:
            _remove_empty(made)
            raise _storage_error("save", key, error) from None


def _make_directories(root: str, directory: str, made: list) -> None:
    """
    Make ``directory`` and its missing parents below ``root`` (``root``
    itself too, if missing); append each one made to ``made``, outermost
    first, so that a failure can remove them again.
    """
    os.makedirs(root, exist_ok=True)
    relative = os.path.relpath(directory, root)
    if relative == os.curdir:
        return
    current = root
    for part in relative.split(os.sep):
        current = os.path.join(current, part)
        try:
            os.mkdir(current)
        except FileExistsError:
            if not os.path.isdir(current):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), current) from None
            continue
        made.append(current)


def _write_file(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
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
        except OSError:
            pass
        raise


def _remove_empty(directories: list) -> None:
    """Remove ``directories`` (outermost first) from the innermost out, while they are empty."""
    for directory in reversed(directories):
        try:
            os.rmdir(directory)
        except OSError:
            return


def _prune(root: str, directory: str) -> None:
    """Remove ``directory`` and its parents below ``root`` while they are empty."""
    while directory != root and directory.startswith(root + os.sep):
        try:
            os.rmdir(directory)
        except OSError:
            return
        directory = os.path.dirname(directory)


def _read(path: str, key: str) -> bytes:
    try:
        with open(path, "rb") as stream:
            return stream.read()
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise ObjectNotFoundError(f"object {key} not found") from None
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            # no key this store saved has a name that long
            raise ObjectNotFoundError(f"object {key[:256]} not found") from None
        raise _storage_error("load", key, error) from None


def _remove(root: str, path: str, key: str) -> None:
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            return
        raise _storage_error("delete", key, error) from None
    _prune(root, os.path.dirname(path))


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
