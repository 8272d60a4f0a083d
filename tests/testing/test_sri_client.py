"""The SRI test helpers speak the connector's formats: the launch form and stream, and /invoke bodies."""

from __future__ import annotations

import io
import json

from difydaemon.api.multipart import read_form
from difydaemon.sri import wire
from difydaemon.testing import sri_client as sri
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.packages import build_package, echo_plugin_files


class SRIHelperTests(SynchronousTestCase):
    def test_launch_form_read_by_connector(self):
        """The form the helper builds is the launch the connector decodes: file, name, metadata."""
        package = build_package(echo_plugin_files())
        filename = sri.package_filename(package)
        content_type, body = sri.launch_form(package, filename, verified=True)
        data = read_form(io.BytesIO(body), content_type, "context", ("verified", "metadata"))
        form = wire.launch_form(
            data.filenames["context"], data.files["context"], data.fields["verified"], data.fields["metadata"]
        )
        self.assertEqual((form.filename, form.package, form.verified), (filename, package, True))

    def test_launch_events(self):
        """The stream reader skips blank and event: lines and cuts data:, as the daemon does."""
        body = b"event: progress\n" + wire.building("b").encode() + b"\n" + wire.finished().encode()
        self.assertEqual([e["Stage"] for e in sri.launch_events(body)], ["build", "end"])
        announced = sri.announced(sri.launch_events(wire.launched("http://h:1", "n", "i").encode()))
        self.assertEqual(announced, {"endpoint": "http://h:1", "name": "n", "id": "i"})

    def test_invoke(self):
        """An /invoke body names the tool; response blocks split on blank lines."""
        request = json.loads(sri.tool_invoke("s1", "hi"))
        self.assertEqual((request["session_id"], request["data"]["tool_parameters"]), ("s1", {"text": "hi"}))
        self.assertEqual(sri.invoke_events(b'{"a":1}\n\n{"b":2}\n\n'), [{"a": 1}, {"b": 2}])
