"""
How slowly a request body may arrive once its head is in.

A client that trickles a body one byte every few seconds holds a connection,
and a buffer, for as long as it likes: the idle timeout never fires, since
bytes keep coming.  A :class:`BodyPace` bounds that: a grace period, then a
minimum average rate; every byte received buys ``1 / rate`` seconds more.  A
body that has not kept up is answered 408 and its connection closed, by
both HTTP stacks.

:class:`BodyClock` applies a pace to one body; it never reads a clock
itself (``now`` is passed in), so the channels drive it from their
reactor's ``seconds()`` and tests from a fake clock.
"""

from __future__ import annotations

from attrs import frozen


@frozen
class BodyPace:
    """
    A body's time budget: ``grace`` seconds, then at least ``rate`` bytes a
    second on average since the head was read.

    :ivar grace: seconds any body may take, however small.
    :ivar rate: bytes a second a longer body must average.
    """

    grace: float
    rate: float

    def deadline(self, started: float, received: int) -> float:
        """From when a body that started at ``started`` with ``received`` bytes is too slow."""
        return started + self.grace + received / self.rate


#: Routes behind ``X-Api-Key`` (Dify's API server, uploads from its UI):
#: a generous grace, and a pace any link Dify sits on exceeds.
KEYED_PACE = BodyPace(grace=30.0, rate=16 * 1024)
#: Public routes (``/e/...``, ``/health/check``, unknown paths): anyone on
#: the network may open these, so less patience.
PUBLIC_PACE = BodyPace(grace=10.0, rate=32 * 1024)


class BodyClock:
    """
    One body's progress against its :class:`BodyPace`.

    :param pace: the budget.
    :param started: when the head was read (the reactor's seconds).
    """

    __slots__ = ("pace", "started", "received")

    def __init__(self, pace: BodyPace, started: float) -> None:
        self.pace = pace
        self.started = started
        self.received = 0

    def advance(self, size: int) -> None:
        """``size`` more bytes of the body have arrived."""
        self.received += size

    def check(self, now: float) -> float | None:
        """
        :return: None if the body is too slow at ``now``, else the seconds
            until it could next be (when to check again).
        """
        left = self.pace.deadline(self.started, self.received) - now
        return left if left > 0 else None
