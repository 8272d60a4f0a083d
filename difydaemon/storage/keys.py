"""
The key rules of :class:`~difydaemon.interfaces.IObjectStorage`, shared by
every implementation so that they refuse exactly the same keys.
"""

from __future__ import annotations

from difydaemon.errors import ObjectStorageError


def check_key(key: str) -> list:
    """
    The segments of a valid key; ``ValueError`` for a key that is empty,
    has an empty, ``.`` or ``..`` segment, starts with ``/`` or contains a
    backslash or a NUL.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"invalid storage key {key!r}: empty")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"invalid storage key {key!r}: backslash or NUL")
    if key.startswith("/"):
        raise ValueError(f"invalid storage key {key!r}: absolute")
    segments = key.split("/")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise ValueError(f"invalid storage key {key!r}: empty, '.' or '..' segment")
    return segments


def check_prefix(prefix: str) -> list:
    """
    The segments of a list prefix: ``""`` (everything) or a key-shaped
    directory path without a trailing slash.
    """
    if prefix == "":
        return []
    return check_key(prefix)


def storage_error(operation: str, key: str, reason: str) -> ObjectStorageError:
    """
    The :class:`~difydaemon.errors.ObjectStorageError` every store raises
    when it cannot do ``operation`` on ``key``: names both (an absurdly long
    key shortened) and the store's reason.
    """
    shown = key if len(key) <= 256 else key[:256] + "..."
    return ObjectStorageError(f"object storage cannot {operation} {shown}: {reason}")
