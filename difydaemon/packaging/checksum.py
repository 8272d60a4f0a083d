"""
The package checksum (``runtimes.md`` §5.4), the last part of an identifier.

Entries are hashed by name order, so neither zip order, timestamps nor the
archive comment (the signature) change it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping


def _checksum_of_pairs(pairs: Iterable[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    # Sorting the UTF-8 bytes, not the str, is what Go's byte-wise sort does.
    for name_bytes, content in sorted((name.encode("utf-8"), content) for name, content in pairs):
        digest.update(hashlib.sha256(name_bytes).digest())
        digest.update(hashlib.sha256(content).digest())
    return digest.hexdigest()


def package_checksum(files: Mapping[str, bytes]) -> str:
    """
    Lowercase hex checksum of a package's files (every entry counts,
    ``.verification.dify.json`` included).
    """
    return _checksum_of_pairs(files.items())


def directory_checksum(paths_and_contents: Iterable[tuple[str, bytes]]) -> str:
    """
    The same checksum over a source directory's files, given as
    ``(relative /-joined path, content)`` pairs (``dify plugin checksum``).
    """
    return _checksum_of_pairs((path.replace("\\", "/"), content) for path, content in paths_and_contents)
