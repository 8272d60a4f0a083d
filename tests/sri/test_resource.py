"""
The connector's routes over its real HTTP channel, in memory: a launch
handler driving a launcher with a fake builder, a fake process reactor and
a fake health probe; the stream's bytes as the daemon reads them.
"""

from __future__ import annotations

import json
import os

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from difydaemon.blocking import InlineRunner
from difydaemon.sri.admission import ConnectorFrontDoor
from difydaemon.sri.functions import FunctionTable
from difydaemon.sri.launcher import FunctionLauncher
from difydaemon.sri.resource import ConnectorResource
from difydaemon.sri.tap import ConnectorSite
from difydaemon.testing import sri_client as sri
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.http import http_chunks
from difydaemon.testing.packages import build_package, echo_plugin_files
from difydaemon.testing.process import FakeProcessReactor
from tests.sri.fakes import FakeBuilder, FakeProbe, Ports

KEY = b"resource-key"
PACKAGE = build_package(echo_plugin_files())
FILENAME = sri.package_filename(PACKAGE)


class ConnectorResourceTests(SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.reactor = FakeProcessReactor()
        self.builder = FakeBuilder()
        self.probe = FakeProbe()
        self.table = FunctionTable()
        launcher = FunctionLauncher(
            self.reactor,
            self.builder,
            InlineRunner().run,
            self.table,
            os.path.abspath(self.mktemp()),
            "127.0.0.1",
            "http://daemon:5002",
            {"PATH": "/usr/bin"},
            self.probe,
            10**7,
            start_timeout=5.0,
            allocate_port=Ports(),
        )
        resource = ConnectorResource(launcher, InlineRunner().run, 10**7)
        self.site = ConnectorSite(resource, reactor=self.reactor, front_door=ConnectorFrontDoor(KEY, 10**7))

    def request(self, method: bytes, target: bytes, body: bytes = b"", content_type: bytes = b"") -> StringTransport:
        protocol = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.protocol = protocol
        head = method + b" " + target + b" HTTP/1.1\r\nHost: sri\r\nAuthorization: " + KEY + b"\r\n"
        if content_type:
            head += b"Content-Type: " + content_type + b"\r\n"
        protocol.dataReceived(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return transport

    def body(self, transport: StringTransport) -> bytes:
        head, _, rest = transport.value().partition(b"\r\n\r\n")
        if b"chunked" in head.lower():
            return b"".join(http_chunks(rest))
        return rest

    def launch(self, package: bytes = PACKAGE, filename: str = FILENAME) -> StringTransport:
        content_type, body = sri.launch_form(package, filename)
        return self.request(b"POST", b"/v1/launch", body, content_type.encode())

    def test_ping(self):
        """Ping answers the JSON string "pong", on POST and GET."""
        for method in (b"POST", b"GET"):
            self.assertEqual(self.body(self.request(method, b"/ping")), b'"pong"')

    def test_launch_stream(self):
        """A launch streams start and build progress, then run/success with the function URL, then end/success."""
        transport = self.launch()
        self.reactor.advance(0)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        events = sri.launch_events(self.body(transport))
        self.assertEqual(events[0]["Stage"], "start")
        self.assertIn({"Stage": "build", "State": "running", "Obj": "", "Message": "creating venv with Python 3.12"}, events)
        self.assertEqual([(e["Stage"], e["State"]) for e in events[-2:]], [("run", "success"), ("end", "success")])
        announced = sri.announced(events)
        self.assertEqual(announced["endpoint"], "http://127.0.0.1:41000")
        self.assertEqual(announced["name"], self.table.get(FILENAME).spec.name)

    def test_launch_failure_ends_stream(self):
        """A failed build ends the stream with a failed event carrying the builder's message, and no end event."""
        self.builder.error = "creating venv failed (exit 2):\nno interpreter"
        events = sri.launch_events(self.body(self.launch()))
        self.assertEqual(events[-1], {"Stage": "build", "State": "failed", "Obj": "", "Message": "creating venv failed (exit 2):\nno interpreter"})
        self.assertNotIn("end", [e["Stage"] for e in events])

    def test_bad_launch_form(self):
        """A body that is not a launch form is answered with a failed event saying why."""
        events = sri.launch_events(self.body(self.request(b"POST", b"/v1/launch", b"{}", b"application/json")))
        self.assertEqual([(e["Stage"], e["State"]) for e in events], [("start", "failed")])
        self.assertIn("bad launch request", events[0]["Message"])
        bad_name = sri.launch_events(self.body(self.launch(PACKAGE, "echo.difypkg")))
        self.assertIn("echo.difypkg", bad_name[-1]["Message"])

    def test_instances(self):
        """Instances lists a launched package's function, and nothing for another."""
        self.launch()
        found = json.loads(self.body(self.request(b"GET", b"/v1/runner/instances?filename=" + FILENAME.encode())))
        [item] = found["Items"]
        self.assertEqual((item["Endpoint"], item["Status"]), ("http://127.0.0.1:41000", {"State": "running"}))
        missing = json.loads(self.body(self.request(b"GET", b"/v1/runner/instances?filename=other.difypkg")))
        self.assertEqual(missing, {"error": "", "Items": []})

    def test_instances_needs_filename(self):
        """Instances without a filename is a 400 with an error."""
        transport = self.request(b"GET", b"/v1/runner/instances")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertIn("filename", json.loads(self.body(transport))["error"])

    def test_remove(self):
        """DELETE on instances stops the function and says whether there was one."""
        self.launch()
        transport = self.request(b"DELETE", b"/v1/runner/instances?filename=" + FILENAME.encode())
        self.reactor.advance(5)
        self.assertEqual(json.loads(self.body(transport)), {"error": "", "removed": True})
        self.assertEqual(self.reactor.running_processes, [])
        again = self.request(b"DELETE", b"/v1/runner/instances?filename=" + FILENAME.encode())
        self.assertEqual(json.loads(self.body(again)), {"error": "", "removed": False})

    def test_client_gone_mid_launch(self):
        """A daemon that hangs up during a launch does not stop it: the function is there for the next call."""
        self.builder.hold = True
        transport = self.launch()
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.builder.release()
        self.reactor.advance(0)
        self.assertIsNotNone(self.table.get(FILENAME))
        self.assertNotIn(b"\"Stage\":\"run\"", transport.value().partition(b"\r\n\r\n")[2])
