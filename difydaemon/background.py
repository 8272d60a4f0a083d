"""
Work started in the background: tracked until it ends, so that whoever must
wait for it (a stop, a test) can, and its failure logged, never dropped.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

log = Logger()


def start_tracked(coroutine: Coroutine[Any, Any, None], pending: set[Deferred], failed: str, **fields) -> Deferred:
    """
    Run ``coroutine`` as a Deferred kept in ``pending`` until it ends.

    :param failed: the log format of its failure, with ``fields`` (named
        fields for :class:`twisted.logger.Logger`).
    :return: the Deferred, which fires with None once the work is over,
        whether it succeeded or not.
    """
    done = Deferred.fromCoroutine(coroutine)
    done.addErrback(lambda failure: log.failure(failed, failure, **fields))
    if not done.called:
        pending.add(done)
        done.addBoth(lambda _: pending.discard(done))
    return done
