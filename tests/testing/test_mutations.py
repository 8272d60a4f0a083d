"""Tests for difydaemon.testing.mutations."""

from __future__ import annotations

import random

from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.mutations import mutate_structure, mutate_text, mutations
from difydaemon.testing.packages import echo_plugin_files


class MutationTests(SynchronousTestCase):
    """Mutations are reproducible and change one YAML file each."""

    def test_seeded_runs_repeat(self):
        """The same seed gives the same mutations."""
        files = echo_plugin_files()
        first = [m.files for m in mutations(random.Random(7), files, 20)]
        second = [m.files for m in mutations(random.Random(7), files, 20)]
        self.assertEqual(first, second)

    def test_one_yaml_file_changes(self):
        """Each mutation changes at most the one YAML file its description names."""
        files = echo_plugin_files()
        changed_any = 0
        for mutation in mutations(random.Random(3), files, 40):
            name = mutation.description.split(":", 1)[0]
            self.assertTrue(name.endswith(".yaml"))
            others = {key: value for key, value in mutation.files.items() if key != name}
            self.assertEqual(others, {key: value for key, value in files.items() if key != name})
            changed_any += mutation.files[name] != files[name]
        self.assertGreater(changed_any, 30)

    def test_structure_and_text(self):
        """A structure mutation returns a new document; a text mutation new bytes."""
        document = {"a": [1, {"b": 2}]}
        description, changed = mutate_structure(random.Random(1), document)
        self.assertEqual(document, {"a": [1, {"b": 2}]})
        self.assertTrue(description)
        description, text = mutate_text(random.Random(1), b"a: 1\n")
        self.assertNotEqual(text, b"a: 1\n")
