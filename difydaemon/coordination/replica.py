"""
This daemon as one replica of a cluster: what it tells the others and what
it does with what they tell it.

- Its presence: announced at start (heartbeat every ttl / 3), withdrawn at
  stop, with a claim on every debug plugin connected to it, so that another
  replica can forward that plugin's calls here.
- Local plugins: every replica serves every installed local plugin.  An
  install or uninstall through any replica is published on the ``plugins``
  channel; the others start the plugin (from the shared package storage)
  or stop it.  A replica that missed messages (Redis went away) or that
  has been running a while compares what it runs with the database
  (:meth:`~difydaemon.runtimes.registry.RuntimeRegistry.reconcile`), and a
  call for an installed plugin not running here starts it and waits for it
  whatever the news said.
- Caches: :class:`CacheInvalidation` on the ``caches`` channel.

A daemon running alone has the same object on the in-memory coordination:
its own messages come back to it and are ignored, and nothing is missed.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from difydaemon.coordination.membership import NODE_TTL, NodePresence
from difydaemon.errors import CoordinationUnavailableError

log = Logger()

#: The channel of plugin installs and uninstalls.
PLUGINS_CHANNEL = "plugins"
#: The channel of cache invalidations.
CACHES_CHANNEL = "caches"
#: Seconds between two tries to subscribe while Redis is down.
SUBSCRIBE_RETRY = 2.0
#: Seconds between two comparisons of the running local plugins with the
#: database (a safety net: messages normally say it within a second).
RECONCILE_INTERVAL = 30.0

INSTALLED = "installed"
RETIRED = "retired"


class CacheInvalidation:
    """
    Invalidations of the caches in front of the database, across replicas.

    A cache registers under a name with an object that has ``forget(*args)``
    (drop one entry, here only) and ``clear()`` (drop everything).  When
    this replica changes what an entry caches it calls :meth:`invalidated`:
    the other replicas forget the entry as soon as the message arrives.  A
    replica whose subscription was cut (messages may be lost) clears every
    cache.

    :param pubsub: an IPubSub.
    :param node_id: this replica (its own messages are ignored).
    """

    def __init__(self, pubsub, node_id: str) -> None:
        self._pubsub = pubsub
        self._node_id = node_id
        self._caches: dict[str, object] = {}

    def register(self, name: str, cache) -> None:
        """Have ``cache`` invalidated under ``name``."""
        self._caches[name] = cache

    def invalidated(self, name: str, *args) -> Deferred:
        """
        Tell the other replicas that the entry ``args`` of cache ``name``
        changed.  Deferred[None], never failing: a message Redis refuses is
        logged (the other replicas, cut off too, clear their caches when
        they are back).
        """
        d = self._pubsub.publish(CACHES_CHANNEL, {"cache": name, "args": list(args), "node_id": self._node_id})
        return d.addErrback(_publish_failed, CACHES_CHANNEL)

    def message(self, message) -> None:
        """One message of the ``caches`` channel."""
        if not isinstance(message, dict) or message.get("node_id") == self._node_id:
            return
        cache = self._caches.get(message.get("cache"))
        args = message.get("args")
        if cache is None or not isinstance(args, list):
            return
        cache.forget(*args)

    def missed(self) -> None:
        """Messages may have been lost: drop everything cached."""
        log.info("cache invalidations may have been missed; clearing {count} caches", count=len(self._caches))
        for cache in self._caches.values():
            cache.clear()


def _publish_failed(failure, channel: str) -> None:
    if failure.check(CoordinationUnavailableError):
        log.warn("could not publish on {channel}: {reason}", channel=channel, reason=failure.value.reason)
    else:
        log.failure("publishing on {channel} failed", failure, channel=channel)


class Replica:
    """
    This daemon's part in the cluster (see the module docstring).

    :param reactor: the reactor.
    :param coordination: the :class:`~difydaemon.coordination.Coordination`.
    :param node: this replica's :class:`~difydaemon.coordination.nodes.NodeInfo`.
    :param registry: the :class:`~difydaemon.runtimes.registry.RuntimeRegistry`.
    :param installed: ``() -> Deferred[list of identifiers]``: the local
        plugins installed, from the database.
    :param caches: the :class:`CacheInvalidation` to subscribe.
    :param ttl: seconds the announcement and claims live without a heartbeat.
    :param reconcile_interval: seconds between two reconciliations (None:
        only after missed messages).
    """

    def __init__(
        self,
        reactor,
        coordination,
        node,
        registry,
        installed,
        caches: CacheInvalidation,
        ttl: float = NODE_TTL,
        reconcile_interval: float | None = RECONCILE_INTERVAL,
    ) -> None:
        self._reactor = reactor
        self.coordination = coordination
        self.presence = NodePresence(reactor, coordination.membership, node, ttl)
        self._registry = registry
        self._installed = installed
        self.caches = caches
        self._subscriptions: list = []
        self._retry = None
        self._running = False
        self._reconcile_loop = None
        if reconcile_interval is not None:
            self._reconcile_loop = LoopingCall(self._reconcile_quietly)
            self._reconcile_loop.clock = reactor
        self._reconcile_interval = reconcile_interval
        registry.listeners.append(self)

    @property
    def node_id(self) -> str:
        """This replica's node id."""
        return self.presence.node.node_id

    # -- life ---------------------------------------------------------------

    def start(self) -> None:
        """Announce this replica and listen to the others (in the background; Redis may be down)."""
        self._running = True
        self.presence.start()
        self._subscribe()
        if self._reconcile_loop is not None:
            self._reconcile_loop.start(self._reconcile_interval, now=False).addErrback(
                lambda f: log.failure("reconciliation loop failed", f)
            )

    def _subscribe(self) -> None:
        self._retry = None
        if not self._running:
            return
        wanted = [(PLUGINS_CHANNEL, self._plugin_message, self._plugins_missed),
                  (CACHES_CHANNEL, self.caches.message, self.caches.missed)]
        have = {s.channel for s in self._subscriptions}
        pending = [
            self.coordination.pubsub.subscribe(channel, on_message, on_missed)
            for channel, on_message, on_missed in wanted if channel not in have
        ]
        DeferredList(pending, consumeErrors=True).addCallback(self._subscribed).addErrback(
            lambda f: log.failure("subscribing failed", f)
        )

    def _subscribed(self, results) -> None:
        failed = False
        for ok, result in results:
            if ok:
                if self._running:
                    self._subscriptions.append(result)
                else:
                    # stopped meanwhile
                    result.unsubscribe().addErrback(lambda f: log.failure("unsubscribing failed", f))
            else:
                failed = True
                reason = getattr(result.value, "reason", result.getErrorMessage())
                log.warn("cannot subscribe yet ({reason}); trying again in {pause:g} s",
                         reason=reason, pause=SUBSCRIBE_RETRY)
        if failed and self._running:
            self._retry = self._reactor.callLater(SUBSCRIBE_RETRY, self._subscribe)
        elif results and self._running and self.coordination.uses_redis:
            # what was published before the subscription is missed
            self._plugins_missed()
            self.caches.missed()

    def stop(self) -> Deferred:
        """Stop listening and leave the cluster (claims dropped, node withdrawn). Deferred[None]."""
        self._running = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._reconcile_loop is not None and self._reconcile_loop.running:
            self._reconcile_loop.stop()
        subscriptions, self._subscriptions = self._subscriptions, []
        steps = [s.unsubscribe() for s in subscriptions]
        steps.append(self.presence.stop())
        return DeferredList(steps, consumeErrors=True).addCallback(lambda _: None)

    # -- local plugins ------------------------------------------------------

    def plugin_installed(self, plugin_unique_identifier: str) -> Deferred:
        """Tell the other replicas to start a local plugin just installed here. Deferred[None]."""
        return self._publish_plugin(INSTALLED, plugin_unique_identifier)

    def plugin_retired(self, plugin_unique_identifier: str) -> Deferred:
        """Tell the other replicas to stop a local plugin no longer installed. Deferred[None]."""
        return self._publish_plugin(RETIRED, plugin_unique_identifier)

    def _publish_plugin(self, event: str, identifier: str) -> Deferred:
        d = self.coordination.pubsub.publish(
            PLUGINS_CHANNEL, {"event": event, "identifier": identifier, "node_id": self.node_id}
        )
        return d.addErrback(_publish_failed, PLUGINS_CHANNEL)

    def _plugin_message(self, message) -> None:
        if not isinstance(message, dict) or message.get("node_id") == self.node_id:
            return
        identifier = message.get("identifier")
        if not isinstance(identifier, str) or not identifier:
            return
        event = message.get("event")
        if event == INSTALLED:
            log.info("plugin {identifier} was installed on node {node_id}; preparing it here",
                     identifier=identifier, node_id=message.get("node_id"))
            self._registry.prepare(identifier)
        elif event == RETIRED:
            log.info("plugin {identifier} was uninstalled on node {node_id}; stopping it here",
                     identifier=identifier, node_id=message.get("node_id"))
            self._registry.stop(identifier).addErrback(
                lambda f: log.failure("stopping plugin {identifier} failed", f, identifier=identifier)
            )

    def _plugins_missed(self) -> None:
        self._reconcile_quietly()

    def reconcile(self) -> Deferred:
        """Compare the local plugins running here with the database's. Deferred[None]."""
        return self._installed().addCallback(self._registry.reconcile)

    def _reconcile_quietly(self) -> Deferred:
        d = self.reconcile()
        d.addErrback(lambda f: log.warn("comparing running plugins with the database failed: {reason}",
                                        reason=f.getErrorMessage()))
        return d

    # -- debug plugins: the registry's listener -----------------------------

    def registered(self, runtime) -> None:
        """A debug plugin connected here: claim it, so calls through other replicas come here."""
        self.presence.claim(runtime.plugin_unique_identifier).addErrback(
            _claim_failed, runtime.plugin_unique_identifier
        )

    def unregistered(self, runtime) -> None:
        """A debug plugin left: drop the claim at once."""
        self.presence.unclaim(runtime.plugin_unique_identifier).addErrback(
            _claim_failed, runtime.plugin_unique_identifier
        )

    def holders(self, plugin_unique_identifier: str) -> Deferred:
        """Deferred[list of NodeInfo]: the other live replicas that hold a plugin."""
        d = self.coordination.membership.plugin_holders(plugin_unique_identifier)
        return d.addCallback(lambda nodes: [n for n in nodes if n.node_id != self.node_id])


def _claim_failed(failure, identifier: str) -> None:
    if failure.check(CoordinationUnavailableError):
        # the next heartbeat writes (or the ttl drops) the claim
        log.warn("claim of plugin {identifier} not written now: {reason}", identifier=identifier,
                 reason=failure.value.reason)
    else:
        log.failure("claiming plugin {identifier} failed", failure, identifier=identifier)
