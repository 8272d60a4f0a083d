"""Tests for difydaemon.observability.logs: the daemon's log observer and how twistd gets it."""

from __future__ import annotations

import io
import json
import os

from twisted.application.service import Application
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, Logger, LogPublisher, textFileLogObserver

from difydaemon import tap
from difydaemon.config import load_config
from difydaemon.observability.logs import PLUGIN_NAMESPACE, build_observer
from difydaemon.testing.cases import SynchronousTestCase
from tests.test_tap import environment


def observability(**extra):
    environ = environment("/nonexistent", 5002)
    environ.update(extra)
    return load_config(environ).observability


def emit(observer, namespace="difydaemon.test"):
    """Log one event of each level through ``observer``."""
    publisher = LogPublisher(observer)
    log = Logger(namespace=namespace, observer=publisher)
    log.debug("quiet {n}", n=0)
    log.info("plugin {plugin_id}: {plugin_message}", plugin_id="acme/echo", instance=0, plugin_message="hi")
    log.warn("careful {n}", n=2)
    log.error("broken {n}", n=3)


class ObserverTests(SynchronousTestCase):
    """LOG_OUTPUT_FORMAT, LOG_LEVEL and LOG_FILE."""

    def test_json_one_object_per_line(self):
        """json: each event is one JSON object on its own line, with its named fields."""
        out = io.StringIO()
        emit(build_observer(observability(LOG_OUTPUT_FORMAT="json"), stdout=out), namespace=PLUGIN_NAMESPACE)
        lines = out.getvalue().split("\n")
        self.assertEqual(lines[-1], "")
        events = [json.loads(line) for line in lines[:-1]]
        self.assertEqual(len(events), 3)
        self.assertNotIn("\x1e", out.getvalue())
        info = events[0]
        self.assertEqual(
            (info["plugin_id"], info["instance"], info["plugin_message"], info["log_namespace"]),
            ("acme/echo", 0, "hi", PLUGIN_NAMESPACE),
        )
        self.assertEqual([e["log_level"]["name"] for e in events], ["info", "warn", "error"])

    def test_level(self):
        """LOG_LEVEL drops the less severe events; DEBUG keeps them all."""
        out = io.StringIO()
        emit(build_observer(observability(LOG_LEVEL="ERROR", LOG_OUTPUT_FORMAT="json"), stdout=out))
        self.assertEqual([json.loads(line)["n"] for line in out.getvalue().splitlines()], [3])
        out = io.StringIO()
        emit(build_observer(observability(LOG_LEVEL="debug", LOG_OUTPUT_FORMAT="json"), stdout=out))
        self.assertEqual(len(out.getvalue().splitlines()), 4)
        out = io.StringIO()
        emit(build_observer(observability(LOG_LEVEL="WARNING", LOG_OUTPUT_FORMAT="json"), stdout=out))
        self.assertEqual(len(out.getvalue().splitlines()), 2)

    def test_text(self):
        """text (the default): formatted lines, not JSON."""
        out = io.StringIO()
        emit(build_observer(observability(), stdout=out))
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 3)
        self.assertIn("plugin acme/echo: hi", lines[0])
        self.assertFalse(lines[0].startswith("{"))

    def test_log_file_too(self):
        """LOG_FILE gets the same lines as standard output, appended."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("earlier\n")
        out = io.StringIO()
        emit(build_observer(observability(LOG_FILE=path, LOG_OUTPUT_FORMAT="json"), stdout=out))
        with open(path) as f:
            written = f.read()
        self.assertEqual(written, "earlier\n" + out.getvalue())
        self.assertEqual(len(out.getvalue().splitlines()), 3)

    def test_broken_log_file_does_not_silence_stdout(self):
        """A LOG_FILE that fails to write leaves standard output logging."""

        class Full(io.StringIO):
            def write(self, text):
                raise OSError(28, "No space left on device")

        out = io.StringIO()
        observer = build_observer(observability(LOG_FILE="x", LOG_OUTPUT_FORMAT="json"), stdout=out,
                                  open_file=lambda *a, **k: Full())
        emit(observer)
        self.assertEqual(len(out.getvalue().splitlines()), 3)

    def test_bad_values_refused(self):
        """An unknown level or format is a configuration error naming the variable."""
        from difydaemon.errors import ConfigError

        for name, value in [("LOG_LEVEL", "LOUD"), ("LOG_OUTPUT_FORMAT", "xml")]:
            error = self.assertRaises(ConfigError, observability, **{name: value})
            self.assertIn(name, str(error))


class TwistdTests(SynchronousTestCase):
    """The daemon gives twistd's application its observer, unless one is already set."""

    def service(self, **extra):
        options = tap.Options()
        options.parseOptions(["--env-file", "/nonexistent/.env"])
        environ = environment(self.mktemp(), 5002)
        environ.update(extra)
        return tap.makeService(options, reactor=MemoryReactorClock(), environ=environ)

    def test_offered_to_the_application(self):
        """The application twistd makes gets the configured observer as its ILogObserver."""
        application = Application("difydaemon")
        self.service(LOG_OUTPUT_FORMAT="json").setServiceParent(application)
        observer = application.getComponent(ILogObserver)
        self.assertIsNotNone(observer)
        self.assertTrue(ILogObserver.providedBy(observer))

    def test_existing_observer_kept(self):
        """An application that already has an observer keeps it."""
        application = Application("difydaemon")
        mine = textFileLogObserver(io.StringIO())
        application.setComponent(ILogObserver, mine)
        self.service().setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), mine)
