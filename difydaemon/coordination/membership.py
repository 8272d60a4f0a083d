"""
This replica's presence in the cluster: announced, with the plugins it
holds, every third of a ttl, until it leaves.

With the default ttl of 15 s a node's record is at most ~5 s old when read
and two heartbeats in a row can fail before it expires (Go: a live entry
can be 13 s old against a 15 s validity, and readers delete what they find
expired).  Nobody but the node itself and expiry removes its entries.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from difydaemon.coordination.namespace import check_name, ttl_milliseconds
from difydaemon.coordination.nodes import NodeInfo
from difydaemon.errors import CoordinationUnavailableError

log = Logger()

#: Seconds a node's announcement and its plugin claims live without a heartbeat.
NODE_TTL = 15.0


class NodePresence:
    """
    Keeps ``node`` announced in an IMembership, and its plugin claims fresh.

    :param node: this replica (its ``heartbeat_at`` is restamped on each beat).
    :param ttl: seconds an announcement lives; heartbeats come every ttl / 3.
    """

    def __init__(self, reactor, membership, node: NodeInfo, ttl: float = NODE_TTL) -> None:
        ttl_milliseconds(ttl)
        self._reactor = reactor
        self._membership = membership
        self.node = node
        self._ttl = ttl
        self._claims: set[str] = set()
        self._loop = LoopingCall(self._beat)
        self._loop.clock = reactor
        self._loop_done = None

    @property
    def claims(self) -> frozenset[str]:
        """The plugin identifiers this node says it holds."""
        return frozenset(self._claims)

    def start(self) -> None:
        """Announce now, then every ttl / 3."""
        if not self._loop.running:
            self._loop_done = self._loop.start(self._ttl / 3.0, now=True)
            self._loop_done.addErrback(lambda f: log.failure("heartbeat loop failed", f))

    async def _beat_async(self) -> None:
        self.node = attrs.evolve(self.node, heartbeat_at=self._reactor.seconds())
        try:
            await self._membership.announce(self.node, self._ttl)
            for identifier in sorted(self._claims):
                await self._membership.claim_plugin(identifier, self.node.node_id, self._ttl)
        except CoordinationUnavailableError as e:
            log.warn("heartbeat of node {node_id} failed: {reason}", node_id=self.node.node_id, reason=e.reason)

    def _beat(self) -> Deferred:
        # LoopingCall waits for this before the next beat, so beats never overlap
        return Deferred.fromCoroutine(self._beat_async())

    def claim(self, plugin_unique_identifier: str) -> Deferred:
        """
        Say that this node holds the plugin, now and at every heartbeat.
        Deferred[None]; while Redis is down it fails, and the claim is
        written at the first heartbeat that gets through.
        """
        check_name(plugin_unique_identifier, "plugin identifier")
        self._claims.add(plugin_unique_identifier)
        return self._membership.claim_plugin(plugin_unique_identifier, self.node.node_id, self._ttl)

    def unclaim(self, plugin_unique_identifier: str) -> Deferred:
        """Stop claiming the plugin and drop the claim. Deferred[None]."""
        self._claims.discard(plugin_unique_identifier)
        return self._membership.release_plugin(plugin_unique_identifier, self.node.node_id)

    def stop(self) -> Deferred:
        """Stop the heartbeat and leave: claims dropped, node withdrawn (best effort). Deferred[None]."""
        if self._loop.running:
            self._loop.stop()
        return Deferred.fromCoroutine(self._leave())

    async def _leave(self) -> None:
        try:
            for identifier in sorted(self._claims):
                await self._membership.release_plugin(identifier, self.node.node_id)
            await self._membership.withdraw(self.node.node_id)
        except CoordinationUnavailableError as e:
            log.warn("node {node_id} left without withdrawing ({reason}); its entries expire by themselves",
                     node_id=self.node.node_id, reason=e.reason)
        self._claims.clear()
