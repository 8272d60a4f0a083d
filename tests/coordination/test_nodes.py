"""NodeInfo, the advertised host, key names and value checks."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from difydaemon.coordination import coordination_for
from difydaemon.coordination.namespace import KeySpace, encode_value, plugin_digest, ttl_milliseconds
from difydaemon.coordination.nodes import NodeInfo, detect_advertise_host, new_node_id
from difydaemon.coordination.redis.endpoints import parse_sentinels
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.redis import redis_config


class NodeInfoTests(SynchronousTestCase):
    """A node record survives JSON and names its URL."""

    def test_round_trip(self):
        """to_json and from_json are inverse."""
        info = NodeInfo(new_node_id(), "10.0.0.5", 5002, 1.25, 2.5)
        self.assertEqual(NodeInfo.from_json(info.to_json()), info)

    def test_url(self):
        """The URL brackets IPv6 hosts."""
        self.assertEqual(NodeInfo("n", "10.0.0.5", 5002, 0, 0).url, "http://10.0.0.5:5002")
        self.assertEqual(NodeInfo("n", "fd00::5", 5002, 0, 0).url, "http://[fd00::5]:5002")

    def test_bad_record(self):
        """A text that is not a node record is a ValueError."""
        for text in ("{", "[]", '{"node_id": "n"}', '{"node_id": "", "host": "h", "port": 1, "started_at": 0, "heartbeat_at": 0}'):
            self.assertRaises(ValueError, NodeInfo.from_json, text)


class AdvertiseHostTests(SynchronousTestCase):
    """The host other replicas reach this one at."""

    def detect(self, advertise, server_host, addresses, name="pod-1"):
        return detect_advertise_host(advertise, server_host, hostname=lambda: name, resolve=lambda n: addresses)

    def test_configured_wins(self):
        """CLUSTER_ADVERTISE_HOST, when set, is used as given."""
        self.assertEqual(self.detect("daemon-1.svc", "127.0.0.1", ["10.0.0.5"]), "daemon-1.svc")

    def test_server_host(self):
        """A SERVER_HOST naming one address is what others reach."""
        self.assertEqual(self.detect(None, "127.0.0.2", ["10.0.0.5"]), "127.0.0.2")

    def test_host_name_address(self):
        """With a wildcard SERVER_HOST, the host name's first non-loopback address is used."""
        for wildcard in ("0.0.0.0", "::", ""):
            self.assertEqual(self.detect(None, wildcard, ["127.0.1.1", "10.0.0.5", "fd00::5"]), "10.0.0.5")

    def test_loopback_fallback(self):
        """With nothing better, loopback is advertised and a warning logged."""
        events = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertEqual(self.detect(None, "0.0.0.0", ["127.0.0.1", "::1"]), "127.0.0.1")
        self.assertTrue(any("CLUSTER_ADVERTISE_HOST is unset" in e.get("log_format", "") for e in events))


class NamespaceTests(SynchronousTestCase):
    """Key names and value encoding."""

    def test_keys(self):
        """Keys are <prefix>:difydaemon:<kind>:<name>; the prefix is trimmed, empty means the default."""
        self.assertEqual(KeySpace.for_prefix(" p ").key("kv", "a:b"), "p:difydaemon:kv:a:b")
        self.assertEqual(KeySpace.for_prefix("").root, "plugin_daemon:difydaemon:")
        self.assertEqual(KeySpace.for_prefix("p").name_of("chan", "p:difydaemon:chan:x"), "x")
        self.assertIsNone(KeySpace.for_prefix("p").name_of("chan", "q:difydaemon:chan:x"))

    def test_ttl(self):
        """ttls are whole milliseconds, rounded up, at least one."""
        self.assertEqual((ttl_milliseconds(1), ttl_milliseconds(0.0001), ttl_milliseconds(1.0001)), (1000, 1, 1001))
        for bad in (0, -1, True, "1", float("nan"), None):
            self.assertRaises(ValueError, ttl_milliseconds, bad)

    def test_values(self):
        """Values are compact JSON; integers beyond 64 bits are refused."""
        self.assertEqual(encode_value({"a": [1, "é"]}), '{"a":[1,"é"]}')
        self.assertRaises(ValueError, encode_value, 2**70)

    def test_plugin_digest(self):
        """A plugin's keys use the SHA-256 of its identifier."""
        self.assertEqual(plugin_digest("a/b:1@x"), "455779398861d605634ed5cb61d0af4599e4311aabd7929bbf84c8ea68599fb9")

    def test_sentinels(self):
        """Sentinels are host:port pairs, IPv6 in brackets."""
        self.assertEqual(parse_sentinels(["a:26379", "[fd00::1]:26380"]), (("a", 26379), ("fd00::1", 26380)))
        self.assertRaises(ValueError, parse_sentinels, ["a"])


class CoordinationForTests(SynchronousTestCase):
    """coordination_for picks memory or Redis from the configuration, and connects to nothing by itself."""

    def test_memory_without_redis_host(self):
        """Without REDIS_HOST the set is in memory."""
        from difydaemon.testing.redis import _BASE_ENVIRONMENT
        from difydaemon.config import load_config

        coordination = coordination_for(load_config(dict(_BASE_ENVIRONMENT)), MemoryReactorClock())
        self.assertFalse(coordination.uses_redis)
        self.successResultOf(coordination.close())

    def test_redis_when_host_set(self):
        """With REDIS_HOST the set is on Redis, and creating it neither connects nor schedules anything."""
        clock = MemoryReactorClock()
        coordination = coordination_for(redis_config(host="redis.invalid", port=6379, prefix="p"), clock)
        self.assertTrue(coordination.uses_redis)
        self.assertEqual((clock.tcpClients, clock.getDelayedCalls()), ([], []))
        self.successResultOf(coordination.close())
