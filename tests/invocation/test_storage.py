"""Tests for difydaemon.invocation.storage: the ``storage`` backwards invocation."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from difydaemon.invocation.storage import (
    LOAD_FAILED,
    PluginStorage,
    StorageError,
    StorageRequest,
    clean_path,
    decode_hex,
    parse_storage_request,
    quota_of,
)
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.testing.cases import SynchronousTestCase

T1 = "7b7a0f0c-0000-4000-8000-000000000001"
T2 = "7b7a0f0c-0000-4000-8000-000000000002"
PLUGIN = "acme/echo"

QUOTA_TEXT = "save data failed: allocated size is greater than max storage size"
TRAVERSAL_TEXT = "invalid key: path traversal attempt detected"


def validation(*problems) -> str:
    """Go's text for request fields that fail validation."""
    return "unmarshal backwards invoke request failed: error validating struct: " + "\n".join(
        f"Key: 'InvokeStorageRequest.{name}' Error:Field validation for '{name}' "
        f"failed on the '{tag}' tag"
        for name, tag in problems
    )


class StorageCase(SynchronousTestCase):
    """A PluginStorage over MemoryPersistence, with helpers to run requests."""

    max_size = 4096

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.persistence = MemoryPersistence(self.clock)
        self.storage = PluginStorage(self.persistence, self.max_size)

    def run_ok(self, request, tenant_id=T1, plugin_id=PLUGIN, declared_size=1024) -> dict:
        """The response data of a request that must succeed."""
        return self.successResultOfCoroutine(
            self.storage.run(tenant_id, plugin_id, declared_size, request)
        )

    def run_error(self, request, tenant_id=T1, plugin_id=PLUGIN, declared_size=1024) -> str:
        """The message of a request that must fail with StorageError."""
        failure = self.failureResultOfCoroutine(
            self.storage.run(tenant_id, plugin_id, declared_size, request), StorageError
        )
        return failure.value.message

    def set(self, key, value: bytes, **kwargs) -> dict:
        """Run a set of raw bytes."""
        return self.run_ok({"opt": "set", "key": key, "value": value.hex()}, **kwargs)

    def size(self, tenant_id=T1, plugin_id=PLUGIN) -> int:
        """The stored byte total of a (tenant, plugin)."""
        return self.successResultOf(self.persistence.storage_size(tenant_id, plugin_id))


class OperationTests(StorageCase):
    """The four operations and their exact response data."""

    def test_set_then_get(self):
        """set answers {"data": "ok"}; get answers the value as lowercase hex."""
        self.assertEqual(
            self.run_ok({"opt": "set", "key": "k", "value": "68656C6C6F"}), {"data": "ok"}
        )
        self.assertEqual(self.run_ok({"opt": "get", "key": "k"}), {"data": "68656c6c6f"})
        self.assertEqual(self.size(), 5)

    def test_binary_round_trip(self):
        """Every byte value survives a set and a get."""
        value = bytes(range(256))
        self.set("bin", value)
        self.assertEqual(self.run_ok({"opt": "get", "key": "bin"}), {"data": value.hex()})

    def test_get_missing(self):
        """Getting an unknown key fails with Go's load text."""
        self.assertEqual(
            self.run_error({"opt": "get", "key": "nope"}),
            "load data failed, please check if the key is correct or you have not set it",
        )

    def test_exist(self):
        """exist answers data true/false with exist_num 1/0."""
        self.assertEqual(
            self.run_ok({"opt": "exist", "key": "k"}), {"data": False, "exist_num": 0}
        )
        self.set("k", b"v")
        self.assertEqual(self.run_ok({"opt": "exist", "key": "k"}), {"data": True, "exist_num": 1})

    def test_delete(self):
        """del answers deleted_num 1 then 0, and frees the value's bytes."""
        self.set("a", b"aaaa")
        self.set("b", b"bb")
        self.assertEqual(
            self.run_ok({"opt": "del", "key": "a"}), {"data": "ok", "deleted_num": 1}
        )
        self.assertEqual(self.size(), 2)
        self.assertEqual(
            self.run_ok({"opt": "del", "key": "a"}), {"data": "ok", "deleted_num": 0}
        )
        self.assertEqual(self.run_error({"opt": "get", "key": "a"}), LOAD_FAILED)

    def test_set_without_value(self):
        """A set without value stores an empty value, as Go's zero string does."""
        self.assertEqual(self.run_ok({"opt": "set", "key": "k"}), {"data": "ok"})
        self.assertEqual(self.run_ok({"opt": "get", "key": "k"}), {"data": ""})
        self.assertEqual(self.run_ok({"opt": "set", "key": "n", "value": None}), {"data": "ok"})
        self.assertEqual(self.run_ok({"opt": "exist", "key": "n"}), {"data": True, "exist_num": 1})

    def test_overwrite(self):
        """A second set replaces the value and the total counts only the new one."""
        self.set("k", b"0123456789")
        self.set("k", b"ab")
        self.assertEqual(self.run_ok({"opt": "get", "key": "k"}), {"data": b"ab".hex()})
        self.assertEqual(self.size(), 2)

    def test_extra_fields_ignored(self):
        """The tenant_id, user_id and type the dispatcher writes into the request are ignored."""
        request = {
            "opt": "set", "key": "k", "value": "00", "tenant_id": T2, "user_id": "u",
            "type": "storage",
        }
        self.assertEqual(self.run_ok(request), {"data": "ok"})
        self.assertEqual(self.run_ok({"opt": "exist", "key": "k"}), {"data": True, "exist_num": 1})
        self.assertEqual(self.size(T2), 0)

    def test_isolation(self):
        """A value is seen only by the tenant and plugin that stored it."""
        self.set("k", b"mine")
        self.assertEqual(self.run_error({"opt": "get", "key": "k"}, tenant_id=T2), LOAD_FAILED)
        self.assertEqual(
            self.run_error({"opt": "get", "key": "k"}, plugin_id="acme/other"), LOAD_FAILED
        )
        self.assertEqual(
            self.run_ok({"opt": "del", "key": "k"}, tenant_id=T2),
            {"data": "ok", "deleted_num": 0},
        )
        self.assertEqual(self.run_ok({"opt": "get", "key": "k"}), {"data": b"mine".hex()})


class RequestTests(StorageCase):
    """Malformed requests fail with Go's decoding and validation texts."""

    def test_unknown_opt(self):
        """An unknown opt fails the storage_opt validation."""
        self.assertEqual(
            self.run_error({"opt": "list", "key": "k"}), validation(("Opt", "storage_opt"))
        )

    def test_missing_opt_and_key(self):
        """Missing opt and key are both reported, one line each, in field order."""
        self.assertEqual(
            self.run_error({}), validation(("Opt", "required"), ("Key", "required"))
        )

    def test_missing_or_empty_key(self):
        """An absent, null or empty key fails the required validation."""
        for request in ({"opt": "get"}, {"opt": "set", "key": None}, {"opt": "del", "key": ""}):
            self.assertEqual(self.run_error(request), validation(("Key", "required")))

    def test_key_not_a_string(self):
        """A key of another JSON type is a decoding error naming the field."""
        message = self.run_error({"opt": "get", "key": 12})
        self.assertEqual(
            message,
            "unmarshal backwards invoke request failed: error decoding map: 1 error(s) "
            "decoding:\n\n* 'key' expected type 'string', got unconvertible type 'float64'",
        )

    def test_parse(self):
        """parse_storage_request keeps the raw key and defaults value to empty text."""
        self.assertEqual(
            parse_storage_request({"opt": "exist", "key": "/a//b"}),
            StorageRequest(opt="exist", key="/a//b", value=""),
        )


class HexTests(StorageCase):
    """Values are hex, decoded as strictly as Go's hex.DecodeString."""

    def test_decode_hex(self):
        """Upper and lower case digits decode; the empty text is empty bytes."""
        self.assertEqual(decode_hex("00fFaB"), b"\x00\xff\xab")
        self.assertEqual(decode_hex(""), b"")

    def test_decode_hex_errors(self):
        """The first invalid byte is reported before an odd length, with Go's %#U text."""
        cases = {
            "zz": "encoding/hex: invalid byte: U+007A 'z'",
            "abc": "encoding/hex: odd length hex string",
            "0g1": "encoding/hex: invalid byte: U+0067 'g'",
            "ab\n": "encoding/hex: invalid byte: U+000A",
            "aa bb": "encoding/hex: invalid byte: U+0020 ' '",
            # a non-ASCII character is reported by its first UTF-8 byte
            "\u00e9\u00e9": "encoding/hex: invalid byte: U+00C3 '\u00c3'",
            "\u00a0": "encoding/hex: invalid byte: U+00C2 '\u00c2'",
        }
        for text, message in cases.items():
            with self.assertRaises(ValueError) as raised:
                decode_hex(text)
            self.assertEqual(str(raised.exception), message, text)

    def test_bad_hex_refused(self):
        """A set with bad hex fails with "decode data failed" and stores nothing."""
        self.assertEqual(
            self.run_error({"opt": "set", "key": "k", "value": "xyz1"}),
            "decode data failed: encoding/hex: invalid byte: U+0078 'x'",
        )
        self.assertEqual(self.run_ok({"opt": "exist", "key": "k"}), {"data": False, "exist_num": 0})


class KeyTests(StorageCase):
    """Keys are path-cleaned, traversal is refused and length is capped."""

    def test_clean_path_matches_go(self):
        """clean_path gives Go's path.Clean results (the cases of Go's own tests)."""
        cases = [
            ("", "."), ("abc", "abc"), ("abc/def", "abc/def"), (".", "."), ("..", ".."),
            ("../..", "../.."), ("../../abc", "../../abc"), ("/abc", "/abc"), ("/", "/"),
            ("abc/", "abc"), ("abc/def/", "abc/def"), ("./", "."), ("../", ".."),
            ("../../", "../.."), ("/abc/", "/abc"), ("abc//def//ghi", "abc/def/ghi"),
            ("//abc", "/abc"), ("///abc", "/abc"), ("//abc//", "/abc"), ("abc//", "abc"),
            ("abc/./def", "abc/def"), ("/./abc/def", "/abc/def"), ("abc/.", "abc"),
            ("abc/def/ghi/../jkl", "abc/def/jkl"), ("abc/def/../ghi/../jkl", "abc/jkl"),
            ("abc/def/..", "abc"), ("abc/def/../..", "."), ("/abc/def/../..", "/"),
            ("abc/def/../../..", ".."), ("/abc/def/../../..", "/"),
            ("abc/def/../../../ghi/jkl/../../../mno", "../../mno"), ("abc/./../def", "def"),
            ("abc//./../def", "def"), ("abc/../../././../def", "../../def"),
        ]
        for given, expected in cases:
            self.assertEqual(clean_path(given), expected, given)

    def test_equivalent_keys(self):
        """Keys that clean to the same path, with or without a leading slash, are one key."""
        self.set("a//b/./c/", b"v")
        for alias in ("a/b/c", "/a/b/c", "a/x/../b/c", "/../a/b/c"):
            self.assertEqual(self.run_ok({"opt": "get", "key": alias}), {"data": b"v".hex()})
        self.set("/a/b/c", b"w")
        self.assertEqual(self.size(), 1)

    def test_traversal_refused(self):
        """A cleaned key with '..', '//' or a backslash is refused by every operation."""
        for key in ("../x", "a/../../x", "a..b", "a\\b"):
            self.assertEqual(
                self.run_error({"opt": "set", "key": key, "value": "00"}),
                "save data failed: " + TRAVERSAL_TEXT,
            )
            self.assertEqual(
                self.run_error({"opt": "del", "key": key}), "delete data failed: " + TRAVERSAL_TEXT
            )
            self.assertEqual(
                self.run_error({"opt": "exist", "key": key}), "exist data failed: " + TRAVERSAL_TEXT
            )
            # Go replaces every load failure with one text
            self.assertEqual(self.run_error({"opt": "get", "key": key}), LOAD_FAILED)
        self.assertEqual(self.size(), 0)

    def test_key_length(self):
        """A key of 256 UTF-8 bytes is written; 257 bytes is refused on set, as in Go."""
        self.assertEqual(self.set("k" * 256, b"v"), {"data": "ok"})
        too_long = "\u00e9" * 129  # 129 characters, 258 bytes
        self.assertEqual(
            self.run_error({"opt": "set", "key": too_long, "value": "00"}),
            "save data failed: key length must be less than 256 characters",
        )
        self.assertEqual(
            self.run_error({"opt": "set", "key": "k" * 257, "value": "00"}),
            "save data failed: key length must be less than 256 characters",
        )
        # only writes are limited: reading a long key simply finds nothing
        self.assertEqual(
            self.run_ok({"opt": "exist", "key": "k" * 300}), {"data": False, "exist_num": 0}
        )

    def test_key_naming_nothing(self):
        """A key that cleans to '.' or '/' names no value: not writable, never found."""
        for key in (".", "/", "./", "a/.."):
            self.assertEqual(
                self.run_error({"opt": "set", "key": key, "value": "00"}),
                "save data failed: invalid key: the key names no value",
            )
            self.assertEqual(self.run_error({"opt": "get", "key": key}), LOAD_FAILED)
            self.assertEqual(
                self.run_ok({"opt": "exist", "key": key}), {"data": False, "exist_num": 0}
            )
            self.assertEqual(
                self.run_ok({"opt": "del", "key": key}), {"data": "ok", "deleted_num": 0}
            )

    def test_unstorable_key(self):
        """A key with NUL or a lone surrogate cannot be written and is never found."""
        for key in ("a\x00b", "a\ud800b"):
            self.assertEqual(
                self.run_error({"opt": "set", "key": key, "value": "00"}),
                "save data failed: invalid key: the key contains a character that cannot be stored",
            )
            self.assertEqual(
                self.run_ok({"opt": "exist", "key": key}), {"data": False, "exist_num": 0}
            )
            self.assertEqual(self.run_error({"opt": "get", "key": key}), LOAD_FAILED)


class QuotaTests(StorageCase):
    """The quota is min(manifest storage.size, PERSISTENCE_STORAGE_MAX_SIZE)."""

    max_size = 2048

    def test_quota_of(self):
        """None or negative means the daemon maximum; any other size is capped by it."""
        self.assertEqual(quota_of(None, 2048), 2048)
        self.assertEqual(quota_of(-1, 2048), 2048)
        self.assertEqual(quota_of(1024, 2048), 1024)
        self.assertEqual(quota_of(4096, 2048), 2048)
        self.assertEqual(quota_of(0, 2048), 0)

    def test_declared_size_limits(self):
        """With storage.size 1024 the 1025th byte is refused and nothing changes."""
        self.set("a", b"x" * 1000, declared_size=1024)
        self.set("b", b"x" * 24, declared_size=1024)
        self.assertEqual(
            self.run_error({"opt": "set", "key": "c", "value": "00"}, declared_size=1024),
            QUOTA_TEXT,
        )
        self.assertEqual(
            self.run_error(
                {"opt": "set", "key": "b", "value": (b"x" * 25).hex()}, declared_size=1024
            ),
            QUOTA_TEXT,
        )
        self.assertEqual(self.run_ok({"opt": "get", "key": "b"}), {"data": (b"x" * 24).hex()})
        self.assertEqual(self.size(), 1024)
        # freeing space makes room again
        self.run_ok({"opt": "del", "key": "b"})
        self.assertEqual(self.set("c", b"x" * 24, declared_size=1024), {"data": "ok"})

    def test_daemon_maximum_limits(self):
        """A manifest size above PERSISTENCE_STORAGE_MAX_SIZE is capped by it."""
        self.set("a", b"x" * 2048, declared_size=1073741824)
        self.assertEqual(
            self.run_error({"opt": "set", "key": "b", "value": "00"}, declared_size=1073741824),
            QUOTA_TEXT,
        )

    def test_no_declared_size(self):
        """Without a storage size in the manifest the daemon maximum is the quota."""
        self.set("a", b"x" * 2048, declared_size=None)
        self.assertEqual(
            self.run_error({"opt": "set", "key": "b", "value": "00"}, declared_size=None),
            QUOTA_TEXT,
        )

    def test_zero_declared_size(self):
        """A declared size of 0 admits only empty values, as in Go."""
        self.assertEqual(self.set("empty", b"", declared_size=0), {"data": "ok"})
        self.assertEqual(
            self.run_error({"opt": "set", "key": "k", "value": "00"}, declared_size=0), QUOTA_TEXT
        )

    def test_quota_per_plugin(self):
        """Each (tenant, plugin) has its own quota."""
        self.set("a", b"x" * 1024, declared_size=1024)
        self.assertEqual(self.set("a", b"x" * 1024, tenant_id=T2), {"data": "ok"})
        self.assertEqual(self.set("a", b"x" * 1024, plugin_id="acme/other"), {"data": "ok"})
        self.assertEqual(
            (self.size(), self.size(T2), self.size(plugin_id="acme/other")), (1024, 1024, 1024)
        )
