"""
A body's pace: a grace period, then a minimum average rate, judged on a
clock that is passed in.
"""

from __future__ import annotations

from difydaemon.api.pace import BodyClock, BodyPace
from difydaemon.testing.cases import SynchronousTestCase

PACE = BodyPace(grace=10.0, rate=100.0)


class BodyPaceTests(SynchronousTestCase):
    """Every byte buys 1/rate seconds past the grace period."""

    def test_deadline(self):
        """The deadline is the start, plus the grace, plus the bytes received over the rate."""
        self.assertEqual(PACE.deadline(1000.0, 0), 1010.0)
        self.assertEqual(PACE.deadline(1000.0, 250), 1012.5)


class BodyClockTests(SynchronousTestCase):
    """A clock says when to look again, and when a body has fallen behind."""

    def test_nothing_within_grace_then_late(self):
        """A body that sends nothing is in time until its grace ends, and late from then on."""
        clock = BodyClock(PACE, 50.0)
        self.assertEqual(clock.check(50.0), 10.0)
        self.assertEqual(clock.check(59.5), 0.5)
        self.assertIsNone(clock.check(60.0))
        self.assertIsNone(clock.check(600.0))

    def test_bytes_buy_time(self):
        """Bytes received move the deadline by size/rate; the next check is due then."""
        clock = BodyClock(PACE, 0.0)
        clock.advance(100)
        self.assertEqual(clock.received, 100)
        self.assertEqual(clock.check(10.0), 1.0)
        clock.advance(50)
        self.assertEqual(clock.check(11.0), 0.5)
        self.assertIsNone(clock.check(11.5))

    def test_trickle_falls_behind(self):
        """One byte a second against 100 bytes a second: late soon after the grace, however long it goes on."""
        clock = BodyClock(PACE, 0.0)
        now = 0.0
        while clock.check(now) is not None:
            now += 1.0
            clock.advance(1)
        self.assertEqual(now, 11.0)

    def test_steady_body_never_late(self):
        """A body at the pace exactly, after its grace, is never late, however large."""
        clock = BodyClock(PACE, 0.0)
        for second in range(1, 10000):
            clock.advance(100)
            self.assertIsNotNone(clock.check(float(second)))
