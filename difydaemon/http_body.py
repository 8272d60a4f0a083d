"""
Reading an HTTP response body piece by piece, with a way to stop early.

Dify's inner API answers, the serverless connector's launch stream and a
function's ``/invoke`` response are bodies read as they arrive; each may
have to be cut short (a deadline, an oversized line or frame, the caller
leaving), which closes the connection rather than reading on.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss


class BodyLost(Exception):
    """The connection ended before the body did."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StopReading(Exception):
    """Raised by a sink that has read all it wants: :attr:`BodyStream.done` fires with None."""


class BodyStream(Protocol):
    """
    Hands each piece of a body to ``sink(data)`` as it arrives.

    :ivar done: fires with None at the end of the body or when the sink
        raises :class:`StopReading`; fails with what the sink raised, with
        :class:`BodyLost` when the connection is lost, or with what
        :meth:`stop` is given.  Cancelling it closes the connection.
    """

    def __init__(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        self._reading = True
        self.done: Deferred = Deferred(lambda _: self._close())

    def dataReceived(self, data: bytes) -> None:
        if not self._reading:
            return
        try:
            self._sink(data)
        except StopReading:
            self._end(None)
        except BaseException:
            self._end(Failure())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._reading:
            return
        self._reading = False
        # A body without a length ends with the connection; whoever parses
        # it notices if it was cut short.  (isinstance, not Failure.check:
        # this runs at the end of every body, and check names every class)
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self.done.callback(None)
        else:
            self.done.errback(self.lost(reason_of(reason.value)))

    def lost(self, reason: str) -> Exception:
        """What :attr:`done` fails with when the connection is lost (subclasses name their peer)."""
        return BodyLost(reason)

    def stop(self, failure: Failure) -> None:
        """Stop reading: close the connection and fail :attr:`done`."""
        self._end(failure)

    def _end(self, result) -> None:
        if not self._reading:
            return
        self._close()
        if isinstance(result, Failure):
            self.done.errback(result)
        else:
            self.done.callback(result)

    def _close(self) -> None:
        self._reading = False
        if self.transport is not None:
            self.transport.loseConnection()


def reason_of(error: BaseException) -> str:
    """A readable reason for a connection failure (twisted.web wraps causes in lists of Failures)."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        error = reasons[0].value
    return str(error) or type(error).__name__


async def read_head(response, limit: int) -> bytes:
    """At most about ``limit`` bytes of a (failed) response's body; a lost connection ends it quietly."""
    pieces: list[bytes] = []
    size = 0

    def sink(data: bytes) -> None:
        nonlocal size
        pieces.append(data)
        size += len(data)
        if size >= limit:
            raise StopReading()

    reader = BodyStream(sink)
    response.deliverBody(reader)
    try:
        await reader.done
    except BodyLost:
        pass
    return b"".join(pieces)[:limit]
