"""
Names, values and expiries as the coordination layer checks and stores them.

Pure functions shared by the in-memory and the Redis implementations, so that
both refuse the same input and give back the same values.

Every Redis key and channel of difydaemon lives under
``<REDIS_KEY_PREFIX>:difydaemon:``.  The prefix alone is what the Go daemon
uses (``<prefix>:<name>``, CBOR values); the extra ``difydaemon`` segment keeps
our JSON keys apart from Go's even when both are pointed at the same Redis
and prefix by mistake (neither ever reads the other's keys as its own), and
lets an operator list or drop ours with one pattern
(``SCAN MATCH <prefix>:difydaemon:*``).
"""

from __future__ import annotations

import hashlib
import math

import orjson
from attrs import frozen

#: The segment after ``REDIS_KEY_PREFIX`` that every key of ours carries.
NAMESPACE = "difydaemon"
#: ``REDIS_KEY_PREFIX``'s default, as in Go.
DEFAULT_PREFIX = "plugin_daemon"


def check_name(name, what: str = "key") -> str:
    """
    ``name`` if it can name a key, channel or lease: a non-empty string.

    :raises ValueError: otherwise.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a coordination {what} must be a non-empty string, not {name!r}")
    return name


def ttl_milliseconds(ttl) -> int:
    """
    ``ttl`` seconds as whole milliseconds (rounded up, at least 1).

    :raises ValueError: when ``ttl`` is not a finite number above zero.
    """
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"a ttl must be a number of seconds above zero, not {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


def optional_ttl_milliseconds(ttl) -> int | None:
    """:func:`ttl_milliseconds`, with None meaning "no expiry"."""
    return None if ttl is None else ttl_milliseconds(ttl)


def encode_value(value) -> str:
    """
    ``value`` as compact JSON text.

    :raises ValueError: when it is not JSON (a set, an object, a dict with
        non-string keys, an integer beyond 64 bits).
    """
    try:
        return orjson.dumps(value).decode("utf-8")
    except TypeError as e:
        raise ValueError(f"a coordination value must be JSON: {e}") from None


def decode_value(text):
    """The value of JSON ``text`` (str or bytes) stored by :func:`encode_value`."""
    return orjson.loads(text)


def plugin_digest(plugin_unique_identifier: str) -> str:
    """The SHA-256 hex digest naming a plugin's keys: bounded length, safe characters."""
    return hashlib.sha256(check_name(plugin_unique_identifier, "plugin identifier").encode("utf-8")).hexdigest()


@frozen
class KeySpace:
    """
    The Redis names of one cluster: ``<prefix>:difydaemon:<kind>:<name>``.

    :ivar prefix: ``REDIS_KEY_PREFIX``, trimmed; empty means the default.
    """

    prefix: str

    @classmethod
    def for_prefix(cls, prefix: str | None) -> "KeySpace":
        """The key space of ``REDIS_KEY_PREFIX`` (trimmed, as Go does; empty is the default)."""
        return cls((prefix or "").strip() or DEFAULT_PREFIX)

    @property
    def root(self) -> str:
        """What every name of ours starts with."""
        return f"{self.prefix}:{NAMESPACE}:"

    def key(self, kind: str, name: str) -> str:
        """The Redis key (or channel) of ``name`` among the ``kind`` names."""
        return f"{self.root}{kind}:{name}"

    def name_of(self, kind: str, key: str) -> str | None:
        """The name a Redis key of ``kind`` stands for, None if it is not one."""
        head = f"{self.root}{kind}:"
        return key[len(head):] if key.startswith(head) else None
