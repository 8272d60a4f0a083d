"""The ``twistd difydaemon`` service plugin."""

from twisted.application.service import ServiceMaker

difydaemon = ServiceMaker(
    "difydaemon",
    "difydaemon.tap",
    "A Dify plugin daemon: plugin management, runtimes and dispatch.",
    "difydaemon",
)
