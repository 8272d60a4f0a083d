"""A small seeded fuzz run of the package decoder (bench/package_fuzz.py runs the large one)."""

from __future__ import annotations

import random

import yaml

from difydaemon.errors import DaemonError
from difydaemon.packaging.archive import read_package
from difydaemon.packaging.package import decode_package
from difydaemon.packaging.plugin_yaml import Loader, PythonLoader, YamlBudget, YamlRefused, parse_yaml
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.mutations import mutations
from difydaemon.testing.packages import build_package

from tests.packaging.fixtures import AGENT, MAX_SIZE, UNSIGNED, fixture_bytes, policy
from tests.packaging.test_plugin_yaml import reference

CASES = 60


def outcome(function, *args):
    """("value", v) or ("error", None) for a YAML read."""
    try:
        return "value", function(*args)
    except (yaml.YAMLError, YamlRefused, ValueError, KeyError, TypeError, RecursionError):
        return "error", None


class DecoderFuzzTests(SynchronousTestCase):
    """Seeded mutations of real packages never escape as anything but a DaemonError."""

    def test_mutations(self):
        """Mutated packages decode or fail with DaemonErrors; the event builder agrees with the old loader."""
        rng = random.Random(20260101)
        escapes, differences, refused = [], [], 0
        for name in (UNSIGNED, AGENT):
            files = dict(read_package(fixture_bytes(name), MAX_SIZE))
            for mutation in mutations(rng, files, CASES):
                try:
                    decode_package(build_package(mutation.files), policy())
                except DaemonError:
                    refused += 1
                except Exception as error:  # noqa: BLE001 - what this test looks for
                    escapes.append((name, mutation.description, repr(error)))
                changed = mutation.files[mutation.description.split(":", 1)[0]]
                try:
                    text = changed.decode("utf-8")
                except UnicodeDecodeError:
                    continue
                expected = outcome(reference, text)
                same_parser = outcome(parse_yaml, text, YamlBudget(), PythonLoader)
                libyaml = outcome(parse_yaml, text, YamlBudget(), Loader)
                if same_parser != expected or (libyaml[0] == expected[0] == "value" and libyaml != expected):
                    differences.append((name, mutation.description))
        self.assertEqual(escapes, [])
        self.assertEqual(differences, [])
        self.assertGreater(refused, CASES // 4)
