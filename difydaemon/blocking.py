"""
Where blocking work runs: a thread pool in the daemon, inline in unit tests.

Zip decoding, hashing and file copies must never run on the reactor thread;
code that needs them takes a runner and calls ``runner.run(f, *args)``.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class ThreadPoolRunner:
    """
    Runs blocking functions in a thread pool of its own.

    :param reactor: the reactor that receives results.
    :param name: the pool's name (shows in thread dumps).
    :param max_threads: at most this many threads.
    """

    def __init__(self, reactor, name: str, max_threads: int = 4) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name=name)
        self._started = False

    def start(self) -> None:
        """Start the pool's threads."""
        if not self._started:
            self._pool.start()
            self._started = True

    def stop(self) -> None:
        """Stop the pool; queued work still finishes first."""
        if self._started:
            self._pool.stop()
            self._started = False

    def run(self, function, *args, **kwargs) -> Deferred:
        """Run ``function`` in a pool thread; the Deferred fires on the reactor."""
        self.start()
        return deferToThreadPool(self._reactor, self._pool, function, *args, **kwargs)


class InlineRunner:
    """Runs blocking functions at once, in the caller's thread (unit tests)."""

    def run(self, function, *args, **kwargs) -> Deferred:
        """Call ``function`` now; its result or exception in a fired Deferred."""
        return maybeDeferred(function, *args, **kwargs)

    def start(self) -> None:
        """Nothing to start."""

    def stop(self) -> None:
        """Nothing to stop."""
