"""
Holding a lease over time, and a leader election built on one.

:class:`HeldLease` renews a lease every third of its ttl.  Its holder counts
the lease as valid until ``ttl`` seconds after it *sent* the last renewal
that succeeded (never later than Redis can have expired it); if no renewal
succeeds by then, or Redis answers that the token no longer holds it, the
lease is reported lost, once, through ``on_lost(reason)``, and renewing
stops.  A holder must stop acting on the lease's behalf when told.

:class:`LeaderElection` campaigns for a lease, holds it while it can and
campaigns again when it is lost.  The leader's fencing token grows with
every election: whoever takes writes from leaders (a database row holding
the highest token seen, say) can refuse those of a deposed leader that has
not noticed yet.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from difydaemon.coordination.namespace import check_name, ttl_milliseconds
from difydaemon.errors import CoordinationUnavailableError

log = Logger()


class HeldLease:
    """
    A lease this process holds (make it with :meth:`acquire`).

    :ivar name: the lease's name.
    :ivar token: its fencing token.
    :ivar valid_until: the reactor time until which the lease is surely held.
    :ivar lost_reason: None while held; why it was lost or "released".
    """

    def __init__(self, reactor, leases, name: str, token: int, ttl: float, on_lost, valid_from: float) -> None:
        self._reactor = reactor
        self._leases = leases
        self.name = name
        self.token = token
        self._ttl = ttl
        self._on_lost = on_lost
        self.valid_until = valid_from + ttl
        self.lost_reason: str | None = None
        self._renewal = None
        self._expiry = None
        self._schedule(ttl / 3.0)
        self._arm_expiry()

    @classmethod
    async def acquire(cls, reactor, leases, name: str, ttl: float, on_lost=None) -> "HeldLease | None":
        """
        Take the lease ``name`` if it is free; None if it is held.

        :param leases: an ILeaseService.
        :param on_lost: called with the reason when the lease is lost.
        :raises CoordinationUnavailableError: when Redis is down.
        """
        check_name(name, "lease name")
        ttl_milliseconds(ttl)
        sent_at = reactor.seconds()
        token = await leases.acquire(name, ttl)
        if token is None:
            return None
        return cls(reactor, leases, name, token, ttl, on_lost, sent_at)

    @property
    def held(self) -> bool:
        """Whether the lease is still held (by this process's account)."""
        return self.lost_reason is None

    def _schedule(self, delay: float) -> None:
        self._renewal = self._reactor.callLater(delay, self._renew)

    def _arm_expiry(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = self._reactor.callLater(
            max(0.0, self.valid_until - self._reactor.seconds()), self._expired
        )

    def _renew(self) -> None:
        self._renewal = None
        Deferred.fromCoroutine(self._renew_once()).addErrback(
            lambda f: log.failure("renewing lease {name} failed", f, name=self.name)
        )

    async def _renew_once(self) -> None:
        sent_at = self._reactor.seconds()
        try:
            renewed = await self._leases.renew(self.name, self.token, self._ttl)
        except CoordinationUnavailableError as e:
            if self.held:
                log.warn("could not renew lease {name}: {reason}", name=self.name, reason=e.reason)
                # try again soon, still before the lease runs out if possible
                remaining = self.valid_until - self._reactor.seconds()
                self._schedule(min(self._ttl / 3.0, max(self._ttl / 30.0, remaining / 2)))
            return
        if not self.held:
            return
        if not renewed:
            self._lose("the lease expired or was taken over")
            return
        self.valid_until = sent_at + self._ttl
        self._arm_expiry()
        self._schedule(self._ttl / 3.0)

    def _expired(self) -> None:
        self._expiry = None
        if self.held:
            self._lose("it could not be renewed before it expired")

    def _stop_timers(self) -> None:
        for call in (self._renewal, self._expiry):
            if call is not None and call.active():
                call.cancel()
        self._renewal = self._expiry = None

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        self._stop_timers()
        log.warn("lease {name} (token {token}) lost: {reason}", name=self.name, token=self.token, reason=reason)
        if self._on_lost is not None:
            try:
                self._on_lost(reason)
            except Exception:
                log.failure("the holder of lease {name} failed on its loss", name=self.name)

    def release(self):
        """
        Stop renewing and drop the lease (a lease already lost is left
        alone).  Deferred[bool]: whether it was dropped now; a Redis that is
        down makes it expire by itself instead.
        """
        if not self.held:
            return succeed(False)
        self.lost_reason = "released"
        self._stop_timers()
        return Deferred.fromCoroutine(self._release())

    async def _release(self) -> bool:
        try:
            return await self._leases.release(self.name, self.token)
        except CoordinationUnavailableError as e:
            log.warn("lease {name} not released ({reason}); it expires by itself", name=self.name, reason=e.reason)
            return False


class LeaderElection:
    """
    Become the holder of the lease ``name`` when it is free, and stay it.

    :param on_elected: called with the fencing token when this process
        becomes the leader.
    :param on_deposed: called with the reason when it stops being the
        leader other than by :meth:`stop`.
    :param retry_interval: seconds between two tries while someone else
        leads (default: a third of the ttl).
    """

    def __init__(self, reactor, leases, name: str, ttl: float, on_elected, on_deposed, retry_interval: float | None = None) -> None:
        check_name(name, "lease name")
        ttl_milliseconds(ttl)
        self._reactor = reactor
        self._leases = leases
        self._name = name
        self._ttl = ttl
        self._on_elected = on_elected
        self._on_deposed = on_deposed
        self._retry_interval = retry_interval if retry_interval is not None else ttl / 3.0
        self._lease: HeldLease | None = None
        self._next = None
        self._running = False

    @property
    def is_leader(self) -> bool:
        """Whether this process holds the lease now."""
        return self._lease is not None and self._lease.held

    @property
    def token(self) -> int | None:
        """The fencing token while leader, else None."""
        return self._lease.token if self.is_leader else None

    def start(self) -> None:
        """Start campaigning (the first try is made at once)."""
        if not self._running:
            self._running = True
            self._try_soon(0)

    def _try_soon(self, delay: float) -> None:
        if self._running:
            self._next = self._reactor.callLater(delay, self._campaign)

    def _campaign(self) -> None:
        self._next = None
        Deferred.fromCoroutine(self._try()).addErrback(
            lambda f: log.failure("campaign for {name} failed", f, name=self._name)
        )

    async def _try(self) -> None:
        try:
            lease = await HeldLease.acquire(self._reactor, self._leases, self._name, self._ttl, self._lost)
        except CoordinationUnavailableError as e:
            log.warn("cannot campaign for {name}: {reason}", name=self._name, reason=e.reason)
            lease = None
        if not self._running:
            if lease is not None:
                await lease.release()
            return
        if lease is None:
            self._try_soon(self._retry_interval)
            return
        self._lease = lease
        log.info("leader of {name} with token {token}", name=self._name, token=lease.token)
        try:
            self._on_elected(lease.token)
        except Exception:
            log.failure("on_elected for {name} failed", name=self._name)

    def _lost(self, reason: str) -> None:
        self._lease = None
        try:
            self._on_deposed(reason)
        except Exception:
            log.failure("on_deposed for {name} failed", name=self._name)
        self._try_soon(self._retry_interval)

    def stop(self):
        """Stop campaigning and give up the lease if held. Deferred[None]."""
        self._running = False
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        lease, self._lease = self._lease, None
        if lease is None:
            return succeed(None)
        return lease.release().addCallback(lambda _: None)
