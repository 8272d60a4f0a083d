"""
The Redis coordination set when Redis goes away: a private redis-server
(never the machine's shared one) is stopped, killed, frozen with SIGSTOP and
started again under the test's hands.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from difydaemon.coordination import coordination_for
from difydaemon.coordination.leases import HeldLease, LeaderElection
from difydaemon.errors import CoordinationUnavailableError
from difydaemon.testing.cases import AsyncTestCase
from difydaemon.testing.redis import new_prefix, private_redis, redis_config
from tests.coordination.contract import Inbox

#: Seconds the tests give anything that must happen "by itself".
PATIENCE = 20.0


async def sleep(seconds: float) -> None:
    """Let the real reactor run for a while."""
    await deferLater(reactor, seconds, lambda: None)


async def eventually(check, what: str) -> None:
    """Wait until ``check()`` is true (polling), or fail saying ``what`` never happened."""
    waited = 0.0
    while not check():
        if waited > PATIENCE:
            raise AssertionError(f"{what} did not happen within {PATIENCE} s")
        await sleep(0.05)
        waited += 0.05


async def succeeds(call) -> object:
    """The result of ``call()`` once it stops failing with CoordinationUnavailableError."""
    waited = 0.0
    while True:
        try:
            return await call()
        except CoordinationUnavailableError:
            if waited > PATIENCE:
                raise
        await sleep(0.05)
        waited += 0.05


async def fails(call) -> CoordinationUnavailableError:
    """The CoordinationUnavailableError ``call()`` ends with once Redis is seen to be down."""
    waited = 0.0
    while True:
        try:
            await call()
        except CoordinationUnavailableError as e:
            return e
        if waited > PATIENCE:
            raise AssertionError("Redis never looked down")
        await sleep(0.05)
        waited += 0.05


class RedisOutageTests(AsyncTestCase):
    """Fail fast while Redis is down, recover by itself when it is back."""

    timeout = 90

    async def _set_up(self):
        self.server = await private_redis(self, reactor)

    def setUp(self):
        return Deferred.fromCoroutine(self._set_up())

    def coordination(self, prefix=None, **variables):
        """A Redis coordination set on the private server, with short timeouts, closed at clean-up."""
        config = redis_config(port=self.server.port, prefix=prefix or new_prefix(), **variables)
        coordination = coordination_for(config, reactor, connect_timeout=2.0, reply_timeout=1.0, keepalive=0.5)
        self.addCleanup(coordination.close)
        return coordination

    def assert_failed_at_once(self, deferred) -> CoordinationUnavailableError:
        """``deferred`` has already failed, without the reactor running, with the redis-unavailable error."""
        self.assertTrue(deferred.called, "the call waited instead of failing at once")
        error = self.failureResultOf(deferred, CoordinationUnavailableError).value
        self.assertTrue(error.message.startswith("redis unavailable: "), error.message)
        self.assertEqual((error.code, error.error_type), (-500, "PluginDaemonInternalServerError"))
        return error

    async def test_fail_fast_while_down_then_recover(self):
        """While Redis is stopped every operation fails at once with 'redis unavailable'; once it is back they work again."""
        coordination = self.coordination()
        await coordination.kv.set("k", "v")
        # both connections in use
        await (await coordination.pubsub.subscribe("c", Inbox())).unsubscribe()
        await self.server.stop()
        error = await fails(lambda: coordination.kv.get("k"))
        self.assertIn("redis unavailable:", error.message)
        for call in (
            lambda: coordination.kv.get("k"),
            lambda: coordination.kv.set("k", 1),
            lambda: coordination.leases.acquire("l", 10),
            lambda: coordination.membership.live_nodes(),
            lambda: coordination.pubsub.publish("c", 1),
            lambda: coordination.pubsub.subscribe("c", Inbox()),
        ):
            self.assert_failed_at_once(call())
        await self.server.start()
        await succeeds(lambda: coordination.kv.set("k", "again"))
        self.assertEqual(await coordination.kv.get("k"), "again")
        subscription = await succeeds(lambda: coordination.pubsub.subscribe("c", Inbox()))
        await subscription.unsubscribe()

    async def test_first_use_while_down(self):
        """The first operation waits for the first connection attempt and says it failed; the next fails at once."""
        await self.server.stop()
        coordination = self.coordination()
        try:
            await coordination.kv.get("k")
        except CoordinationUnavailableError as e:
            self.assertIn("could not connect", e.message)
        else:
            self.fail("an operation succeeded with Redis stopped")
        self.assert_failed_at_once(coordination.kv.get("k"))
        await self.server.start()
        self.assertIsNone(await succeeds(lambda: coordination.kv.get("k")))

    async def test_killed_server(self):
        """A Redis killed with SIGKILL is noticed and the client reconnects once it is back."""
        coordination = self.coordination()
        await coordination.kv.set("k", "v")
        await self.server.kill()
        await fails(lambda: coordination.kv.get("k"))
        await self.server.start()
        # nothing was persisted: the restarted server is empty
        self.assertIsNone(await succeeds(lambda: coordination.kv.get("k")))

    async def test_frozen_server(self):
        """A frozen Redis fails an operation after the reply timeout with 'no reply'; after the thaw it works again."""
        coordination = self.coordination()
        await coordination.kv.set("k", "v")
        self.server.freeze()
        error = await fails(lambda: coordination.kv.get("k"))
        self.assertIn("no reply", error.message)
        self.server.thaw()
        self.assertEqual(await succeeds(lambda: coordination.kv.get("k")), "v")

    async def test_subscription_comes_back_and_reports_missed(self):
        """A subscription resubscribes by itself after an outage, calls on_missed once, then receives again."""
        prefix = new_prefix()
        mine, publisher = self.coordination(prefix), self.coordination(prefix)
        inbox = Inbox()
        await mine.pubsub.subscribe("invalidate", inbox, inbox.on_missed)
        got = inbox.next()
        await publisher.pubsub.publish("invalidate", "before")
        self.assertEqual(await got, "before")
        self.assertEqual(inbox.missed, 0)
        await self.server.stop()
        await fails(lambda: publisher.pubsub.publish("invalidate", "lost"))
        await self.server.start()
        await eventually(lambda: inbox.missed == 1, "on_missed")
        got = inbox.next()
        await succeeds(lambda: publisher.pubsub.publish("invalidate", "after"))
        self.assertEqual(await got, "after")
        self.assertEqual((inbox.messages, inbox.missed), (["before", "after"], 1))

    async def test_frozen_subscriber_notices(self):
        """A subscriber whose Redis froze notices through its keepalive, and reports missed messages after the thaw."""
        coordination = self.coordination()
        inbox = Inbox()
        await coordination.pubsub.subscribe("c", inbox, inbox.on_missed)
        self.server.freeze()
        # a keepalive ping goes out and gets no reply
        await sleep(2.0)
        self.server.thaw()
        # the keepalive ping of the frozen period timed out and dropped the connection
        await eventually(lambda: inbox.missed == 1, "on_missed after a freeze")

    async def test_lease_not_renewed_during_outage_is_lost(self):
        """A held lease that cannot be renewed while Redis is down is reported lost; afterwards a new one has a larger token."""
        coordination = self.coordination()
        reasons = []
        lease = await HeldLease.acquire(reactor, coordination.leases, "installer", 1.5, reasons.append)
        self.assertTrue(lease.held)
        await self.server.stop()
        await eventually(lambda: reasons, "the loss of the lease")
        self.assertFalse(lease.held)
        self.assertEqual(len(reasons), 1)
        await self.server.start()
        # the restarted server lost everything, fence counters included
        token = await succeeds(lambda: coordination.leases.acquire("installer", 10))
        self.assertGreater(token, lease.token)
        self.assertFalse(await lease.release())

    async def test_leader_comes_back_after_outage(self):
        """A leader deposed by an outage is elected again by itself, with a larger fencing token."""
        coordination = self.coordination()
        elected, deposed = [], []
        election = LeaderElection(reactor, coordination.leases, "gc", 1.5, elected.append, deposed.append)
        self.addCleanup(election.stop)
        election.start()
        await eventually(lambda: elected, "the first election")
        await self.server.stop()
        await eventually(lambda: deposed, "the deposition")
        self.assertFalse(election.is_leader)
        await self.server.start()
        await eventually(lambda: len(elected) == 2, "the second election")
        self.assertGreater(elected[1], elected[0])
        self.assertEqual(election.token, elected[1])

    async def test_credentials(self):
        """An ACL user logs in with REDIS_USERNAME; a wrong password fails every operation with a clear error."""
        await self.server.stop()
        self.server = await private_redis(
            self, reactor, options=["--user", "alice", "on", ">secret", "~*", "&*", "+@all", "--requirepass", "default-secret"]
        )
        good = self.coordination(REDIS_USERNAME="alice", REDIS_PASSWORD="secret")
        await good.kv.set("k", 1)
        self.assertEqual(await good.kv.get("k"), 1)
        default_user = self.coordination(REDIS_PASSWORD="default-secret")
        self.assertIsNone(await default_user.kv.get("k2"))
        bad = self.coordination(REDIS_USERNAME="alice", REDIS_PASSWORD="wrong")
        try:
            await bad.kv.get("k")
        except CoordinationUnavailableError as e:
            self.assertIn("could not authenticate", e.message)
            self.assertNotIn("wrong", e.message)
        else:
            self.fail("a wrong password was accepted")
        none = self.coordination()
        try:
            await none.kv.get("k")
        except CoordinationUnavailableError as e:
            self.assertIn("NOAUTH", e.message)
        else:
            self.fail("no password was accepted")

    async def test_database_number(self):
        """REDIS_DB selects the database: the same key in two databases holds two values."""
        prefix = new_prefix()
        zero = coordination_for(redis_config(port=self.server.port, prefix=prefix), reactor)
        three = coordination_for(redis_config(port=self.server.port, prefix=prefix, REDIS_DB="3"), reactor)
        self.addCleanup(zero.close)
        self.addCleanup(three.close)
        await zero.kv.set("k", 0)
        await three.kv.set("k", 3)
        self.assertEqual((await zero.kv.get("k"), await three.kv.get("k")), (0, 3))
