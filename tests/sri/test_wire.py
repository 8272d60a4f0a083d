"""The SRI wire formats: launch stream lines, instances bodies, the launch form, package file names."""

from __future__ import annotations

import json

from difydaemon.sri import wire
from difydaemon.testing.cases import SynchronousTestCase

CHECKSUM = "ab" * 32
FILENAME = f"acme@echo@0.0.1@{CHECKSUM}.difypkg"


def decoded_line(event: wire.LaunchEvent) -> dict:
    """The JSON of an encoded event, read as the daemon reads a line (``data:`` cut, trimmed)."""
    line = event.encode()
    assert line.endswith(b"\n\n") and line.count(b"\n") == 2
    return json.loads(line.strip()[len(b"data:"):])


class LaunchEventTests(SynchronousTestCase):
    def test_encoding(self):
        """An event is one ``data:`` line of the four keys the daemon reads, then a blank line."""
        self.assertEqual(
            decoded_line(wire.building("installing")),
            {"Stage": "build", "State": "running", "Obj": "", "Message": "installing"},
        )

    def test_launched_message(self):
        """The run/success event carries endpoint, name and id as comma-separated pairs."""
        body = decoded_line(wire.launched("http://127.0.0.1:4100", "acme-echo", "f00"))
        self.assertEqual((body["Stage"], body["State"]), ("run", "success"))
        self.assertEqual(body["Message"], "endpoint=http://127.0.0.1:4100,name=acme-echo,id=f00")

    def test_launched_refuses_separators(self):
        """A value with ``,`` or ``=`` (or an empty one) cannot be announced: the daemon would misparse it."""
        for endpoint, name in (("http://h:1/?a=b", "n"), ("http://h:1", "a,b"), ("", "n")):
            self.assertRaises(ValueError, wire.launched, endpoint, name, "id")

    def test_end_and_failure(self):
        """A launch ends with end/success, or with a failed event that says why."""
        self.assertEqual(decoded_line(wire.finished())["Stage"], "end")
        self.assertEqual(
            decoded_line(wire.failed("build", "uv failed")),
            {"Stage": "build", "State": "failed", "Obj": "", "Message": "uv failed"},
        )


class InstancesBodyTests(SynchronousTestCase):
    def test_listed(self):
        """A deployed function is listed with the keys the daemon reads."""
        body = json.loads(wire.instances_body([wire.FunctionItem("id1", "fn", "http://h:1", "running")]))
        self.assertEqual(body["error"], "")
        self.assertEqual(
            body["Items"],
            [{"ID": "id1", "Name": "fn", "Endpoint": "http://h:1", "ResourceName": "fn", "Status": {"State": "running"}}],
        )

    def test_not_found(self):
        """No function: an empty item list and no error (the daemon then launches)."""
        self.assertEqual(json.loads(wire.instances_body([])), {"error": "", "Items": []})

    def test_error_body(self):
        """A refusal carries a non-empty error, which the daemon reports."""
        self.assertEqual(json.loads(wire.error_body("unauthorized")), {"error": "unauthorized", "Items": []})


class FilenameTests(SynchronousTestCase):
    def test_identifier(self):
        """author@name@version@checksum.difypkg names author/name:version@checksum."""
        identifier = wire.identifier_of_filename(FILENAME)
        self.assertEqual(identifier.raw, f"acme/echo:0.0.1@{CHECKSUM}")
        self.assertEqual(wire.filename_of(identifier), FILENAME)

    def test_refused_names(self):
        """Names of another form, or naming no valid plugin, are refused."""
        for name in (
            "acme@echo@0.0.1.difypkg",
            f"acme@echo@0.0.1@{CHECKSUM}.zip",
            f"../x@echo@0.0.1@{CHECKSUM}.difypkg",
            f"acme@echo@0.0.1@{CHECKSUM}@x.difypkg",
            f"acme@echo@0.0.1@{'z' * 64}.difypkg",
        ):
            self.assertRaises(wire.LaunchRefused, wire.identifier_of_filename, name)

    def test_function_name(self):
        """A function's name holds neither ``,`` nor ``=`` and tells the package."""
        name = wire.function_name(wire.identifier_of_filename(FILENAME))
        self.assertEqual(name, f"acme-echo-0.0.1-{CHECKSUM[:12]}")


class LaunchFormTests(SynchronousTestCase):
    def test_decoded(self):
        """The file part, its name, ``verified`` and matching metadata make a launch."""
        metadata = json.dumps({"plugin_unique_identifier": f"acme/echo:0.0.1@{CHECKSUM}"})
        form = wire.launch_form(FILENAME, b"zip", "true", metadata)
        self.assertEqual((form.filename, form.package, form.verified), (FILENAME, b"zip", True))

    def test_without_file(self):
        """A form without the ``context`` file is refused."""
        self.assertRaises(wire.LaunchRefused, wire.launch_form, None, None, "false", None)

    def test_metadata_mismatch(self):
        """Metadata naming another package than the file name is refused."""
        metadata = json.dumps({"plugin_unique_identifier": f"acme/other:0.0.1@{CHECKSUM}"})
        error = self.assertRaises(wire.LaunchRefused, wire.launch_form, FILENAME, b"zip", "false", metadata)
        self.assertIn("acme/other", str(error))

    def test_metadata_not_json(self):
        """Metadata that is not a JSON object is refused."""
        for metadata in ("{", "[1]"):
            self.assertRaises(wire.LaunchRefused, wire.launch_form, FILENAME, b"zip", "false", metadata)
