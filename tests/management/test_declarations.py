"""Tests for decoded declarations kept per process."""

from __future__ import annotations

from datetime import datetime, timezone

import orjson
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from difydaemon.api import envelope
from difydaemon.management import views
from difydaemon.management.declarations import Declaration, DeclarationCache
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.persistence.records import Installation, ProviderInstallation
from difydaemon.testing.cases import SynchronousTestCase
from tests.api.harness import RecordingRunner

ECHO = "acme/echo:0.0.1@" + "a" * 64
OTHER = "acme/other:1.0.0@" + "c" * 64
THIRD = "acme/third:1.0.0@" + "d" * 64
MOMENT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def big_declaration(nodes: int) -> dict:
    """A declaration whose tool part holds ``nodes`` small parameters."""
    return {
        "name": "echo",
        "version": "0.0.1",
        "label": {"en_US": "Echo \u56de"},
        "tool": {"tools": [{"name": f"p{i}", "value": i / 3, "flag": i % 2 == 0} for i in range(nodes)]},
        "meta": {"runner": {"language": "python"}},
    }


class HeldRunner:
    """Holds every call until the test fires it (a pool thread that is slow)."""

    def __init__(self):
        self.calls = []

    def run(self, function, *args):
        d = Deferred()
        self.calls.append((function, args, d))
        return d

    def finish(self, index=0):
        function, args, d = self.calls[index]
        d.callback(function(*args))


class ReadingPersistence(MemoryPersistence):
    """Memory persistence that records the JSON texts it hands out."""

    def __init__(self, clock):
        super().__init__(clock)
        self.texts_read = []
        #: called before each answer (to change the cache while a read is under way)
        self.meanwhile = lambda: None

    def get_declarations_json(self, plugin_unique_identifiers, known=()):
        self.meanwhile()
        d = super().get_declarations_json(plugin_unique_identifiers, known)

        def record(found):
            self.texts_read.extend(sorted(i for i, text in found.items() if text is not None))
            return found

        return d.addCallback(record)


class CacheTests(SynchronousTestCase):
    """DeclarationCache decodes a declaration once and bounds what it holds."""

    def setUp(self):
        super().setUp()
        self.persistence = ReadingPersistence(Clock())
        self.runner = RecordingRunner()

    def cache(self, **kwargs):
        return DeclarationCache(self.persistence, self.runner, **kwargs)

    def store(self, identifier, value):
        self.successResultOf(self.persistence.save_declaration(identifier, identifier.split(":")[0], value))

    def many(self, cache, identifiers):
        return self.successResultOfCoroutine(cache.many(identifiers))

    def test_second_read_does_not_decode_again(self):
        """A second read neither fetches nor decodes the text again: it is the same object."""
        self.store(ECHO, {"name": "echo"})
        cache = self.cache()
        first = self.many(cache, [ECHO])[ECHO]
        second = self.many(cache, [ECHO])[ECHO]
        self.assertIs(first, second)
        self.assertEqual(first.value, {"name": "echo"})
        self.assertEqual(self.persistence.texts_read, [ECHO])

    def test_absent_identifiers_left_out(self):
        """Identifiers without a stored declaration are not in the answer; none asked, none read."""
        self.store(ECHO, {"name": "echo"})
        cache = self.cache()
        self.assertEqual(set(self.many(cache, [ECHO, OTHER, ECHO])), {ECHO})
        self.assertEqual(self.many(cache, []), {})
        self.assertIsNone(self.successResultOfCoroutine(cache.get(OTHER)))

    def test_large_first_decode_in_runner(self):
        """A declaration over the inline limit is decoded through the runner; a small one inline."""
        self.store(ECHO, big_declaration(50))
        self.store(OTHER, {"name": "other"})
        cache = self.cache(inline_limit=1024)
        found = self.many(cache, [ECHO, OTHER])
        self.assertEqual(found[ECHO].value, big_declaration(50))
        self.assertEqual(self.runner.functions, ["Declaration.decode"])
        self.many(cache, [ECHO, OTHER])
        self.assertEqual(self.runner.functions, ["Declaration.decode"])

    def test_concurrent_readers_share_one_decode(self):
        """Readers arriving while a large declaration is decoding wait for that one decode."""
        self.store(ECHO, big_declaration(50))
        runner = HeldRunner()
        cache = DeclarationCache(self.persistence, runner, inline_limit=16)
        first = Deferred.fromCoroutine(cache.get(ECHO))
        second = Deferred.fromCoroutine(cache.get(ECHO))
        self.assertNoResult(first)
        self.assertEqual(len(runner.calls), 1)
        runner.finish()
        self.assertIs(self.successResultOf(first), self.successResultOf(second))

    def test_failed_decode_reaches_every_reader_and_is_not_kept(self):
        """A decode that fails fails every waiting reader; the next read tries again."""
        self.store(ECHO, big_declaration(50))
        runner = HeldRunner()
        cache = DeclarationCache(self.persistence, runner, inline_limit=16)
        first = Deferred.fromCoroutine(cache.get(ECHO))
        second = Deferred.fromCoroutine(cache.get(ECHO))
        runner.calls[0][2].errback(ValueError("corrupt row"))
        self.failureResultOf(first, ValueError)
        self.failureResultOf(second, ValueError)
        third = Deferred.fromCoroutine(cache.get(ECHO))
        self.assertEqual(len(runner.calls), 2)
        runner.finish(1)
        self.assertEqual(self.successResultOf(third).value["name"], "echo")

    def test_bounded_by_bytes(self):
        """The memory held stays under the capacity: the least recently used is decoded again."""
        for identifier in (ECHO, OTHER, THIRD):
            self.store(identifier, big_declaration(20))
        size = Declaration.of(big_declaration(20)).weight
        cache = self.cache(capacity=2 * size + size // 2)
        for identifier in (ECHO, OTHER, THIRD):
            self.many(cache, [identifier])
        self.assertLessEqual(cache.weight, 2 * size + size // 2)
        self.assertEqual(cache.weight, 2 * size)
        self.many(cache, [OTHER, THIRD])
        self.many(cache, [ECHO])
        self.assertEqual(self.persistence.texts_read, [ECHO, OTHER, THIRD, ECHO])

    def test_deleted_row_dropped(self):
        """A declaration whose row was deleted (here or by another replica) is neither served nor held."""
        self.store(ECHO, {"name": "echo"})
        cache = self.cache()
        self.many(cache, [ECHO])
        self.successResultOf(self.persistence.delete_declaration(ECHO))
        self.assertEqual(self.many(cache, [ECHO]), {})
        self.assertEqual(cache.weight, 0)

    def test_evicted_during_the_read(self):
        """A declaration evicted while its existence was being checked is read and decoded again."""
        self.store(ECHO, {"name": "echo"})
        cache = self.cache()
        self.many(cache, [ECHO])
        self.persistence.meanwhile = lambda: cache.forget(ECHO)
        self.assertEqual(self.many(cache, [ECHO])[ECHO].value, {"name": "echo"})
        self.assertEqual(self.persistence.texts_read, [ECHO, ECHO])

    def test_forget(self):
        """forget drops what is held; a later read decodes the stored row again."""
        self.store(ECHO, {"name": "echo"})
        cache = self.cache()
        self.many(cache, [ECHO])
        cache.forget(ECHO)
        self.assertEqual(cache.weight, 0)
        self.many(cache, [ECHO])
        self.assertEqual(self.persistence.texts_read, [ECHO, ECHO])

    def test_remember_encodes_in_runner(self):
        """An uploaded declaration is encoded through the runner and then read without a decode."""
        cache = self.cache()
        value = big_declaration(5)
        self.store(ECHO, value)
        held = self.successResultOfCoroutine(cache.remember(ECHO, value))
        self.assertEqual(self.runner.functions, ["Declaration.of"])
        self.assertIs(self.many(cache, [ECHO])[ECHO], held)
        self.assertEqual(self.persistence.texts_read, [])

    def test_stored_text_reencoded(self):
        """Stored text spaced or escaped another way (a Go daemon's row) is embedded in canonical form."""
        held = Declaration.decode(b'{ "name" : "\\u003cecho\\u003e", "tool": {"a": 1.50} }')
        self.assertEqual(held.json, b'{"name":"<echo>","tool":{"a":1.5}}')
        self.assertEqual(held.parts, {"tool": b'{"a":1.5}'})

    def test_weight_covers_memory_held(self):
        """A declaration's weight is not below the memory its decode really holds, whatever its shape."""
        import tracemalloc

        shapes = {
            "tool parameters": big_declaration(5000),
            "empty objects": {"a": [{} for _ in range(20000)]},
            "empty arrays": {"a": [[] for _ in range(20000)]},
            "one-key objects": {"a": [{"k": n} for n in range(20000)]},
            "short strings": {"a": [f"s{n}" for n in range(20000)]},
            "numbers": {"a": [n + 0.5 for n in range(20000)], "b": [1] * 20000},
        }
        for shape, value in shapes.items():
            text = orjson.dumps(value)
            tracemalloc.start()
            try:
                held = Declaration.decode(text)
                traced, _ = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            self.assertGreaterEqual(held.weight, traced, shape)

    def test_not_an_object_refused(self):
        """A stored declaration that is not a JSON object is refused, not held."""
        self.assertRaises(ValueError, Declaration.decode, b"[1, 2]")


def installation(identifier: str) -> Installation:
    return Installation(
        id="0193a8a4-0000-7000-8000-0000000000aa",
        created_at=MOMENT,
        updated_at=MOMENT,
        tenant_id="tenant",
        plugin_id=identifier.split(":")[0],
        plugin_unique_identifier=identifier,
        runtime_type="local",
        endpoints_setups=0,
        endpoints_active=0,
        source="package",
        meta={},
    )


class EnvelopeTests(SynchronousTestCase):
    """Envelopes embedding held JSON are byte for byte the ones encoding the decoded declaration."""

    def setUp(self):
        super().setUp()
        self.value = big_declaration(30)
        self.value["agent_strategy"] = {"identity": {"name": "s"}}
        self.held = Declaration.of(orjson.loads(orjson.dumps(self.value)))

    def test_plugin_entity(self):
        """A list entry embeds the held bytes exactly where the encoded declaration would be."""
        entity = views.plugin_entity(installation(ECHO), self.held)
        plain = dict(entity, declaration=self.value)
        self.assertEqual(envelope.success({"list": [entity]}), envelope.success({"list": [plain]}))
        missing = views.plugin_entity(installation(ECHO), None)
        self.assertEqual(orjson.loads(envelope.success(missing))["data"]["declaration"], {})

    def test_installation_with_declaration(self):
        """A batch row embeds the held bytes; a missing declaration is null."""
        row = views.installation_with_declaration(installation(ECHO), self.held)
        self.assertEqual(envelope.success(row), envelope.success(dict(row, declaration=self.value)))
        row = views.installation_with_declaration(installation(ECHO), None)
        self.assertIsNone(orjson.loads(envelope.success(row))["data"]["declaration"])

    def test_provider_parts(self):
        """A provider row embeds the held bytes of its part (and meta for agent strategies)."""
        row = ProviderInstallation(
            id="0193a8a4-0000-7000-8000-0000000000bb", created_at=MOMENT, updated_at=MOMENT,
            tenant_id="tenant", provider="echo", plugin_unique_identifier=ECHO, plugin_id="acme/echo",
        )
        tool = views.provider_json("tool", row, self.held)
        self.assertEqual(envelope.success(tool), envelope.success(dict(tool, declaration=self.value["tool"])))
        strategy = views.provider_json("agent_strategy", row, self.held)
        plain = dict(strategy, declaration=self.value["agent_strategy"], meta=self.value["meta"])
        self.assertEqual(envelope.success(strategy), envelope.success(plain))
        model = orjson.loads(envelope.success(views.provider_json("model", row, self.held)))["data"]
        self.assertIsNone(model["declaration"])
        self.assertIsNone(orjson.loads(envelope.success(views.provider_json("tool", row, None)))["data"]["declaration"])
