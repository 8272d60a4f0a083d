"""
Tests for difydaemon.runtimes.registry: the per-identifier supervision of
local plugins (launching, running, backing off), waiting for a runtime,
and the bounded shutdown -- with a fake factory and a fake clock.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from zope.interface.verify import verifyObject

from difydaemon.errors import InternalServerError
from difydaemon.interfaces import IRuntimeLauncher
from difydaemon.runtimes.registry import (
    BACKING_OFF,
    IDLE,
    LAUNCHING,
    RUNNING,
    SHUTDOWN_MESSAGE,
    RetryPolicy,
    RuntimeRegistry,
)
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.launchers import FakeRuntimeFactory

A = "acme/a:0.0.1@" + "a" * 64
B = "acme/b:0.0.1@" + "b" * 64


class _Runtime:
    """A runtime the test drives: readiness, giving up, how it was stopped."""

    def __init__(self, identifier, ready=True, instances=None, stops=True):
        self.plugin_unique_identifier = identifier
        self.ready = ready
        self.on_ready = None
        self.on_failed = None
        self.on_idle = None
        self.stop_calls = []
        self._stops = stops
        if instances is not None:
            self.instances = instances
            self.ready_instances = [i for i in instances if i.ready]

    def is_ready(self):
        return self.ready and not self.stop_calls

    def stop(self, drain_timeout=None, reason=None):
        self.stop_calls.append((drain_timeout, reason))
        return defer.succeed(None) if self._stops else defer.Deferred()

    def become_ready(self):
        self.ready = True
        self.on_ready(self)

    def give_up(self, message):
        self.ready = False
        self.on_failed(self, message)

    def go_idle(self):
        self.on_idle(self)


class _Instance:
    def __init__(self, pid, ready):
        self.pid = pid
        self.ready = ready


class _Factory(FakeRuntimeFactory):
    """The fake factory, bringing up :class:`_Runtime` by default."""

    def succeed(self, identifier, runtime=None):
        return super().succeed(identifier, runtime if runtime is not None else _Runtime(identifier))


class RegistryCase(SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.factory = _Factory(installed=[A])
        self.registry = RuntimeRegistry(self.clock, self.factory)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def install(self, identifier):
        return self.registry.launch(identifier, {}, b"", lambda line: None)

    def running(self, identifier=A):
        """Restore ``identifier`` and let it come up; its runtime."""
        self.successResultOf(self.registry.start())
        return self.factory.succeed(identifier)

    def backing_off(self, message="no network"):
        """Restore A and fail it once."""
        self.successResultOf(self.registry.start())
        self.factory.fail(A, message)


class LauncherTests(RegistryCase):
    """Installs: shared attempts, first failures forgotten, uninstall."""

    def test_provides_launcher(self):
        """The registry is an IRuntimeLauncher."""
        self.assertTrue(verifyObject(IRuntimeLauncher, self.registry))

    def test_concurrent_launches_share_one(self):
        """Two launches of one identifier start it once and both see the outcome."""
        first, second = self.install(B), self.install(B)
        self.assertEqual(self.factory.attempts, [(B, "install")])
        runtime = self.factory.succeed(B)
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertIs(self.registry.get(B), runtime)
        self.assertEqual(self.registry.pool_status(), {"free": 1, "busy": 0, "total": 1})

    def test_failed_first_install_leaves_nothing(self):
        """A first install that fails leaves no record and no retry; a later launch tries again."""
        first, second = self.install(B), self.install(B)
        self.factory.fail(B, "boom")
        self.assertEqual(self.failureResultOf(first, InternalServerError).value.message, "boom")
        self.failureResultOf(second, InternalServerError)
        self.assertIsNone(self.registry.get(B))
        self.assertIsNone(self.registry.status(B))
        self.assertEqual(self.registry.pool_status()["total"], 0)
        self.clock.advance(3600)
        self.assertEqual(self.factory.count(B), 1)
        self.install(B)
        self.assertEqual(self.factory.count(B), 2)

    def test_abandoned_install_cancels_its_launch(self):
        """When the only install waiting for a first launch gives up (timeout), the launch is cancelled."""
        waiting = self.install(B)
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.factory.cancelled, [B])
        self.assertIsNone(self.registry.status(B))

    def test_stop_stops_and_discards(self):
        """stop() stops the runtime and discards its files."""
        self.install(B)
        runtime = self.factory.succeed(B)
        self.successResultOf(self.registry.stop(B))
        self.assertEqual(runtime.stop_calls, [(None, None)])
        self.assertEqual(self.factory.discarded, [B])
        self.assertIsNone(self.registry.get(B))
        self.assertIsNone(self.registry.status(B))

    def test_uninstall_during_attempt_stops_what_comes_up(self):
        """A plugin uninstalled while it starts is stopped when it comes up, and never registered."""
        waiting = self.install(B)
        self.successResultOf(self.registry.stop(B))
        runtime = self.factory.succeed(B)
        self.assertEqual(runtime.stop_calls, [(None, None)])
        self.assertIsNone(self.registry.get(B))
        self.assertIn("uninstalled", self.failureResultOf(waiting, InternalServerError).value.message)

    def test_uninstall_while_backing_off_stops_the_retries(self):
        """Uninstalling a plugin that is backing off drops it: no retry comes, waits fail saying why."""
        self.backing_off()
        waiting = self.registry.when_ready(A, 120)
        self.successResultOf(self.registry.stop(A))
        message = self.failureResultOf(waiting, InternalServerError).value.message
        self.assertEqual(message, "failed to get plugin runtime: the plugin was uninstalled")
        self.clock.advance(3600)
        self.assertEqual(self.factory.count(A), 1)
        self.assertIsNone(self.registry.status(A))

    def test_register_and_unregister(self):
        """Debug runtimes register themselves; unregister only removes the same object."""
        runtime = _Runtime("u/p:0.0.1@" + "5" * 64)
        self.registry.register(runtime)
        self.registry.unregister(_Runtime("u/p:0.0.1@" + "5" * 64))
        self.assertIs(self.registry.get(runtime.plugin_unique_identifier), runtime)
        self.registry.unregister(runtime)
        self.assertIsNone(self.registry.get(runtime.plugin_unique_identifier))


class RestoreTests(RegistryCase):
    """Daemon start: installed plugins come back in the background, each on its own."""

    def test_each_registered_as_soon_as_up(self):
        """Of two restored plugins, the first up is served while the second still starts."""
        self.factory = _Factory(installed=[A, B])
        self.registry = RuntimeRegistry(self.clock, self.factory)
        self.successResultOf(self.registry.start())
        self.assertEqual(self.factory.attempts, [(A, "installed"), (B, "installed")])
        self.assertEqual(self.registry.status(A).state, LAUNCHING)
        self.assertEqual(self.registry.pool_status(), {"free": 0, "busy": 2, "total": 2})
        runtime = self.factory.succeed(A)
        self.assertIs(self.registry.get(A), runtime)
        self.assertEqual(self.registry.status(A).state, RUNNING)
        self.assertEqual(self.registry.pool_status(), {"free": 1, "busy": 1, "total": 2})

    def test_start_does_not_wait(self):
        """start() fires at once, whatever the plugins do."""
        self.successResultOf(self.registry.start())
        self.assertIn(A, self.factory.pending)


class RestoreIdleTests(RegistryCase):
    """With idle stop on, restored plugins wait idle for their first request instead of all launching at start."""

    def setUp(self):
        super().setUp()
        self.factory = _Factory(installed=[A, B])
        self.registry = RuntimeRegistry(self.clock, self.factory, restore_idle=True)

    def test_restored_plugins_start_idle(self):
        """start() launches nothing: each installed plugin is supervised, idle (not launching), and counts as neither free nor busy."""
        self.successResultOf(self.registry.start())
        self.assertEqual(self.factory.attempts, [])
        self.assertEqual((self.registry.status(A).state, self.registry.status(B).state), (IDLE, IDLE))
        self.assertIsNone(self.registry.get(A))
        self.assertEqual(self.registry.pool_status(), {"free": 0, "busy": 0, "total": 0})
        self.assertEqual((self.registry.launching(), sorted(self.registry.idle())), ([], sorted([A, B])))

    def test_first_request_launches_only_its_plugin(self):
        """A wait for a restored plugin launches that one at once, and it serves the wait."""
        self.successResultOf(self.registry.start())
        waiting = self.registry.when_ready(B, 120)
        self.assertEqual(self.factory.attempts, [(B, "installed")])
        runtime = self.factory.succeed(B)
        self.assertIs(self.successResultOf(waiting), runtime)
        self.assertEqual((self.registry.status(A).state, self.registry.status(B).state), (IDLE, RUNNING))

    def test_request_before_the_restore_launches_once(self):
        """A plugin a request launched before the restore listed it is not made idle or launched again."""
        waiting = self.registry.when_ready(A, 120)
        self.successResultOf(self.registry.start())
        self.assertEqual(self.factory.attempts, [(A, "installed")])
        self.assertEqual(self.registry.status(A).state, LAUNCHING)
        runtime = self.factory.succeed(A)
        self.assertIs(self.successResultOf(waiting), runtime)

    def test_uninstalling_a_restored_idle_plugin(self):
        """An uninstall of a plugin restored idle forgets it and discards its files, launching nothing."""
        self.successResultOf(self.registry.start())
        self.successResultOf(self.registry.stop(A))
        self.assertIsNone(self.registry.status(A))
        self.assertEqual(self.factory.attempts, [])
        self.assertIn(A, self.factory.discarded)


class BackoffTests(RegistryCase):
    """A failed plugin is retried with a capped backoff, for ever, and says why."""

    def test_failure_is_kept_with_its_reason(self):
        """A failed restore is backing off, with the failure's message and the next attempt's time."""
        self.backing_off("installing dependencies failed: no network")
        status = self.registry.status(A)
        self.assertEqual(
            (status.state, status.failures, status.last_error, status.next_attempt_at),
            (BACKING_OFF, 1, "installing dependencies failed: no network", 1.0),
        )
        self.assertEqual(self.registry.pool_status(), {"free": 0, "busy": 1, "total": 1})
        self.assertTrue(
            any(
                e["log_level"] == LogLevel.error and e.get("reason") == "installing dependencies failed: no network"
                for e in self.logged
            )
        )

    def test_delays_double_up_to_five_minutes(self):
        """Retries come after 1, 2, 4 ... s, capped at 300 s, and never stop."""
        self.backing_off()
        delays = []
        for _ in range(12):
            delays.append(round(self.registry.status(A).next_attempt_at - self.clock.seconds(), 6))
            self.clock.advance(delays[-1] - 0.01)
            self.assertNotIn(A, self.factory.pending)
            self.clock.advance(0.02)
            self.factory.fail(A, "still broken")
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300])
        self.assertEqual(self.registry.status(A).failures, 13)

    def test_fixed_cause_brings_it_back(self):
        """When a retry succeeds the plugin runs again and the failure count is cleared."""
        self.backing_off()
        self.clock.advance(1)
        runtime = self.factory.succeed(A)
        self.assertIs(self.registry.get(A), runtime)
        status = self.registry.status(A)
        self.assertEqual((status.state, status.failures, status.last_error), (RUNNING, 0, None))

    def test_runtime_that_gives_up_is_launched_again(self):
        """A runtime that gave up restarting is dropped, stopped, and launched again after the backoff."""
        runtime = self.running()
        runtime.give_up("plugin acme/a failed to start 5 times in a row. Last failure: ImportError")
        self.assertIsNone(self.registry.get(A))
        self.assertEqual(runtime.stop_calls, [(None, None)])
        status = self.registry.status(A)
        self.assertEqual((status.state, status.failures), (BACKING_OFF, 1))
        self.assertIn("ImportError", status.last_error)
        self.clock.advance(1)
        self.assertEqual(self.factory.count(A), 2)


class InstallAgainTests(RegistryCase):
    """An install of an identifier that is failed reports the real outcome."""

    def test_install_of_backing_off_identifier_tries_now_and_fails(self):
        """Installing for a second workspace retries at once and fails with the real reason."""
        self.backing_off()
        installing = self.install(A)
        self.assertEqual(self.factory.attempts[-1], (A, "install"))
        self.factory.fail(A, "starting the plugin failed: ImportError")
        failure = self.failureResultOf(installing, InternalServerError)
        self.assertEqual(failure.value.message, "starting the plugin failed: ImportError")
        self.assertEqual(self.registry.status(A).failures, 2)

    def test_install_of_backing_off_identifier_succeeds_when_it_comes_up(self):
        """The retry an install makes registers the runtime when it comes up."""
        self.backing_off()
        installing = self.install(A)
        runtime = self.factory.succeed(A)
        self.successResultOf(installing)
        self.assertIs(self.registry.get(A), runtime)

    def test_install_of_running_identifier_succeeds_at_once(self):
        """An identifier already running needs no new attempt."""
        self.running()
        self.successResultOf(self.install(A))
        self.assertEqual(self.factory.count(A), 1)

    def test_install_while_launching_shares_the_attempt(self):
        """An install during a restore waits for the same attempt."""
        self.successResultOf(self.registry.start())
        installing = self.install(A)
        self.assertEqual(self.factory.count(A), 1)
        self.factory.succeed(A)
        self.successResultOf(installing)


class WaitTests(RegistryCase):
    """when_ready: wait for a plugin that starts, bounded, and say why it is not there."""

    def test_ready_runtime_at_once(self):
        """A ready runtime is handed over synchronously."""
        runtime = self.running()
        self.assertIs(self.successResultOf(self.registry.when_ready(A, 120)), runtime)

    def test_waits_for_a_plugin_starting(self):
        """A wait during the restore fires when the plugin is up."""
        self.successResultOf(self.registry.start())
        waiting = self.registry.when_ready(A, 120)
        self.clock.advance(30)
        self.assertNoResult(waiting)
        runtime = self.factory.succeed(A)
        self.assertIs(self.successResultOf(waiting), runtime)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_wait_times_out_saying_it_still_starts(self):
        """A plugin still starting at the wait's end: 'still starting', at the timeout, not before."""
        self.successResultOf(self.registry.start())
        waiting = self.registry.when_ready(A, 120)
        self.clock.advance(119.9)
        self.assertNoResult(waiting)
        self.clock.advance(0.1)
        message = self.failureResultOf(waiting, InternalServerError).value.message
        self.assertEqual(message, f"failed to get plugin runtime: plugin {A} is still starting")

    def test_backing_off_plugin_is_tried_on_demand(self):
        """A wait for a plugin backing off (next try in 60 s) tries now, and gets the attempt's outcome."""
        self.registry = RuntimeRegistry(self.clock, self.factory, retry_policy=RetryPolicy(min_delay=60))
        self.backing_off()
        self.clock.advance(10)
        waiting = self.registry.when_ready(A, 120)
        self.assertEqual(self.factory.count(A), 2)
        runtime = self.factory.succeed(A)
        self.assertIs(self.successResultOf(waiting), runtime)

    def test_failed_on_demand_attempt_fails_the_wait_with_its_reason(self):
        """When the attempt a wait asked for fails, the wait fails at once with that failure's message."""
        self.registry = RuntimeRegistry(self.clock, self.factory, retry_policy=RetryPolicy(min_delay=60))
        self.backing_off()
        self.clock.advance(10)
        waiting = self.registry.when_ready(A, 120)
        self.factory.fail(A, "installing dependencies from requirements.txt failed: no network")
        message = self.failureResultOf(waiting, InternalServerError).value.message
        self.assertEqual(
            message, "failed to get plugin runtime: installing dependencies from requirements.txt failed: no network"
        )

    def test_on_demand_attempts_are_spaced(self):
        """Right after a failure an on-demand attempt waits until on_demand_interval has passed."""
        self.registry = RuntimeRegistry(
            self.clock, self.factory, retry_policy=RetryPolicy(min_delay=60, on_demand_interval=5)
        )
        self.backing_off()
        self.clock.advance(1)
        waiting = self.registry.when_ready(A, 120)
        self.assertEqual(self.factory.count(A), 1)
        self.clock.advance(3.9)
        self.assertEqual(self.factory.count(A), 1)
        self.clock.advance(0.1)
        self.assertEqual(self.factory.count(A), 2)
        self.factory.succeed(A)
        self.successResultOf(waiting)

    def test_flood_of_requests_makes_one_attempt(self):
        """A thousand waits for a broken plugin make one attempt, and each gets its failure."""
        self.registry = RuntimeRegistry(self.clock, self.factory, retry_policy=RetryPolicy(min_delay=60))
        self.backing_off()
        self.clock.advance(10)
        waits = [self.registry.when_ready(A, 120) for _ in range(1000)]
        self.assertEqual(self.factory.count(A), 2)
        self.factory.fail(A, "broken")
        for waiting in waits:
            self.failureResultOf(waiting, InternalServerError)
        more = [self.registry.when_ready(A, 120) for _ in range(1000)]
        self.assertEqual(self.factory.count(A), 2)
        self.clock.advance(5)
        self.assertEqual(self.factory.count(A), 3)
        self.factory.fail(A, "broken")
        for waiting in more:
            self.failureResultOf(waiting, InternalServerError)

    def test_backing_off_message_says_why_and_when(self):
        """A wait that ends while backing off names the failures, the next attempt and the last failure."""
        self.registry = RuntimeRegistry(
            self.clock, self.factory, retry_policy=RetryPolicy(min_delay=60, on_demand_interval=30)
        )
        self.backing_off("ImportError: no gevent")
        waiting = self.registry.when_ready(A, 10)
        self.clock.advance(10)
        message = self.failureResultOf(waiting, InternalServerError).value.message
        self.assertEqual(
            message,
            f"failed to get plugin runtime: plugin {A} failed to start 1 time(s) in a row;"
            " next attempt in 20 s; last failure: ImportError: no gevent",
        )

    def test_installed_but_unknown_plugin_is_launched_on_demand(self):
        """A wait for an identifier the registry does not know launches it from storage."""
        self.registry = RuntimeRegistry(self.clock, self.factory)
        waiting = self.registry.when_ready(B, 120)
        self.assertEqual(self.factory.attempts, [(B, "installed")])
        runtime = self.factory.succeed(B)
        self.assertIs(self.successResultOf(waiting), runtime)

    def test_not_a_local_plugin_fails_at_once(self):
        """A wait for an identifier that is not a local plugin (a gone debug plugin) fails at once."""
        self.factory.not_local.add(B)
        waiting = self.registry.when_ready(B, 120)
        message = self.failureResultOf(waiting, InternalServerError).value.message
        self.assertEqual(message, f"failed to get plugin runtime: plugin {B} is not running")
        self.assertIsNone(self.registry.status(B))

    def test_restarting_runtime_wakes_waits_when_ready(self):
        """A wait for a running plugin whose instance restarts fires when the runtime says it is ready."""
        runtime = self.running()
        runtime.ready = False
        waiting = self.registry.when_ready(A, 120)
        self.assertNoResult(waiting)
        runtime.become_ready()
        self.assertIs(self.successResultOf(waiting), runtime)

    def test_registered_runtime_wakes_waits(self):
        """Registering a runtime (a debug plugin connecting) hands it to those waiting."""
        registry = RuntimeRegistry(self.clock)
        waiting = registry.when_ready(B, 120)
        runtime = _Runtime(B)
        registry.register(runtime)
        self.assertIs(self.successResultOf(waiting), runtime)

    def test_gone_debug_plugin_fails_waits_at_once(self):
        """When the runtime waited for unregisters (a debug plugin disconnects), the waits fail at once."""
        runtime = _Runtime(B, ready=False)
        self.factory.not_local.add(B)
        self.registry.register(runtime)
        waiting = self.registry.when_ready(B, 120)
        self.assertNoResult(waiting)
        self.registry.unregister(runtime)
        message = self.failureResultOf(waiting, InternalServerError).value.message
        self.assertEqual(message, f"failed to get plugin runtime: plugin {B} is not running")

    def test_cancelled_wait_leaves_no_timer(self):
        """A cancelled wait (the caller went away) leaves nothing scheduled."""
        registry = RuntimeRegistry(self.clock)
        waiting = registry.when_ready(B, 120)
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PoolStatusTests(RegistryCase):
    """pool_status counts instances, and plugins that do not serve as busy."""

    def test_counts_instances(self):
        """Of two instances one is hung: one free, one busy; a plugin backing off is busy too."""
        self.factory = _Factory(installed=[A, B])
        self.registry = RuntimeRegistry(self.clock, self.factory)
        self.successResultOf(self.registry.start())
        self.factory.succeed(A, _Runtime(A, instances=[_Instance(1, True), _Instance(2, False)]))
        self.factory.fail(B, "broken")
        self.assertEqual(self.registry.pool_status(), {"free": 1, "busy": 2, "total": 3})

    def test_not_ready_runtime_is_busy(self):
        """A runtime that is not ready has no free instance."""
        runtime = _Runtime(A, instances=[_Instance(1, True)])
        self.successResultOf(self.registry.start())
        self.factory.succeed(A, runtime)
        runtime.ready = False
        self.assertEqual(self.registry.pool_status(), {"free": 0, "busy": 1, "total": 1})


class StopAllTests(RegistryCase):
    """Daemon shutdown: bounded, in parallel, with the reason given to open sessions."""

    def test_runtimes_drain_for_the_grace_period_with_the_reason(self):
        """Every runtime is stopped at once with the grace period and the shutdown message."""
        self.factory = _Factory(installed=[A, B])
        self.registry = RuntimeRegistry(self.clock, self.factory, shutdown_grace_period=8)
        self.successResultOf(self.registry.start())
        first, second = self.factory.succeed(A), self.factory.succeed(B)
        self.successResultOf(self.registry.stop_all())
        self.assertEqual(first.stop_calls, [(8, SHUTDOWN_MESSAGE)])
        self.assertEqual(second.stop_calls, [(8, SHUTDOWN_MESSAGE)])

    def test_bounded_whatever_the_plugins_do(self):
        """A runtime that never stops does not hold the shutdown past grace + stop_timeout."""
        registry = RuntimeRegistry(self.clock, self.factory, shutdown_grace_period=8, stop_timeout=3)
        self.successResultOf(registry.start())
        self.factory.succeed(A, _Runtime(A, stops=False))
        stopped = registry.stop_all()
        self.clock.advance(10.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.assertTrue(any(e["log_level"] == LogLevel.error and "still running" in e["log_format"] for e in self.logged))

    def test_attempts_cancelled_timers_dropped_waits_failed(self):
        """Attempts under way are cancelled, retries dropped, waits failed, and nothing new starts."""
        self.factory = _Factory(installed=[A, B])
        self.registry = RuntimeRegistry(self.clock, self.factory)
        self.successResultOf(self.registry.start())
        self.factory.fail(B, "broken")
        waiting = self.registry.when_ready(A, 120)
        stopped = self.registry.stop_all()
        self.assertEqual(self.factory.cancelled, [A])
        message = self.failureResultOf(waiting, InternalServerError).value.message
        self.assertEqual(message, "failed to get plugin runtime: the plugin daemon is shutting down")
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(self.registry.when_ready(A, 120), InternalServerError)
        self.failureResultOf(self.install(B), InternalServerError)
        self.assertEqual(self.factory.count(B), 1)


class IdleTests(RegistryCase):
    """A runtime stopped for idleness is launched again by the next request, which waits for it."""

    def test_idle_runtime_leaves_the_table_and_is_stopped(self):
        """An idle runtime is unregistered at once and stopped; the record says idle, nothing is busy."""
        runtime = self.running()
        runtime.go_idle()
        self.assertIsNone(self.registry.get(A))
        self.assertEqual(runtime.stop_calls, [(None, None)])
        self.assertEqual(self.registry.status(A).state, IDLE)
        self.assertEqual(self.registry.pool_status(), {"free": 0, "busy": 0, "total": 0})
        self.assertEqual((self.registry.launching(), self.registry.idle()), ([], [A]))
        self.assertEqual(self.factory.count(A), 1)

    def test_next_request_launches_again_and_waits(self):
        """A wait for an idle plugin launches it at once and gets the new runtime."""
        old = self.running()
        old.go_idle()
        waiting = self.registry.when_ready(A, 120)
        self.assertEqual(self.factory.attempts, [(A, "installed"), (A, "installed")])
        self.assertNoResult(waiting)
        new = self.factory.succeed(A)
        self.assertIs(self.successResultOf(waiting), new)
        self.assertIs(self.registry.get(A), new)
        self.assertEqual(self.registry.status(A).state, RUNNING)

    def test_request_during_the_idle_stop_starts_a_new_runtime(self):
        """A request arriving while the idle runtime is still stopping waits for a new one, not the old."""
        old = _Runtime(A, stops=False)
        self.successResultOf(self.registry.start())
        self.factory.succeed(A, old)
        old.go_idle()
        waiting = self.registry.when_ready(A, 120)
        self.assertEqual(self.factory.count(A), 2)
        new = self.factory.succeed(A)
        self.assertIs(self.successResultOf(waiting), new)

    def test_many_waits_make_one_launch(self):
        """A burst of requests for an idle plugin launches it once and all get it."""
        self.running().go_idle()
        waits = [self.registry.when_ready(A, 120) for _ in range(20)]
        self.assertEqual(self.factory.count(A), 2)
        new = self.factory.succeed(A)
        self.assertEqual({id(self.successResultOf(wait)) for wait in waits}, {id(new)})

    def test_idle_from_a_replaced_runtime_is_ignored(self):
        """An idle report from a runtime no longer registered changes nothing."""
        old = self.running()
        self.registry.stop(A)
        old.go_idle()
        self.assertIsNone(self.registry.status(A))

    def test_shutdown_waits_for_idle_stops(self):
        """stop_all waits (bounded) for the processes of a plugin stopped for idleness."""
        stopping = defer.Deferred()
        old = _Runtime(A)
        old.stop = lambda drain_timeout=None, reason=None: stopping
        self.successResultOf(self.registry.start())
        self.factory.succeed(A, old)
        old.go_idle()
        stopped = self.registry.stop_all()
        self.assertNoResult(stopped)
        stopping.callback(None)
        self.successResultOf(stopped)

    def test_install_of_idle_plugin_launches_it(self):
        """An install of an identifier stopped for idleness brings it up again."""
        self.running().go_idle()
        installing = self.install(A)
        self.assertEqual(self.factory.attempts[-1], (A, "install"))
        self.factory.succeed(A)
        self.assertIsNone(self.successResultOf(installing))


class ClusterTests(SynchronousTestCase):
    """What other replicas' news does to the registry: prepare, reconcile, claims."""

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.factory = FakeRuntimeFactory()
        self.registry = RuntimeRegistry(self.clock, self.factory)

    def test_prepare_launches_once(self):
        """An identifier installed elsewhere is launched from storage once, however often it is announced."""
        self.registry.prepare(A)
        self.registry.prepare(A)
        self.assertEqual(self.factory.attempts, [(A, "installed")])
        self.factory.succeed(A, _Runtime(A))
        self.registry.prepare(A)
        self.assertEqual(self.factory.count(A), 1)

    def test_reconcile_starts_missing_and_stops_absent_twice(self):
        """Reconciliation launches what is installed and stops a local plugin only when two in a row miss it."""
        self.registry.prepare(B)
        runtime = self.factory.succeed(B, _Runtime(B))
        self.successResultOf(self.registry.reconcile([A]))
        self.assertIn((A, "installed"), self.factory.attempts)
        self.assertEqual(runtime.stop_calls, [])
        self.successResultOf(self.registry.reconcile([A]))
        self.assertEqual(len(runtime.stop_calls), 1)
        self.assertIsNone(self.registry.get(B))
        self.assertEqual(self.factory.discarded, [B])

    def test_reconcile_forgets_a_plugin_seen_again(self):
        """A plugin missing from one list but present in the next is not stopped by the one after."""
        self.registry.prepare(B)
        runtime = self.factory.succeed(B, _Runtime(B))
        self.successResultOf(self.registry.reconcile([]))
        self.successResultOf(self.registry.reconcile([B]))
        self.successResultOf(self.registry.reconcile([]))
        self.assertEqual(runtime.stop_calls, [])

    def test_listeners_told_of_debug_runtimes(self):
        """Registering and unregistering a debug runtime tells the listeners; a replaced runtime's unregister does not."""
        told = []

        class Listener:
            def registered(self, runtime):
                told.append(("registered", runtime))

            def unregistered(self, runtime):
                told.append(("unregistered", runtime))

        self.registry.listeners.append(Listener())
        first, second = _Runtime(A), _Runtime(A)
        self.registry.register(first)
        self.registry.register(second)
        self.registry.unregister(first)
        self.registry.unregister(second)
        self.assertEqual(told, [("registered", first), ("registered", second), ("unregistered", second)])


class IdleClusterTests(SynchronousTestCase):
    """With idle stop on, a plugin installed elsewhere or found missing is built ahead but not launched."""

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.factory = FakeRuntimeFactory()
        self.registry = RuntimeRegistry(self.clock, self.factory, restore_idle=True)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def test_prepare_builds_and_stays_idle(self):
        """prepare() builds once, however often it is announced, and leaves the plugin idle with no runtime."""
        self.registry.prepare(A)
        self.registry.prepare(A)
        self.assertEqual(self.factory.attempts, [(A, "build")])
        self.factory.succeed(A, None)
        self.registry.prepare(A)
        self.assertEqual(self.factory.attempts, [(A, "build")])
        self.assertEqual(self.registry.status(A).state, IDLE)
        self.assertIsNone(self.registry.get(A))
        self.assertEqual(self.registry.pool_status(), {"free": 0, "busy": 0, "total": 0})

    def test_first_request_launches_the_built_plugin(self):
        """The first wait for a built idle plugin launches it and is served by it."""
        self.registry.prepare(A)
        self.factory.succeed(A, None)
        waiting = self.registry.when_ready(A, 120)
        runtime = self.factory.succeed(A, _Runtime(A))
        self.assertIs(self.successResultOf(waiting), runtime)
        self.assertEqual(self.factory.attempts, [(A, "build"), (A, "installed")])
        self.assertEqual(self.registry.status(A).state, RUNNING)

    def test_request_during_the_build_launches_after_it(self):
        """A request arriving while the plugin builds launches it once the build ends, never two at once."""
        self.registry.prepare(A)
        waiting = self.registry.when_ready(A, 120)
        self.assertEqual(self.factory.attempts, [(A, "build")])
        self.assertEqual(self.registry.status(A).state, LAUNCHING)
        self.factory.succeed(A, None)
        self.assertEqual(self.factory.attempts, [(A, "build"), (A, "installed")])
        runtime = self.factory.succeed(A, _Runtime(A))
        self.assertIs(self.successResultOf(waiting), runtime)

    def test_install_here_during_the_build_waits_for_it(self):
        """An install of the same identifier through this replica while it builds launches only once the build ends."""
        self.registry.prepare(A)
        installing = self.registry.launch(A, {}, b"", lambda line: None)
        self.assertEqual(self.factory.attempts, [(A, "build")])
        self.factory.succeed(A, None)
        self.assertEqual(self.factory.attempts, [(A, "build"), (A, "install")])
        self.factory.succeed(A, _Runtime(A))
        self.successResultOf(installing)
        self.assertEqual(self.registry.status(A).state, RUNNING)

    def test_failed_build_is_logged_and_the_request_launches(self):
        """A failed build is logged as a warning, leaves the plugin idle, and its first request launches it anyway."""
        self.registry.prepare(A)
        self.factory.fail(A, "no network")
        self.assertEqual(self.registry.status(A).state, IDLE)
        self.assertTrue(any(
            event.get("log_level") == LogLevel.warn and event.get("reason") == "no network" for event in self.logged
        ))
        waiting = self.registry.when_ready(A, 120)
        runtime = self.factory.succeed(A, _Runtime(A))
        self.assertIs(self.successResultOf(waiting), runtime)

    def test_uninstall_during_the_build_cancels_it(self):
        """An uninstall while the plugin builds cancels the build, fails the waiting request, and launches nothing."""
        self.registry.prepare(A)
        waiting = self.registry.when_ready(A, 120)
        self.successResultOf(self.registry.stop(A))
        self.assertEqual(self.factory.cancelled, [A])
        self.failureResultOf(waiting, InternalServerError)
        self.assertEqual(self.factory.attempts, [(A, "build")])
        self.assertEqual(self.factory.discarded, [A])
        self.assertIsNone(self.registry.status(A))

    def test_shutdown_during_the_build_launches_nothing(self):
        """The daemon's stop cancels a build under way, and a request that waited for it launches nothing."""
        self.registry.prepare(A)
        waiting = self.registry.when_ready(A, 120)
        stopped = self.registry.stop_all()
        self.successResultOf(stopped)
        self.assertEqual(self.factory.cancelled, [A])
        self.assertEqual(self.factory.attempts, [(A, "build")])
        self.failureResultOf(waiting)

    def test_reconcile_builds_missing_and_still_stops_absent(self):
        """Reconciliation leaves a missing plugin built and idle, and still stops one absent twice in a row."""
        self.registry.prepare(B)
        self.factory.succeed(B, None)
        self.successResultOf(self.registry.reconcile([A]))
        self.assertEqual(self.factory.attempts, [(B, "build"), (A, "build")])
        self.factory.succeed(A, None)
        self.successResultOf(self.registry.reconcile([A]))
        self.assertIsNone(self.registry.status(B))
        self.assertEqual(self.factory.discarded, [B])
        self.assertEqual(self.registry.status(A).state, IDLE)

    def test_factory_without_builds_leaves_it_idle(self):
        """With a factory that cannot build without launching, the plugin is only left idle: no attempt at all."""

        class LaunchOnly(FakeRuntimeFactory):
            build_installed = None

        factory = LaunchOnly()
        registry = RuntimeRegistry(self.clock, factory, restore_idle=True)
        registry.prepare(A)
        self.assertEqual(factory.attempts, [])
        self.assertEqual(registry.status(A).state, IDLE)
