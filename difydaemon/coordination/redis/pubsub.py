"""
Publish/subscribe on Redis, channels under ``chan:``.

Publishing goes over the command connection; subscriptions share one
connection of their own (a subscribed Redis connection takes no other
commands).  When that connection breaks, every subscription is marked as
possibly having missed messages; once the connection is back and the
channels are subscribed again, each such subscription's ``on_missed()`` is
called.  A ``PING`` every ``keepalive`` seconds finds a server that stopped
answering (a frozen or partitioned Redis leaves an idle connection looking
fine), so the subscriber reconnects instead of waiting forever.

Redis channels are shared by every database number of a server: the key
prefix is what keeps two clusters (or two tests) apart.
"""

from __future__ import annotations

import orjson
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from difydaemon.coordination.namespace import KeySpace, check_name, decode_value, encode_value
from difydaemon.coordination.redis.connection import send
from difydaemon.errors import CoordinationUnavailableError
from difydaemon.interfaces import IPubSub, ISubscription

log = Logger()


@implementer(ISubscription)
class _RedisSubscription:
    def __init__(self, owner: "RedisPubSub", channel: str, redis_channel: str, on_message, on_missed) -> None:
        self._owner = owner
        self.channel = channel
        self.redis_channel = redis_channel
        self.on_message = on_message
        self.on_missed = on_missed

    def unsubscribe(self):
        return self._owner._unsubscribe(self)


@implementer(IPubSub)
class RedisPubSub:
    """
    :param commands: the RedisConnection that publishes.
    :param subscriber: a RedisConnection of
        :class:`~difydaemon.coordination.redis.connection.SubscriberProtocol`.
    :param keepalive: seconds between two pings of the subscriber connection.
    """

    def __init__(self, reactor, commands, subscriber, keys: KeySpace, keepalive: float = 5.0) -> None:
        self._reactor = reactor
        self._commands = commands
        self._subscriber = subscriber
        self._keys = keys
        self._channels: dict[str, list[_RedisSubscription]] = {}
        # channels subscribed on the current connection
        self._active: set[str] = set()
        self._missed: list[_RedisSubscription] = []
        self._keepalive = LoopingCall(self._ping)
        self._keepalive.clock = reactor
        self._keepalive_every = keepalive
        subscriber.ready_listeners.append(self._connected)
        subscriber.lost_listeners.append(self._lost)

    def publish(self, channel, message):
        redis_channel = self._keys.key("chan", check_name(channel, "channel"))
        text = encode_value(message)
        return Deferred.fromCoroutine(self._commands.execute("PUBLISH", redis_channel, text)).addCallback(lambda _: None)

    def subscribe(self, channel, on_message, on_missed=None):
        redis_channel = self._keys.key("chan", check_name(channel, "channel"))
        subscription = _RedisSubscription(self, channel, redis_channel, on_message, on_missed)
        return Deferred.fromCoroutine(self._subscribe(subscription))

    async def _subscribe(self, subscription: _RedisSubscription):
        protocol = await self._subscriber.protocol()
        protocol.on_message = self._message
        channel = subscription.redis_channel
        if channel not in self._active:
            await send(protocol, "SUBSCRIBE", channel)
            self._active.add(channel)
        self._channels.setdefault(channel, []).append(subscription)
        if not self._keepalive.running:
            self._keepalive.start(self._keepalive_every, now=False).addErrback(
                lambda f: log.failure("subscriber keepalive failed", f)
            )
        return subscription

    def _unsubscribe(self, subscription: _RedisSubscription):
        subscribers = self._channels.get(subscription.redis_channel, [])
        if subscription not in subscribers:
            return succeed(None)
        subscribers.remove(subscription)
        if subscription in self._missed:
            self._missed.remove(subscription)
        if subscribers:
            return succeed(None)
        del self._channels[subscription.redis_channel]
        if not self._channels and self._keepalive.running:
            self._keepalive.stop()
        return Deferred.fromCoroutine(self._drop_channel(subscription.redis_channel))

    async def _drop_channel(self, channel: str) -> None:
        if channel not in self._active:
            return
        self._active.discard(channel)
        try:
            protocol = await self._subscriber.protocol()
            await send(protocol, "UNSUBSCRIBE", channel)
        except CoordinationUnavailableError:
            # the channel is not subscribed again on reconnection
            pass

    def _message(self, channel: str, payload) -> None:
        subscribers = self._channels.get(channel)
        if not subscribers:
            return
        for subscription in list(subscribers):
            try:
                # each subscriber gets its own copy
                message = decode_value(payload)
            except orjson.JSONDecodeError:
                log.warn("dropping a message on {channel} that is not JSON", channel=subscription.channel)
                return
            try:
                subscription.on_message(message)
            except Exception:
                log.failure("subscriber of {channel} failed on a message", channel=subscription.channel)

    def _lost(self, reason: str) -> None:
        self._active.clear()
        for subscribers in self._channels.values():
            for subscription in subscribers:
                if subscription not in self._missed:
                    self._missed.append(subscription)

    def _connected(self, protocol) -> None:
        protocol.on_message = self._message
        if self._channels:
            Deferred.fromCoroutine(self._resubscribe(protocol)).addErrback(self._resubscribe_failed)

    async def _resubscribe(self, protocol) -> None:
        for channel in list(self._channels):
            if channel not in self._active:
                await send(protocol, "SUBSCRIBE", channel)
                self._active.add(channel)
        missed, self._missed = self._missed, []
        log.info("subscriptions back on {count} channels; telling {missed} subscribers they may have missed messages",
                 count=len(self._active), missed=len(missed))
        for subscription in missed:
            if subscription.on_missed is None:
                continue
            try:
                subscription.on_missed()
            except Exception:
                log.failure("subscriber of {channel} failed on missed messages", channel=subscription.channel)

    def _resubscribe_failed(self, failure) -> None:
        # the connection broke again: the next one subscribes again
        failure.trap(CoordinationUnavailableError)
        log.warn("resubscribing failed: {reason}", reason=failure.value.reason)

    async def _ping(self) -> None:
        if not self._subscriber.usable:
            return
        try:
            protocol = await self._subscriber.protocol()
            await send(protocol, "PING")
        except CoordinationUnavailableError:
            # a missing reply aborted the connection; it reconnects by itself
            pass

    def close(self) -> None:
        """Stop the keepalive (the connections are closed by their owner)."""
        if self._keepalive.running:
            self._keepalive.stop()
