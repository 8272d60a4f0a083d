"""
Connections to Redis that fail fast while it is down and come back by
themselves.

txredisapi (ecosystem.md §1) provides the wire protocol: command encoding,
reply parsing and the per-command reply timeout.  Its own connection pools
block callers until a connection exists and use the global reactor, so the
connecting is ours: a :class:`~twisted.application.internet.ClientService`
on the injected reactor, connected lazily on the first command, retrying with
a capped backoff, and a small protocol subclass that finishes its handshake
(``AUTH [user] password``, ``SELECT``, then ``PING``, or ``ROLE`` behind
Sentinel) before a connection counts as usable.

A :class:`RedisConnection` is in one of four states:

- not started: the first command starts connecting and waits for that first
  attempt (bounded by the connect and reply timeouts);
- usable: commands go out at once;
- down (an attempt failed, or the connection broke): every command fails at
  once with :class:`~difydaemon.errors.CoordinationUnavailableError` saying
  why, while reconnecting goes on in the background;
- closed: every command fails at once.
"""

from __future__ import annotations

import attrs
import txredisapi
from attrs import frozen
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from zope.interface import implementer

from difydaemon.errors import CoordinationUnavailableError, InternalServerError

log = Logger()

#: Error replies that mean "this server cannot serve now", not "bad command".
_UNAVAILABLE_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "BUSY", "NOAUTH", "WRONGPASS", "TRYAGAIN", "CLUSTERDOWN")


class CoordinationError(InternalServerError):
    """Redis refused a command of ours: a bug or a misconfigured server (the message has its reply)."""


@frozen
class ConnectionSettings:
    """
    How to log in once connected.

    :ivar username: ACL user; empty for the default user.
    :ivar password: empty for none.
    :ivar db: the database number to ``SELECT`` (0: none sent).
    :ivar reply_timeout: seconds a command may wait for its reply before
        the connection is taken for dead.
    :ivar require_master: check with ``ROLE`` that the server is a master
        (behind Sentinel: a failover may hand us a replica).
    """

    username: str = ""
    password: str = attrs.field(default="", repr=False)
    db: int = 0
    reply_timeout: float = 5.0
    require_master: bool = False


def unavailable(failure_or_error) -> CoordinationUnavailableError:
    """The CoordinationUnavailableError standing for a connection-level failure."""
    error = getattr(failure_or_error, "value", failure_or_error)
    if isinstance(error, CoordinationUnavailableError):
        return error
    if isinstance(error, txredisapi.TimeoutError):
        return CoordinationUnavailableError(f"no reply: {error}")
    if isinstance(error, txredisapi.ConnectionError):
        return CoordinationUnavailableError(f"connection lost: {error}")
    return CoordinationUnavailableError(str(error) or type(error).__name__)


def reply_error(error: txredisapi.ResponseError) -> Exception:
    """The daemon error for an error reply."""
    text = str(error)
    if text.startswith(_UNAVAILABLE_REPLIES):
        return CoordinationUnavailableError(text)
    return CoordinationError(f"redis refused a command: {text}")


async def send(protocol, *args):
    """
    Send one command on ``protocol``; its reply, with errors as daemon errors.

    :raises CoordinationUnavailableError: the connection broke, or no reply
        came within the reply timeout.
    :raises CoordinationError: Redis answered with an error.
    """
    try:
        return await protocol.execute_command(*args)
    except txredisapi.ResponseError as e:
        raise reply_error(e) from None
    except (txredisapi.ConnectionError, txredisapi.TimeoutError) as e:
        raise unavailable(e) from None


class _Handshake:
    """
    Mixed into txredisapi's protocols: log in and check the server before
    the connection is handed out, on the injected reactor.
    """

    def _set_up(self, reactor, settings: ConnectionSettings) -> None:
        # txredisapi schedules reply timeouts and paused reads through this
        self.callLater = reactor.callLater
        self.settings = settings
        self.ready = Deferred()

    #: called with (protocol, reason) when the connection is lost
    on_lost = None

    def connectionMade(self):
        Deferred.fromCoroutine(self._handshake()).chainDeferred(self.ready)

    def connectionLost(self, reason):
        try:
            super().connectionLost(reason)
        finally:
            if self.on_lost is not None:
                self.on_lost(self, reason)

    async def _handshake(self):
        settings = self.settings
        step = "connect"
        try:
            if settings.password or settings.username:
                step = "authenticate"
                credentials = [settings.username] if settings.username else []
                await self.execute_command("AUTH", *credentials, settings.password)
            if settings.db:
                step = f"select database {settings.db}"
                await self.execute_command("SELECT", settings.db)
            if settings.require_master:
                step = "check the server's role"
                role = await self.execute_command("ROLE")
                if not isinstance(role, list) or not role or role[0] != "master":
                    raise CoordinationUnavailableError(
                        f"the server Sentinel named is not a master (role {role[0] if role else None!r})"
                    )
            else:
                step = "ping"
                await self.execute_command("PING")
        except Exception as e:
            # drop it: ClientService then connects again, after a pause
            if self.transport is not None:
                self.transport.abortConnection()
            if isinstance(e, txredisapi.ResponseError):
                raise CoordinationUnavailableError(f"could not {step}: {e}") from None
            raise unavailable(e) from None
        return self


class CommandProtocol(_Handshake, txredisapi.RedisProtocol):
    """txredisapi's command protocol, with our handshake and reactor."""

    def __init__(self, reactor, settings: ConnectionSettings) -> None:
        txredisapi.RedisProtocol.__init__(
            self, charset="utf-8", replyTimeout=settings.reply_timeout, convertNumbers=False
        )
        self._set_up(reactor, settings)


class SubscriberProtocol(_Handshake, txredisapi.SubscriberProtocol):
    """
    txredisapi's subscriber protocol, with our handshake and reactor;
    messages go to ``on_message(channel, payload)``.
    """

    on_message = None

    def __init__(self, reactor, settings: ConnectionSettings) -> None:
        txredisapi.SubscriberProtocol.__init__(
            self, charset="utf-8", replyTimeout=settings.reply_timeout, convertNumbers=False
        )
        self._set_up(reactor, settings)

    def messageReceived(self, pattern, channel, message):
        if self.on_message is not None:
            self.on_message(channel, message)


class _ProtocolFactory(Factory):
    noisy = False

    def __init__(self, build) -> None:
        self._build = build

    def buildProtocol(self, addr):
        protocol = self._build()
        protocol.factory = self
        return protocol


class RedisConnection:
    """
    One connection to Redis, kept up in the background once used (see the
    module docstring for its states).

    :param reactor: for connecting, retrying and reply timeouts.
    :param endpoint: an IStreamClientEndpoint reaching the server
        (:mod:`difydaemon.coordination.redis.endpoints`).
    :param settings: the handshake.
    :param protocol_class: :class:`CommandProtocol` or
        :class:`SubscriberProtocol`.
    :param max_retry_delay: longest pause between two connection attempts,
        before a random 0 to 1 s is added (Twisted's backoff jitter, which
        spreads the reconnections of many replicas).
    :param jitter: replaces that random addition (tests).
    """

    def __init__(
        self,
        reactor,
        endpoint,
        settings: ConnectionSettings,
        protocol_class=CommandProtocol,
        max_retry_delay: float = 2.0,
        description: str = "redis",
        jitter=None,
    ) -> None:
        self._reactor = reactor
        self._settings = settings
        self._description = description
        self._protocol = None
        self._started = False
        self._closed = False
        self._down_reason: str | None = None
        self._first_waiters: list[Deferred] = []
        #: called with the protocol each time a connection becomes usable
        self.ready_listeners: list = []
        #: called with the reason each time the usable connection is lost
        self.lost_listeners: list = []
        jitter = {} if jitter is None else {"jitter": jitter}
        self._backoff = backoffPolicy(initialDelay=0.1, maxDelay=max_retry_delay, factor=2.0, **jitter)
        # consecutive connections refused at the handshake (bad password,
        # not a master): ClientService counts them as successes
        self._rejected = 0
        self._service = ClientService(
            _ObservedEndpoint(endpoint, self._attempt_failed),
            _ProtocolFactory(lambda: self._build(protocol_class)),
            retryPolicy=self._retry_delay,
            clock=reactor,
        )

    def _build(self, protocol_class):
        protocol = protocol_class(self._reactor, self._settings)
        # The handshake is watched here rather than through ClientService's
        # prepareConnection: a failed preparation leaves the connection open
        # and its later close breaks ClientService's state machine.
        protocol.ready.addCallbacks(self._usable, self._handshake_failed)
        return protocol

    def _retry_delay(self, attempt: int) -> float:
        return self._backoff(max(attempt, self._rejected))

    @property
    def usable(self) -> bool:
        """Whether a connection is up and logged in now."""
        return self._protocol is not None

    def start(self) -> None:
        """Start connecting (the first command does it too)."""
        if not self._started and not self._closed:
            self._started = True
            self._service.startService()

    async def protocol(self):
        """
        The usable protocol, connecting first if this connection was never
        used.

        :raises CoordinationUnavailableError: when there is none now.
        """
        if self._closed:
            raise CoordinationUnavailableError("the connection is closed")
        if self._protocol is not None:
            return self._protocol
        if self._down_reason is not None:
            raise CoordinationUnavailableError(self._down_reason)
        waiter = Deferred()
        self._first_waiters.append(waiter)
        self.start()
        return await waiter

    async def execute(self, *args):
        """
        Send one command; its reply.

        :raises CoordinationUnavailableError: Redis is down, the connection
            broke, or no reply came within the reply timeout.
        :raises CoordinationError: Redis answered with an error.
        """
        return await send(await self.protocol(), *args)

    def _usable(self, protocol):
        was_down = self._down_reason is not None
        self._rejected = 0
        self._protocol = protocol
        self._down_reason = None
        protocol.on_lost = self._connection_lost
        if was_down:
            log.info("{description}: connection back", description=self._description)
        waiters, self._first_waiters = self._first_waiters, []
        for waiter in waiters:
            waiter.callback(protocol)
        for listener in list(self.ready_listeners):
            try:
                listener(protocol)
            except Exception:
                log.failure("{description}: a ready listener failed", description=self._description)
        return protocol

    def _handshake_failed(self, failure) -> None:
        self._rejected += 1
        self._went_down(unavailable(failure).reason)

    def _attempt_failed(self, failure) -> None:
        self._went_down(f"could not connect: {failure.getErrorMessage()}")

    def _connection_lost(self, protocol, reason) -> None:
        if self._protocol is not protocol:
            return
        self._protocol = None
        self._went_down(f"connection lost: {reason.getErrorMessage()}")
        for listener in list(self.lost_listeners):
            try:
                listener(self._down_reason)
            except Exception:
                log.failure("{description}: a lost listener failed", description=self._description)

    def _went_down(self, reason: str) -> None:
        if self._closed:
            self._down_reason = "the connection is closed"
            return
        if self._down_reason is None:
            log.warn("{description} unavailable: {reason}", description=self._description, reason=reason)
        self._down_reason = reason
        waiters, self._first_waiters = self._first_waiters, []
        for waiter in waiters:
            waiter.errback(CoordinationUnavailableError(reason))

    def close(self):
        """Stop reconnecting and close the connection. Deferred[None]."""
        if self._closed:
            return succeed(None)
        self._closed = True
        waiters, self._first_waiters = self._first_waiters, []
        for waiter in waiters:
            waiter.errback(CoordinationUnavailableError("the connection is closed"))
        if not self._started:
            return succeed(None)
        return self._service.stopService()


@implementer(IStreamClientEndpoint)
class _ObservedEndpoint:
    """An endpoint that reports each failed connection attempt (ClientService only retries)."""

    def __init__(self, endpoint, on_failure) -> None:
        self._endpoint = endpoint
        self._on_failure = on_failure

    def connect(self, factory):
        def failed(failure):
            self._on_failure(failure)
            return failure

        return self._endpoint.connect(factory).addErrback(failed)

    def __repr__(self) -> str:
        return repr(self._endpoint)
