"""Tests for difydaemon.packaging.isolation and difydaemon.packaging.child."""

from __future__ import annotations

import io
import os
import stat
import sys
import threading
import time

import attrs
import orjson
from twisted.trial.unittest import SkipTest

from difydaemon.errors import InternalServerError, MalformedPackageError, PackageError, SignatureError
from difydaemon.packaging import child
from difydaemon.packaging.archive import read_package
from difydaemon.packaging.checksum import package_checksum
from difydaemon.packaging.isolation import ChildLimits, ChildProcessDecoder, InProcessDecoder
from difydaemon.packaging.package import BAD_SIGNATURE, PackagePolicy, decode_bundle, decode_package
from difydaemon.packaging.plugin_yaml import YamlLimits
from difydaemon.packaging.signature import generate_key_pair, load_public_key, sign_package
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.packages import build_package, echo_plugin_files

from tests.packaging.fixtures import AGENT, ALL_PACKAGES, HOSTILE_PACKAGES, OPENAI, fixture_bytes, policy
from tests.packaging.test_package import bundle


def outcome(function, *args):
    """What a decode gives, comparable across decoders: the result or the error's class and text."""
    try:
        decoded = function(*args)
    except PackageError as error:
        return type(error).__name__, error.message
    return decoded.identifier.raw, decoded.declaration, decoded.verification, dict(decoded.files)


def bundle_outcome(dependencies):
    return [
        (item["type"], item["value"], item.get("asset"), item.get("data"),
         outcome(lambda: item["decoded"]) if "decoded" in item else None)
        for item in dependencies
    ]


class DecoderContract:
    """What every decoder gives: decode_package's and decode_bundle's results and errors."""

    def decoder(self):
        raise NotImplementedError

    def setUp(self):
        super().setUp()
        self.subject = self.decoder()
        if hasattr(self.subject, "close"):
            self.addCleanup(self.subject.close)

    def test_fixtures(self):
        """The real fixtures decode as decode_package decodes them, verification included."""
        for name in ALL_PACKAGES:
            data = fixture_bytes(name)
            self.assertEqual(outcome(self.subject.package, data, policy(), False),
                             outcome(decode_package, data, policy(), False), name)

    def test_policy_travels(self):
        """Forced verification, the verify flag, extra keys and YAML limits apply as in process."""
        unsigned = build_package(echo_plugin_files())
        self.assertEqual(outcome(self.subject.package, unsigned, policy(force_verify=True), False),
                         ("SignatureError", BAD_SIGNATURE))
        self.assertRaises(SignatureError, self.subject.package, unsigned, policy(), True)
        private_pem, public_pem = generate_key_pair(bits=2048)
        signed = sign_package(unsigned, private_pem, "partner", 1)
        keys = (load_public_key(public_pem),)
        decoded = self.subject.package(signed, policy(force_verify=True, extra_keys=keys), False)
        self.assertEqual(decoded.verification.authorized_category, "partner")
        small = PackagePolicy(max_size=1 << 20, force_verify=False, enforce_langgenius=False, public_keys=(),
                              yaml_limits=YamlLimits(max_nodes=10))
        with self.assertRaises(MalformedPackageError) as caught:
            self.subject.package(unsigned, small, False)
        self.assertIn("over 10 nodes", caught.exception.message)

    def test_hostile_packages(self):
        """Every hostile fixture is refused with decode_package's error."""
        for name in HOSTILE_PACKAGES:
            data = fixture_bytes(name)
            expected = outcome(decode_package, data, policy(), False)
            self.assertIn(expected[0], ("MalformedPackageError", "InvalidManifestError"))
            self.assertEqual(outcome(self.subject.package, data, policy(), False), expected, name)

    def test_bundles(self):
        """Bundles decode as decode_bundle decodes them, and the Langgenius rule refuses alike."""
        package = build_package(echo_plugin_files())
        checksum = package_checksum(read_package(package, 1 << 20))
        data = bundle(
            [
                {"type": "marketplace", "value": {"marketplace_pattern": "langgenius/openai:0.0.19"}},
                {"type": "package", "value": {"path": checksum}},
                {"type": "package", "value": {"path": "agent"}},
            ],
            {checksum: package, "agent": fixture_bytes(AGENT)},
        )
        self.assertEqual(bundle_outcome(self.subject.bundle(data, policy(), 1 << 24, False)),
                         bundle_outcome(decode_bundle(data, policy(), 1 << 24, False)))
        openai = bundle([{"type": "package", "value": {"path": "o"}}], {"o": fixture_bytes(OPENAI)})
        with self.assertRaises(SignatureError):
            self.subject.bundle(openai, policy(enforce_langgenius=True), 1 << 24, False)


class InProcessDecoderTests(DecoderContract, SynchronousTestCase):
    """The in-process decoder keeps the contract."""

    def decoder(self):
        return InProcessDecoder()


class ChildProcessDecoderTests(DecoderContract, SynchronousTestCase):
    """The child-process decoder keeps the contract, with real children."""

    def decoder(self):
        return ChildProcessDecoder()

    def test_spare_child(self):
        """A decode leaves one spare child waiting; close ends it and refuses later decodes."""
        self.assertIsNone(self.subject.spare)
        self.subject.package(fixture_bytes(ALL_PACKAGES[2]), policy(), False)
        spare = self.subject.spare
        self.assertIsNone(spare.poll())
        self.subject.close()
        self.assertIsNotNone(spare.returncode)
        self.assertRaises(InternalServerError, self.subject.package, b"", policy(), False)

    def test_spare_child_waits_with_the_parser_loaded(self):
        """The spare child loads the YAML parser before its package comes (the daemon itself never loads it)."""
        import yaml

        if not yaml.__with_libyaml__:
            raise SkipTest("PyYAML without libyaml: no extension module to see in the child's memory map")
        self.subject.package(fixture_bytes(ALL_PACKAGES[2]), policy(), False)
        maps = f"/proc/{self.subject.spare.pid}/maps"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with open(maps) as f:
                if "/yaml/_yaml" in f.read():
                    return
            time.sleep(0.05)
        self.fail("the spare child never loaded PyYAML's extension")

    def test_memory_limit(self):
        """A package that needs more memory than the child may take is refused saying so."""
        files = echo_plugin_files()
        files["manifest.yaml"] += b"extra: [" + b",".join(b"w%d" % i for i in range(400_000)) + b"]\n"
        decoder = ChildProcessDecoder(ChildLimits(base_memory=80 << 20, memory_per_input_byte=0))
        self.addCleanup(decoder.close)
        with self.assertRaises(MalformedPackageError) as caught:
            decoder.package(build_package(files), _without_node_budget(), False)
        self.assertIn("more than 80 MiB", caught.exception.message)

    def test_deadline(self):
        """A decode still running at the deadline is killed and refused saying so."""
        files = echo_plugin_files()
        files["manifest.yaml"] += b"extra: [" + b",".join(b"w%d" % i for i in range(400_000)) + b"]\n"
        decoder = ChildProcessDecoder(ChildLimits(timeout=0.05))
        self.addCleanup(decoder.close)
        with self.assertRaises(MalformedPackageError) as caught:
            decoder.package(build_package(files), _without_node_budget(), False)
        self.assertIn("took more than 0.05 seconds", caught.exception.message)


def _without_node_budget() -> PackagePolicy:
    """The fixtures' policy with room for the 400,000-node manifests that exhaust the child."""
    return attrs.evolve(policy(), yaml_limits=YamlLimits(max_nodes=10_000_000))


class FakeChildTests(SynchronousTestCase):
    """What the parent gives its children and how it reads those that misbehave (fake interpreters)."""

    def fake_python(self, script: str) -> ChildProcessDecoder:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as handle:
            handle.write("#!/bin/sh\n" + script)
        os.chmod(path, stat.S_IRWXU)
        decoder = ChildProcessDecoder(python=path)
        self.addCleanup(decoder.close)
        return decoder

    def test_child_imports_what_the_daemon_imports(self):
        """The child's PYTHONPATH is the daemon's sys.path, so it finds the same difydaemon."""
        decoder = self.fake_python(
            """cat > /dev/null\nprintf '{"error": {"type": "SystemExit", "message": "%s"}}' "$PYTHONPATH"\n"""
        )
        with self.assertRaises(InternalServerError) as caught:
            decoder.package(b"zip", policy(), False)
        self.assertEqual(caught.exception.message.split(os.pathsep), [path for path in sys.path if path])

    def test_child_inherits_no_secret(self):
        """A decoder child gets the daemon's PATH but none of its other variables (its secrets)."""
        os.environ["DB_PASSWORD"] = "hunter2"
        self.addCleanup(os.environ.pop, "DB_PASSWORD", None)
        decoder = self.fake_python(
            """cat > /dev/null\nprintf '{"error": {"type": "SystemExit", "message": "%s|%s"}}' "$DB_PASSWORD" "$PATH"\n"""
        )
        with self.assertRaises(InternalServerError) as caught:
            decoder.package(b"zip", policy(), False)
        self.assertEqual(caught.exception.message, "|" + os.environ["PATH"])

    def test_close_kills_a_decoding_child(self):
        """Closing the decoder kills a child still decoding: its caller's thread is not held."""
        decoder = self.fake_python("cat > /dev/null\nexec sleep 60\n")
        outcomes = []

        def decode():
            try:
                decoder.package(b"zip", policy(), False)
            except MalformedPackageError as exc:
                outcomes.append(exc.message)

        thread = threading.Thread(target=decode)
        thread.start()
        for _ in range(500):
            if decoder._busy:
                break
            time.sleep(0.01)
        decoder.close()
        thread.join(30)
        self.assertFalse(thread.is_alive())
        self.assertEqual(len(outcomes), 1)
        self.assertIn("exited with -9", outcomes[0])

    def test_child_killed(self):
        """A child that dies without answering is a -400 naming its exit status."""
        decoder = self.fake_python("cat > /dev/null\nkill -9 $$\n")
        with self.assertRaises(MalformedPackageError) as caught:
            decoder.package(b"zip", policy(), False)
        self.assertIn("exited with -9", caught.exception.message)

    def test_garbage_answer(self):
        """An answer that is not the protocol's is refused, not trusted."""
        decoder = self.fake_python("cat > /dev/null\necho '[1, 2]'\n")
        self.assertRaises(MalformedPackageError, decoder.package, b"zip", policy(), False)

    def test_unknown_error_type(self):
        """An error type that is not one of the daemon's errors becomes an internal error."""
        decoder = self.fake_python("""cat > /dev/null\necho '{"error": {"type": "SystemExit", "message": "m"}}'\n""")
        with self.assertRaises(InternalServerError) as caught:
            decoder.package(b"zip", policy(), False)
        self.assertEqual(caught.exception.message, "m")


class ChildMainTests(SynchronousTestCase):
    """child.main answers on its stdout, whatever happens."""

    def run_child(self, header, data=b""):
        stdout, self.stderr, self.limits = io.BytesIO(), io.StringIO(), []
        line = orjson.dumps({"memory": 12345, **header}) + b"\n" if header is not None else b""
        self.assertEqual(child.main(io.BytesIO(line + data), stdout, self.stderr, self.limits.append), 0)
        return orjson.loads(stdout.getvalue()) if stdout.getvalue() else None

    def test_closed_stdin(self):
        """A spare whose parent closes its stdin exits quietly."""
        self.assertIsNone(self.run_child(None))

    def test_package_error(self):
        """A refused package is answered with the error's class and text."""
        answer = self.run_child({"kind": "package", "policy": child.policy_header(policy()),
                                 "verify_signature": False}, b"not a zip")
        self.assertEqual(answer["error"]["type"], "MalformedPackageError")

    def test_bug(self):
        """An exception that is not a DaemonError is answered as an internal error."""
        answer = self.run_child({"kind": "package", "policy": {}})
        self.assertEqual(answer["error"]["type"], "InternalServerError")
        self.assertIn("KeyError", answer["error"]["message"])
        self.assertIn("Traceback", self.stderr.getvalue())

    def test_answer_is_json(self):
        """A decoded package is answered with its identifier, declaration and verification."""
        answer = self.run_child({"kind": "package", "policy": child.policy_header(policy()),
                                 "verify_signature": False}, build_package(echo_plugin_files()))
        self.assertTrue(answer["ok"]["identifier"].startswith("acme/echo:0.0.1@"))
        self.assertEqual(answer["ok"]["declaration"]["name"], "echo")
        self.assertIsNone(answer["ok"]["verification"])
        self.assertEqual(self.limits, [12345])
