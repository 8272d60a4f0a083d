"""
The daemon's log observer: ``LOG_LEVEL``, ``LOG_OUTPUT_FORMAT`` and
``LOG_FILE``, as in Go, on ``twisted.logger``.

:func:`build_observer` makes one :class:`~twisted.logger.ILogObserver` that
writes every event at or above the level to standard output -- as text, or
as one JSON object a line (``jsonFileLogObserver`` without its RFC 7464
record separator, which Loki, Fluent Bit and CloudWatch do not expect) --
and appends the same lines to ``LOG_FILE`` when it is set.

twistd installs it through :class:`~difydaemon.service.DaemonService`,
which offers it to the application as its ``ILogObserver``; twistd's own
``--logger`` still wins over it (see ``twisted.application.app.AppLogger``).
Plugin output is logged in the namespace :data:`PLUGIN_NAMESPACE`.
"""

from __future__ import annotations

import sys

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)
from zope.interface import implementer

#: the namespace of the events made from a plugin's own output
PLUGIN_NAMESPACE = "difydaemon.plugin"

_LEVELS = {
    "DEBUG": LogLevel.debug,
    "INFO": LogLevel.info,
    "WARN": LogLevel.warn,
    "ERROR": LogLevel.error,
}


def log_level(name: str) -> LogLevel:
    """The :class:`LogLevel` of a ``LOG_LEVEL`` value (as the configuration normalised it)."""
    return _LEVELS[name]


def format_observer(output, output_format: str) -> ILogObserver:
    """An observer writing to ``output`` (a text file) as ``text`` or ``json`` lines."""
    if output_format == "json":
        return jsonFileLogObserver(output, recordSeparator="")
    return textFileLogObserver(output)


@implementer(ILogObserver)
class FanOut:
    """Gives each event to every observer; one that raises does not stop the others."""

    def __init__(self, observers) -> None:
        self._observers = tuple(observers)

    def __call__(self, event: dict) -> None:
        for observer in self._observers:
            try:
                observer(event)
            except Exception:
                # a full disk must not silence standard output; the global
                # publisher would report it, and logging here could loop
                pass


def build_observer(config, stdout=None, open_file=open) -> ILogObserver:
    """
    The observer of an ``ObservabilityConfig``.

    :param stdout: where to write (``sys.stdout`` by default).
    :param open_file: opens ``LOG_FILE`` for appending (tests pass their own).
    :raises OSError: when ``LOG_FILE`` cannot be opened.
    """
    outputs = [sys.stdout if stdout is None else stdout]
    if config.log_file:
        outputs.append(open_file(config.log_file, "a", encoding="utf-8"))
    observers = [format_observer(output, config.log_output_format) for output in outputs]
    observer = observers[0] if len(observers) == 1 else FanOut(observers)
    return FilteringLogObserver(observer, [LogLevelFilterPredicate(defaultLogLevel=log_level(config.log_level))])
