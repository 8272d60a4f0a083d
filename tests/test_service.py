"""
DaemonService: the ports open only once the database is ready, start-up
waits a bounded time for the database, and a failed start ends a twistd
process with a non-zero status.
"""

from __future__ import annotations

import os
import queue
import time

import orjson
from treq.testing import StubTreq
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock

from difydaemon import tap
from difydaemon.errors import ConfigError, DatabaseUnavailableError
from difydaemon.persistence.memory import MemoryPersistence
from difydaemon.service import DaemonService, end_process_on_failed_start
from difydaemon.testing.cases import SynchronousTestCase
from tests.test_tap import environment


class HeldDatabase(MemoryPersistence):
    """
    In-memory persistence whose migrate() answers what the test queues: a
    Deferred, or an exception to fail with (success when nothing is queued).
    """

    def __init__(self, reactor) -> None:
        super().__init__(reactor)
        self.answers: list = []
        self.migrations = 0

    def migrate(self):
        self.migrations += 1
        if not self.answers:
            return succeed(None)
        answer = self.answers.pop(0)
        return fail(answer) if isinstance(answer, Exception) else answer


class QuietInstaller:
    """The two installer calls DaemonService makes, with nothing to do."""

    async def fail_unfinished_tasks(self, message):
        return 0

    async def stop(self):
        return None


class StartingStorage:
    """An object store with a start() (as a cloud store has) that answers what ``start`` returns."""

    def __init__(self, start) -> None:
        self.start = start


class RefusingEndpoint:
    """A server endpoint whose port is taken."""

    def listen(self, factory):
        return fail(CannotListenError("127.0.0.1", 5002, OSError("address already in use")))


class DaemonServiceTests(SynchronousTestCase):
    """Start-up order and readiness, on a memory reactor."""

    def setUp(self):
        super().setUp()
        self.clock = MemoryReactorClock()
        self.database = HeldDatabase(self.clock)

    def service(self, database_wait=0.0, endpoint=None) -> DaemonService:
        service = DaemonService(self.clock, self.database, QuietInstaller(), database_wait=database_wait)
        StreamServerEndpointService(
            endpoint or TCP4ServerEndpoint(self.clock, 5002, interface="127.0.0.1"), Factory()
        ).setServiceParent(service)
        return service

    def test_ports_open_after_migration(self):
        """privilegedStartService binds nothing; the port opens when migration finishes, and only then is the status ok."""
        held = Deferred()
        self.database.answers.append(held)
        service = self.service()
        service.privilegedStartService()
        service.startService()
        self.assertEqual(self.clock.tcpServers, [])
        self.assertEqual(service.status(), "starting")
        self.assertNoResult(service.ready)
        held.callback(None)
        self.assertEqual([port for port, *_ in self.clock.tcpServers], [5002])
        self.successResultOf(service.ready)
        self.assertEqual(service.status(), "ok")
        service.stopService()
        self.assertEqual(service.status(), "stopping")

    def held_service(self, **hooks):
        """A service with a port, built with ``hooks``, whose migration waits for the Deferred returned with it."""
        held = Deferred()
        self.database.answers.append(held)
        service = DaemonService(self.clock, self.database, QuietInstaller(), **hooks)
        StreamServerEndpointService(TCP4ServerEndpoint(self.clock, 5002, interface="127.0.0.1"),
                                    Factory()).setServiceParent(service)
        return service, held

    def test_file_limit_raised_before_ports(self):
        """The open-files limit is raised once, at start, before any port is open."""
        calls = []
        service, held = self.held_service(file_limit=lambda: calls.append(len(self.clock.tcpServers)))
        service.startService()
        self.assertEqual(calls, [0])
        held.callback(None)
        self.successResultOf(service.ready)
        self.assertEqual(calls, [0])

    def test_memory_released_once_ready(self):
        """What start-up freed is released once, when the daemon is ready (its port open), not before."""
        calls = []
        service, held = self.held_service(release_memory=lambda: calls.append(len(self.clock.tcpServers)))
        service.startService()
        self.assertEqual(calls, [])
        held.callback(None)
        self.successResultOf(service.ready)
        self.assertEqual(calls, [1])

    def test_start_checks_run_first(self):
        """The start-up checks run when the service starts, before the database is even reached; one that raises is logged and the start goes on."""
        ran = []

        def broken():
            ran.append("broken")
            raise RuntimeError("no prctl here")

        held = Deferred()
        self.database.answers.append(held)
        service = DaemonService(
            self.clock, self.database, QuietInstaller(), start_checks=[lambda: ran.append("first"), broken]
        )
        self.assertEqual(ran, [])
        service.startService()
        self.assertEqual(ran, ["first", "broken"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        held.callback(None)
        self.successResultOf(service.ready)

    def test_waits_for_the_database(self):
        """An unavailable database is tried again every second within the wait, then the daemon starts."""
        self.database.answers += [DatabaseUnavailableError("refused"), DatabaseUnavailableError("refused")]
        service = self.service(database_wait=5)
        service.startService()
        self.assertEqual((self.database.migrations, self.clock.tcpServers), (1, []))
        self.clock.advance(1)
        self.assertEqual(self.database.migrations, 2)
        self.clock.advance(1)
        self.assertEqual(self.database.migrations, 3)
        self.successResultOf(service.ready)
        self.assertEqual(len(self.clock.tcpServers), 1)

    def test_gives_up_after_the_wait(self):
        """Past the wait, start-up fails with the database's error and no port opens."""
        self.database.answers += [DatabaseUnavailableError("refused") for _ in range(10)]
        service = self.service(database_wait=2)
        service.startService()
        self.clock.advance(1)
        self.clock.advance(1)
        failure = self.failureResultOf(service.ready, DatabaseUnavailableError)
        self.assertEqual(failure.value.message, "database unavailable: refused")
        self.assertEqual(len(self.flushLoggedErrors(DatabaseUnavailableError)), 1)
        self.assertEqual((self.database.migrations, self.clock.tcpServers, service.status()), (3, [], "failed"))

    def test_other_database_errors_are_not_waited_for(self):
        """A failure other than an unavailable database fails start-up at once."""
        self.database.answers.append(RuntimeError("bad migration"))
        service = self.service(database_wait=30)
        service.startService()
        self.failureResultOf(service.ready, RuntimeError)
        self.assertEqual(self.database.migrations, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stopped_while_waiting(self):
        """A stop while waiting for the database cancels the start: no port opens, no failure status."""
        self.database.answers += [DatabaseUnavailableError("refused") for _ in range(10)]
        service = self.service(database_wait=30)
        service.startService()
        service.stopService()
        self.clock.advance(1)
        self.failureResultOf(service.ready, CancelledError)
        self.assertEqual((self.clock.tcpServers, service.status(), self.database.migrations), ([], "starting", 1))

    def test_storage_checked_after_the_database_before_the_ports(self):
        """A cloud store is started once the database is migrated, and the ports open only when it is ready."""
        order = []
        held = Deferred()
        storage = StartingStorage(lambda: order.append(("storage", self.database.migrations)) or held)
        service = DaemonService(self.clock, self.database, QuietInstaller(), storage=storage)
        StreamServerEndpointService(TCP4ServerEndpoint(self.clock, 5002, interface="127.0.0.1"),
                                    Factory()).setServiceParent(service)
        service.startService()
        self.assertEqual((order, self.clock.tcpServers), ([("storage", 1)], []))
        held.callback(None)
        self.successResultOf(service.ready)
        self.assertEqual(len(self.clock.tcpServers), 1)

    def test_storage_stopped_before_the_runners(self):
        """At shutdown the store is stopped (no more retries) after the database closes and before the thread pools stop."""
        order = []

        class Runner:
            def stop(self):
                order.append("runner")

        storage = StartingStorage(lambda: succeed(None))
        storage.stop = lambda: order.append("storage")
        service = DaemonService(self.clock, self.database, QuietInstaller(), storage=storage, runners=[Runner()])
        service.startService()
        self.successResultOf(service.ready)
        self.successResultOf(service.stopService())
        self.assertEqual(order, ["storage", "runner"])

    def test_storage_refusal_fails_start_naming_the_setting(self):
        """A store that cannot be reached fails start-up with its ConfigError, logged without a traceback; no port opens."""
        storage = StartingStorage(lambda: fail(ConfigError("S3_ENDPOINT", "cannot reach the S3 store")))
        service = DaemonService(self.clock, self.database, QuietInstaller(), storage=storage)
        StreamServerEndpointService(TCP4ServerEndpoint(self.clock, 5002, interface="127.0.0.1"),
                                    Factory()).setServiceParent(service)
        logged = []
        from twisted.logger import globalLogPublisher

        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        service.startService()
        failure = self.failureResultOf(service.ready, ConfigError)
        self.assertEqual(failure.value.variable, "S3_ENDPOINT")
        self.assertEqual((self.clock.tcpServers, service.status()), ([], "failed"))
        self.assertEqual(self.flushLoggedErrors(ConfigError), [])
        self.assertIn(
            "difydaemon could not start: S3_ENDPOINT: cannot reach the S3 store",
            [e.get("reason") and "difydaemon could not start: " + e["reason"] for e in logged],
        )

    def test_port_in_use_fails_start(self):
        """A port that cannot be bound fails start-up instead of leaving a deaf daemon running."""
        service = self.service(endpoint=RefusingEndpoint())
        service.startService()
        self.failureResultOf(service.ready, CannotListenError)
        self.assertEqual(service.status(), "failed")
        self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)


class ProcessPolicyTests(SynchronousTestCase):
    """end_process_on_failed_start: what twistd needs when start-up fails."""

    def failing_start(self, clock) -> list:
        """Start a daemon whose migration fails under the policy; the exit statuses it asked for."""
        service = DaemonService(clock, HeldDatabase(clock), QuietInstaller())
        service.persistence.answers.append(RuntimeError("bad"))
        statuses = []
        end_process_on_failed_start(service, clock, exit_with=statuses.append)
        service.startService()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        return statuses

    def test_failed_start_stops_reactor_and_sets_status(self):
        """A failed start stops the reactor and asks for exit status 1."""
        clock = MemoryReactorClock()
        clock.running = True
        self.assertEqual((self.failing_start(clock), clock.hasStopped), ([1], True))

    def test_failed_before_the_reactor_runs(self):
        """A start that fails before the reactor runs stops it as soon as it runs."""
        clock = MemoryReactorClock()
        self.assertEqual((self.failing_start(clock), clock.hasStopped), ([1], False))
        clock.run()
        self.assertTrue(clock.hasStopped)

    def test_success_and_cancel_leave_the_process_alone(self):
        """A successful start, or a stop before ready, neither stops the reactor nor sets a status."""
        statuses = []
        for cancel in (False, True):
            clock = MemoryReactorClock()
            clock.running = True
            service = DaemonService(clock, HeldDatabase(clock), QuietInstaller(), database_wait=10)
            if cancel:
                service.persistence.answers.append(DatabaseUnavailableError("refused"))
            end_process_on_failed_start(service, clock, exit_with=statuses.append)
            service.startService()
            if cancel:
                service.stopService()
                clock.advance(1)
                self.failureResultOf(service.ready, CancelledError)
            else:
                self.successResultOf(service.ready)
            self.assertFalse(clock.hasStopped)
        self.assertEqual(statuses, [])


class ThreadedMemoryReactor(MemoryReactorClock):
    """A memory reactor whose callFromThread queues the call until :meth:`pump`."""

    def __init__(self) -> None:
        super().__init__()
        self.from_threads: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args, **kwargs):
        self.from_threads.put((f, args, kwargs))

    def pump(self, until, limit: float = 30.0) -> None:
        """Run calls from threads as they come, until ``until()`` (or ``limit`` seconds)."""
        deadline = time.monotonic() + limit
        while not until() and time.monotonic() < deadline:
            try:
                f, args, kwargs = self.from_threads.get(timeout=0.05)
            except queue.Empty:
                continue
            f(*args, **kwargs)


class MakeServiceStartTests(SynchronousTestCase):
    """The daemon makeService builds, started on a memory reactor."""

    def test_no_port_until_migrated(self):
        """Under twistd's start sequence no port is bound until the database is migrated; /health/check says starting until ready."""
        fake = ThreadedMemoryReactor()
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        options = tap.Options()
        options.parseOptions(["--env-file", os.path.join(workdir, "absent.env")])
        service = tap.makeService(options, reactor=fake, environ=environment(workdir, 5002))
        treq = StubTreq(service.site.resource)

        def health():
            d = treq.get("http://daemon/health/check")
            treq.flush()
            response = self.successResultOf(d)
            body = self.successResultOf(treq.content(response))
            return response.code, orjson.loads(body)["status"]

        self.assertEqual(health(), (503, "starting"))

        def stop():
            # the worker threads must end, whatever the test's outcome
            stopped = service.stopService()
            fake.pump(lambda: stopped.called)
            return stopped

        service.privilegedStartService()
        service.startService()
        self.addCleanup(lambda: service.running and stop())
        # the migration runs in a worker thread whose answer waits in the queue
        self.assertEqual(fake.tcpServers, [])
        fake.pump(lambda: service.ready.called)
        self.successResultOf(service.ready)
        self.assertEqual([port for port, *_ in fake.tcpServers], [5002])
        self.assertEqual(health(), (200, "ok"))
        self.successResultOf(stop())


class RecordingReplica:
    """Records when the daemon starts and stops its replica, and what was listening then."""

    def __init__(self, clock) -> None:
        self._clock = clock
        self.events: list = []

    def start(self):
        self.events.append(("start", len(self._clock.tcpServers)))

    def stop(self):
        self.events.append(("stop",))
        return succeed(None)


class RedisDownInstaller(QuietInstaller):
    """An installer that cannot tell orphaned tasks while Redis is down."""

    async def fail_unfinished_tasks(self, message):
        from difydaemon.errors import CoordinationUnavailableError

        raise CoordinationUnavailableError("could not connect: test")


class ReplicaLifeTests(SynchronousTestCase):
    """The replica joins the cluster once the ports are open, leaves first, and Redis down does not stop a start."""

    def test_replica_started_after_ports_and_stopped_first(self):
        """The replica starts once the port is bound, and is stopped before the ports close."""
        clock = MemoryReactorClock()
        replica = RecordingReplica(clock)
        service = DaemonService(clock, HeldDatabase(clock), QuietInstaller(), replica=replica)
        listening = StreamServerEndpointService(TCP4ServerEndpoint(clock, 5002, interface="127.0.0.1"), Factory())
        listening.setServiceParent(service)
        service.startService()
        self.successResultOf(service.ready)
        self.assertEqual(replica.events, [("start", 1)])
        replica.stop = lambda: replica.events.append(("stop", listening.running)) or succeed(None)
        service.stopService()
        self.assertEqual(replica.events, [("start", 1), ("stop", True)])

    def test_redis_down_at_start_is_no_failure(self):
        """Unfinished tasks that cannot be judged without Redis are left for the sweeps; the daemon starts."""
        clock = MemoryReactorClock()
        service = DaemonService(clock, HeldDatabase(clock), RedisDownInstaller())
        service.startService()
        self.successResultOf(service.ready)
        self.assertEqual(service.status(), "ok")
