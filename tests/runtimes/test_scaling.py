"""Tests for difydaemon.runtimes.scaling and the instance scaling of LocalRuntime."""

from __future__ import annotations

from difydaemon.runtimes.local import LivenessPolicy
from difydaemon.runtimes.scaling import ScalingPolicy
from difydaemon.testing.cases import SynchronousTestCase
from tests.runtimes.listeners import RecordingListener
from tests.runtimes.test_local import HEARTBEAT, MANIFEST, LocalRuntimeTestsMixin, request, session_line


class PolicyTests(SynchronousTestCase):
    """The pure decisions."""

    def test_bounds_checked(self):
        """A minimum below 1 or a maximum below the minimum is refused."""
        self.assertRaises(ValueError, ScalingPolicy, 0, 1)
        self.assertRaises(ValueError, ScalingPolicy, 2, 1)

    def test_scale_up_only_when_busier_than_instances(self):
        """One more instance when sessions outnumber instances, below the maximum, none starting."""
        policy = ScalingPolicy(1, 3)
        self.assertFalse(policy.scale_up(in_flight=1, instances=1, starting=0))
        self.assertTrue(policy.scale_up(in_flight=2, instances=1, starting=0))
        self.assertFalse(policy.scale_up(in_flight=5, instances=2, starting=1))
        self.assertFalse(policy.scale_up(in_flight=9, instances=3, starting=0))

    def test_scale_down_after_quiet_period_above_minimum(self):
        """One fewer after the quiet period, never below the minimum."""
        policy = ScalingPolicy(1, 3, scale_down_delay=60)
        self.assertFalse(policy.scale_down(instances=2, quiet_for=59))
        self.assertTrue(policy.scale_down(instances=2, quiet_for=60))
        self.assertFalse(policy.scale_down(instances=1, quiet_for=600))

    def test_fixed_count_does_not_scale(self):
        """Equal bounds: no scaling."""
        self.assertFalse(ScalingPolicy(2, 2).scales)
        self.assertTrue(ScalingPolicy(1, 2).scales)


class RuntimeScalingTests(LocalRuntimeTestsMixin, SynchronousTestCase):
    """A LocalRuntime starts instances under load and stops them after it."""

    def scaling_runtime(self, **kwargs):
        kwargs.setdefault("liveness", LivenessPolicy(timeout=10**6))
        kwargs.setdefault("session_timeout", None)
        return self.started_runtime(max_instances=3, scale_down_delay=60, **kwargs)

    def ready(self, index=-1):
        self.process(index).stdout(MANIFEST + HEARTBEAT)

    def test_busy_plugin_gets_more_instances_one_at_a_time(self):
        """A second concurrent session starts a second instance; no third while it starts."""
        runtime = self.scaling_runtime()
        runtime.open_session("s1", request("s1"), RecordingListener())
        self.assertEqual(len(self.reactor.spawned), 1)
        runtime.open_session("s2", request("s2"), RecordingListener())
        self.assertEqual(len(self.reactor.spawned), 2)
        runtime.open_session("s3", request("s3"), RecordingListener())
        self.assertEqual(len(self.reactor.spawned), 2)
        self.ready()
        self.assertEqual(len(runtime.ready_instances), 2)
        runtime.open_session("s4", request("s4"), RecordingListener())
        self.assertEqual(len(self.reactor.spawned), 3)
        self.ready()
        runtime.open_session("s5", request("s5"), RecordingListener())
        self.assertEqual(len(self.reactor.spawned), 3)

    def test_new_instance_takes_sessions(self):
        """Sessions opened after the new instance is ready reach it."""
        runtime = self.scaling_runtime()
        runtime.open_session("s1", request("s1"), RecordingListener())
        runtime.open_session("s2", request("s2"), RecordingListener())
        self.ready()
        runtime.open_session("s3", request("s3"), RecordingListener())
        runtime.open_session("s4", request("s4"), RecordingListener())
        self.assertTrue(self.stdin_lines(1))

    def test_quiet_plugin_scales_back_to_minimum(self):
        """After the quiet period an unused extra instance is TERMed, not restarted; the minimum stays."""
        runtime = self.scaling_runtime()
        runtime.open_session("s1", request("s1"), RecordingListener())
        runtime.open_session("s2", request("s2"), RecordingListener())
        self.ready()
        self.process(0).stdout(session_line("s1", "end"))
        self.process(0).stdout(session_line("s2", "end"))
        self.reactor.advance(59)
        self.assertEqual(self.process(1).signals, [])
        self.reactor.advance(1)
        self.assertEqual(self.process(1).signals, ["TERM"])
        self.assertEqual(runtime.ready_instances, [runtime.instances[0]])
        self.process(1).exit(0)
        self.reactor.advance(3600)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual(self.process(0).signals, [])
        self.assertEqual(len(runtime.instances), 1)

    def test_busy_instance_is_not_stopped(self):
        """An extra instance with a session open is not the one stopped."""
        runtime = self.scaling_runtime()
        runtime.open_session("s1", request("s1"), RecordingListener())
        runtime.open_session("s2", request("s2"), RecordingListener())
        self.ready()
        runtime.open_session("s3", request("s3"), RecordingListener())  # round-robin: instance 0
        runtime.open_session("s4", request("s4"), RecordingListener())  # instance 1; a third starts
        self.ready()
        for session in ("s1", "s2", "s3"):
            self.process(0).stdout(session_line(session, "end"))
        self.reactor.advance(60)
        # the third, never used, goes first; then the idle first one: one session needs one instance
        self.assertEqual([spawned.transport.signals for spawned in self.reactor.spawned], [[], [], ["TERM"]])
        self.process(2).exit(0)
        self.reactor.advance(600)
        self.assertEqual([spawned.transport.signals[:1] for spawned in self.reactor.spawned], [["TERM"], [], ["TERM"]])
        self.assertEqual(len(runtime.ready_instances), 1)

    def test_instance_stopped_while_starting_never_serves(self):
        """An extra instance retired before its first heartbeat stays out of the rotation."""
        runtime = self.scaling_runtime()
        runtime.open_session("s1", request("s1"), RecordingListener())
        runtime.open_session("s2", request("s2"), RecordingListener())
        for session in ("s1", "s2"):
            self.process(0).stdout(session_line(session, "end"))
        self.reactor.advance(60)
        self.assertEqual(self.process(1).signals, ["TERM"])
        self.ready(1)
        self.assertEqual(len(runtime.ready_instances), 1)

    def test_fixed_count_never_scales(self):
        """Without max_instances, load starts no instance."""
        runtime = self.started_runtime(liveness=LivenessPolicy(timeout=10**6))
        for number in range(5):
            runtime.open_session(f"s{number}", request(f"s{number}"), RecordingListener())
        self.assertEqual(len(self.reactor.spawned), 1)
