"""``twistd dify-sri``'s wiring, built on a memory reactor: nothing listens until it starts."""

from __future__ import annotations

import os

from twisted.internet.testing import MemoryReactorClock

from difydaemon.config import ConfigError
from difydaemon.runtimes.environment import BackgroundBuildsService
from difydaemon.sri.tap import ConnectorSite, Options, makeService
from difydaemon.testing.cases import SynchronousTestCase


class MakeServiceTests(SynchronousTestCase):
    def options(self):
        options = Options()
        options.parseOptions(["--env-file", os.path.join(self.mktemp(), "missing.env")])
        return options

    def test_refuses_without_key(self):
        """Without SRI_API_KEY no connector is built (twistd then exits non-zero)."""
        error = self.assertRaises(ConfigError, makeService, self.options(), MemoryReactorClock(), {"PATH": os.defpath})
        self.assertEqual(error.variable, "SRI_API_KEY")

    def test_waits_for_background_builds(self):
        """The connector's services include one that makes its stop wait for background compilations."""
        working = os.path.abspath(self.mktemp())
        service = makeService(
            self.options(),
            MemoryReactorClock(),
            {"SRI_API_KEY": "k", "SRI_WORKING_PATH": working, "PATH": os.environ["PATH"]},
        )
        self.assertEqual(len([child for child in service if isinstance(child, BackgroundBuildsService)]), 1)

    def test_listens_on_configured_port(self):
        """The connector listens on SRI_HOST:SRI_PORT with its hardened site, once started."""
        reactor = MemoryReactorClock()
        working = os.path.abspath(self.mktemp())
        service = makeService(
            self.options(),
            reactor,
            {"SRI_API_KEY": "k", "SRI_PORT": "5999", "SRI_HOST": "127.0.0.1", "SRI_WORKING_PATH": working, "PATH": os.environ["PATH"]},
        )
        self.assertEqual(reactor.tcpServers, [])
        # the listener alone: the whole service would also restore functions in threads
        [listener] = [child for child in service if not isinstance(child, BackgroundBuildsService)]
        listener.startService()
        self.addCleanup(listener.stopService)
        port, factory, _backlog, interface = reactor.tcpServers[0]
        self.assertEqual((port, interface), (5999, "127.0.0.1"))
        self.assertIsInstance(factory, ConnectorSite)
