"""Tests for difydaemon.runtimes.memory and the memory limit of LocalRuntime."""

from __future__ import annotations

from twisted.logger import LogLevel

from difydaemon.runtimes.local import LivenessPolicy
from difydaemon.runtimes.memory import (
    MAXIMUM_MEMORY_LIMIT,
    MINIMUM_MEMORY_LIMIT,
    declared_memory,
    memory_limit_of,
    memory_message,
    ran_out_of_memory,
)
from difydaemon.runtimes.parent_death import ParentDeathSignal
from difydaemon.testing.cases import SynchronousTestCase
from tests.runtimes.listeners import RecordingListener
from tests.runtimes.test_local import LocalRuntimeTestsMixin, request, session_line

LIMIT = 268435456
KILLED = ("error", "ConnectionClosedError", "plugin acme/echo was killed: over its memory limit of 256 MB", None)
MEMORY_ERROR = b'{"error_type":"MemoryError","message":"","args":{}}'


class HelperTests(SynchronousTestCase):
    """The pure helpers."""

    def test_limit_from_declaration(self):
        """resource.memory is the limit when it is a positive integer, else there is none."""
        self.assertEqual(memory_limit_of({"resource": {"memory": LIMIT}}), LIMIT)
        for declaration in ({}, {"resource": None}, {"resource": {"memory": 0}}, {"resource": {"memory": "1"}},
                            {"resource": {"memory": True}}, {"resource": {"memory": -5}}, None):
            self.assertIsNone(memory_limit_of(declaration), declaration)

    def test_placeholder_limit_not_enforced(self):
        """The official packages' 1 MiB, or anything under the floor, is declared but not enforced; the floor is."""
        official = {"resource": {"memory": 1048576}}
        self.assertEqual(declared_memory(official), 1048576)
        self.assertIsNone(memory_limit_of(official))
        self.assertIsNone(memory_limit_of({"resource": {"memory": MINIMUM_MEMORY_LIMIT - 1}}))
        self.assertEqual(memory_limit_of({"resource": {"memory": MINIMUM_MEMORY_LIMIT}}), MINIMUM_MEMORY_LIMIT)

    def test_limit_beyond_a_c_long_not_enforced(self):
        """A resource.memory the launcher's setrlimit cannot take (over 2**63 - 1) is no limit, not a crashed launch."""
        self.assertEqual(memory_limit_of({"resource": {"memory": MAXIMUM_MEMORY_LIMIT}}), MAXIMUM_MEMORY_LIMIT)
        self.assertIsNone(memory_limit_of({"resource": {"memory": MAXIMUM_MEMORY_LIMIT + 1}}))
        self.assertIsNone(memory_limit_of({"resource": {"memory": 2**64 - 1}}))  # a manifest may hold a uint64

    def test_message(self):
        """The caller's message names the plugin and the limit in MB."""
        self.assertEqual(memory_message("a/b", 100 * 1048576), "plugin a/b was killed: over its memory limit of 100 MB")

    def test_stderr_pattern(self):
        """A MemoryError traceback on stderr is running out of memory; other deaths are not."""
        self.assertTrue(ran_out_of_memory("Traceback (most recent call last):\n...\nMemoryError\n"))
        self.assertFalse(ran_out_of_memory("ImportError: no gevent\n"))


class LimitedRuntimeTests(LocalRuntimeTestsMixin, SynchronousTestCase):
    """A runtime with a memory limit launches with it and reports its breach."""

    def limited_runtime(self, **kwargs):
        kwargs.setdefault("parent_death", ParentDeathSignal("/daemon/python", getpid=lambda: 77))
        return self.started_runtime(memory_limit=LIMIT, liveness=LivenessPolicy(timeout=3600), **kwargs)

    def test_launched_with_the_limit(self):
        """Each instance is launched with data=<limit>."""
        self.limited_runtime()
        self.assertEqual(self.reactor.spawned[0].args[6], f"setsid,data={LIMIT}")

    def test_no_limit_without_launcher(self):
        """Without the launcher there is nothing to enforce the limit: none is claimed."""
        runtime = self.started_runtime(memory_limit=LIMIT)
        self.assertIsNone(runtime.memory_limit)

    def test_memory_error_kills_and_tells_every_caller(self):
        """A session's MemoryError kills the instance; all its sessions get the memory message."""
        runtime = self.limited_runtime()
        first, second = RecordingListener(), RecordingListener()
        runtime.open_session("s1", request("s1"), first)
        runtime.open_session("s2", request("s2"), second)
        self.process().stdout(session_line("s1", "error", MEMORY_ERROR))
        self.assertEqual((first.calls, second.calls), ([KILLED], [KILLED]))
        self.assertEqual(self.process().signals, ["KILL"])
        self.assertFalse(runtime.is_ready())
        self.assertTrue(
            any(e["log_level"] == LogLevel.error and "memory limit" in e["log_format"] for e in self.logged)
        )

    def test_restarted_with_the_memory_reason(self):
        """The killed instance is restarted, and the restart says why."""
        runtime = self.limited_runtime()
        runtime.open_session("s1", request("s1"), RecordingListener())
        self.process().stdout(session_line("s1", "error", MEMORY_ERROR))
        self.process().kill_by_signal(9)
        restarts = [e for e in self.logged if "restarting plugin" in e.get("log_format", "")]
        self.assertEqual([e["reason"] for e in restarts], [memory_message("acme/echo", LIMIT)])
        self.reactor.advance(1)
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_memory_kills_counted(self):
        """Each instance that ends over its limit counts once in ``memory_kills`` (read by /metrics); other exits do not."""
        runtime = self.limited_runtime()
        runtime.open_session("s1", request("s1"), RecordingListener())
        self.process().stdout(session_line("s1", "error", MEMORY_ERROR))
        self.process().kill_by_signal(9)
        self.assertEqual(runtime.memory_kills, 1)
        self.reactor.advance(1)
        self.process().exit(1)
        self.assertEqual(runtime.memory_kills, 1)

    def test_death_with_memory_error_on_stderr(self):
        """An instance that dies with MemoryError on stderr fails its sessions with the memory message."""
        runtime = self.limited_runtime()
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        self.process().stderr(b"Traceback (most recent call last):\nMemoryError\n")
        self.process().exit(1)
        self.assertEqual(listener.calls, [KILLED])

    def test_memory_error_without_limit_is_the_plugins_error(self):
        """Without a limit, a MemoryError is an ordinary plugin error and kills nothing."""
        runtime = self.started_runtime()
        listener = RecordingListener()
        runtime.open_session("s1", request("s1"), listener)
        self.process().stdout(session_line("s1", "error", MEMORY_ERROR))
        self.assertEqual(listener.calls, [("error", "MemoryError", "", {})])
        self.assertEqual(self.process().signals, [])
