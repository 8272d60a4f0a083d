"""
Decoded plugin declarations, kept per process.

A declaration (manifest plus provider, tool and model YAML) can legally be
megabytes of JSON; decoding one costs the reactor a hundred milliseconds
and encoding it into an envelope a few tens more, on every list call.  A
unique identifier carries its package's checksum, so its declaration never
changes: it is decoded once, encoded once, and kept with its JSON bytes so
that envelopes embed them as they are (``orjson.Fragment``).  The first
decode of a large one runs in the blocking pool, not on the reactor.

The database still says which identifiers exist on every read (a row
another replica deleted is not served from here); only the text of the
ones held is neither sent nor decoded again.
"""

from __future__ import annotations

import orjson
from attrs import frozen
from twisted.internet.defer import Deferred

from difydaemon.management.lru import LRUCache

#: the declaration keys embedded on their own by the provider routes
PART_KEYS = ("tool", "model", "agent_strategy", "datasource", "trigger", "meta")

#: JSON at most this long is decoded on the reactor: a thread hop costs more
INLINE_DECODE_LIMIT = 256 * 1024

#: the memory held by default (an estimate: see :attr:`Declaration.weight`)
DEFAULT_CAPACITY = 128 * 1024 * 1024


@frozen
class Declaration:
    """
    One decoded declaration and its canonical JSON.

    :ivar value: the decoded declaration; shared by every reader, so never
        changed in place.
    :ivar json: ``orjson.dumps(value)``: what an envelope embeds.
    :ivar parts: key -> JSON bytes of ``value[key]`` for :data:`PART_KEYS`.
    :ivar weight: the memory it holds, estimated (what the cache is bounded
        by): its JSON bytes and parts, and the decoded objects
        (:func:`footprint`); counted once, where it is encoded.
    """

    value: dict
    json: bytes
    parts: dict
    weight: int

    @classmethod
    def of(cls, value: dict) -> "Declaration":
        """Encode a decoded declaration (blocking when it is large)."""
        if not isinstance(value, dict):
            raise ValueError(f"a declaration is a JSON object, not {type(value).__name__}")
        parts = {key: _exact(orjson.dumps(value[key])) for key in PART_KEYS if key in value}
        encoded = _exact(orjson.dumps(value))
        weight = len(encoded) + sum(len(part) for part in parts.values()) + footprint(encoded)
        return cls(value=value, json=encoded, parts=parts, weight=weight)

    @classmethod
    def decode(cls, text: bytes) -> "Declaration":
        """
        Decode stored JSON (blocking when it is large).  The bytes kept are
        re-encoded, not the stored text: a row written by another daemon may
        be spaced or escaped differently, and envelopes must not change.
        """
        return cls.of(orjson.loads(text))

    def fragment(self) -> orjson.Fragment:
        """The whole declaration, ready to embed in an envelope."""
        return orjson.Fragment(self.json)

    def part(self, key: str):
        """``value[key]`` ready to embed (a Fragment), or None if absent."""
        encoded = self.parts.get(key)
        return None if encoded is None else orjson.Fragment(encoded)


def _exact(encoded: bytes) -> bytes:
    # orjson's bytes keep the buffer they were written in, about four times
    # their length (tracemalloc); a held copy costs only its length
    return memoryview(encoded).tobytes()


def footprint(text: bytes) -> int:
    """
    An upper estimate of the memory the decoded objects of JSON ``text``
    hold, from counts of its bytes (C speed, no walk of the objects).
    Measured with tracemalloc, decoded objects take 4 (numbers) to 24
    (empty objects) times their JSON; this gives each container 200 bytes,
    each further item 64 and each byte 2, which stays above the measure
    for every shape tried (``tests/management/test_declarations.py``).
    A ``{`` or ``,`` inside a string counts too: an overestimate.
    """
    containers = text.count(b"{") + text.count(b"[")
    return 2 * len(text) + 200 * containers + 64 * text.count(b",")


def _weight(declaration: Declaration) -> int:
    return declaration.weight


class DeclarationCache:
    """
    Stored declarations by unique identifier, decoded once per process.

    :param persistence: an IPersistence (``get_declarations_json``).
    :param runner: where large decodes and encodes run (``runner.run``).
    :param capacity: the most memory held (estimated: see
        :attr:`Declaration.weight`); least recently used go first.
    :param inline_limit: stored JSON at most this long decodes inline.
    """

    def __init__(self, persistence, runner, capacity: int = DEFAULT_CAPACITY,
                 inline_limit: int = INLINE_DECODE_LIMIT) -> None:
        self._persistence = persistence
        self._runner = runner
        self._inline_limit = inline_limit
        self._entries = LRUCache(capacity, weigh=_weight)
        # identifier -> the waiters of a decode under way, so that
        # a burst of list calls decodes a large declaration once, not once each
        self._decoding: dict[str, list] = {}

    @property
    def weight(self) -> int:
        """The memory held now (estimated)."""
        return self._entries.weight

    async def many(self, identifiers) -> dict:
        """identifier -> :class:`Declaration` for the stored ones."""
        wanted = list(dict.fromkeys(identifiers))
        if not wanted:
            return {}
        held = [identifier for identifier in wanted if identifier in self._entries]
        stored = await self._persistence.get_declarations_json(wanted, known=held)
        found = {}
        for identifier in wanted:
            if identifier not in stored:
                # deleted (maybe by another replica): nothing to serve or keep
                self._entries.discard(identifier)
                continue
            text = stored[identifier]
            declaration = self._entries.get(identifier) if text is None else None
            if declaration is None:
                if text is None:
                    # evicted between the two looks: read it again
                    text = (await self._persistence.get_declarations_json([identifier])).get(identifier)
                    if text is None:
                        continue
                declaration = await self._decoded(identifier, text)
            found[identifier] = declaration
        return found

    async def get(self, identifier: str) -> Declaration | None:
        """The :class:`Declaration` of one identifier, or None."""
        return (await self.many([identifier])).get(identifier)

    async def value(self, identifier: str) -> dict | None:
        """The decoded declaration of one identifier (shared: do not change it), or None."""
        declaration = await self.get(identifier)
        return None if declaration is None else declaration.value

    async def remember(self, identifier: str, value: dict) -> Declaration:
        """
        Hold a declaration just stored (an upload), encoded in the pool: the
        first list after an upload then finds it ready.
        """
        declaration = await self._runner.run(Declaration.of, value)
        self._entries.put(identifier, declaration)
        return declaration

    def forget(self, identifier: str) -> None:
        """Drop an identifier whose declaration row was deleted."""
        self._entries.discard(identifier)

    async def _decoded(self, identifier: str, text: bytes) -> Declaration:
        if len(text) <= self._inline_limit:
            declaration = Declaration.decode(text)
            self._entries.put(identifier, declaration)
            return declaration
        waiter = Deferred()
        waiters = self._decoding.get(identifier)
        if waiters is not None:
            waiters.append(waiter)
            return await waiter
        waiters = self._decoding[identifier] = [waiter]

        def done(result):
            del self._decoding[identifier]
            if isinstance(result, Declaration):
                self._entries.put(identifier, result)
            # every waiter gets the result, or the failure to raise
            for each in waiters:
                each.callback(result)

        self._runner.run(Declaration.decode, text).addBoth(done)
        return await waiter
