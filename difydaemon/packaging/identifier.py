"""
Plugin unique identifiers: ``[author/]name:version@checksum`` (``http-api.md`` §4.1).
"""

from __future__ import annotations

import hashlib
import re

from attrs import frozen

from difydaemon.errors import UniqueIdentifierError

_IDENTIFIER = re.compile(
    r"^(?:([a-z0-9_-]{1,64})\/)?([a-z0-9_-]{1,255}):([0-9]{1,4})(\.[0-9]{1,4}){1,3}(-\w{1,16})?@[a-f0-9]{32,64}$",
    re.ASCII,
)

# Python's ``$`` also matches before a final newline; Go's does not, so every
# match below is a fullmatch.

# Go's uuid.Parse accepts the hyphenated and the bare-hex forms; the other
# forms it knows (braces, urn prefix) cannot pass the author grammar anyway.
_UUID = re.compile(
    r"^(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|[0-9a-fA-F]{32})$",
    re.ASCII,
)


def is_uuid(text: str) -> bool:
    """Whether ``text`` parses as a UUID the way the Go daemon parses one."""
    return _UUID.fullmatch(text) is not None


@frozen
class PluginIdentifier:
    """
    A parsed plugin unique identifier.

    :ivar raw: the identifier exactly as given.
    :ivar author: the part before ``/``, or None when there is no author.
    :ivar name: the plugin name.
    :ivar version: the text between ``:`` and ``@``.
    :ivar checksum: the hex text after ``@``.
    """

    raw: str
    author: str | None
    name: str
    version: str
    checksum: str

    @property
    def plugin_id(self) -> str:
        """``author/name``, or ``name`` without an author."""
        return f"{self.author}/{self.name}" if self.author is not None else self.name

    @property
    def is_remote(self) -> bool:
        """Whether the author is a UUID, as debug (remote) plugins' are."""
        return self.author is not None and is_uuid(self.author)

    @property
    def hashed(self) -> str:
        """Lowercase hex SHA-256 of the whole identifier (cluster keys)."""
        return hashlib.sha256(self.raw.encode("utf-8")).hexdigest()

    def __str__(self) -> str:
        return self.raw


def parse_identifier(text: str) -> PluginIdentifier:
    """
    Parse a plugin unique identifier.

    :raises UniqueIdentifierError: when ``text`` does not match the grammar.
    """
    if not isinstance(text, str) or _IDENTIFIER.fullmatch(text) is None:
        raise UniqueIdentifierError(f"invalid plugin unique identifier: {text!r}")
    head, checksum = text.split("@", 1)
    plugin_id, version = head.split(":", 1)
    if "/" in plugin_id:
        author, name = plugin_id.split("/", 1)
    else:
        author, name = None, plugin_id
    return PluginIdentifier(raw=text, author=author, name=name, version=version, checksum=checksum)


def compose_identifier(author: str | None, name: str, version: str, checksum: str) -> PluginIdentifier:
    """
    Build and validate the identifier of a package from its manifest fields.

    :raises UniqueIdentifierError: when the result does not match the grammar.
    """
    plugin_id = f"{author}/{name}" if author else name
    return parse_identifier(f"{plugin_id}:{version}@{checksum}")
