"""The connector's memory of its functions: the file's format, and reading what is broken."""

from __future__ import annotations

import json
import os

from difydaemon.sri.state import STATE_FILE, FunctionRecord, decode_records, encode_records, load_records, save_records
from difydaemon.testing.cases import SynchronousTestCase

RECORD = FunctionRecord("a@b@0.0.1@c.difypkg", "a-b", "f1", 41000, ("/w/.venv/bin/python", "-m", "main"), "/w")


class StateTests(SynchronousTestCase):
    def test_round_trip(self):
        """Records come back as they were written."""
        self.assertEqual(decode_records(encode_records([RECORD, RECORD])), [RECORD, RECORD])

    def test_broken_entries_left_out(self):
        """Entries missing a key, with a bad port or an empty command are left out; the rest is kept."""
        good = json.loads(encode_records([RECORD]))["functions"][0]
        entries = [good, {**good, "port": 0}, {**good, "argv": []}, {k: v for k, v in good.items() if k != "path"}, 7]
        self.assertEqual(decode_records(json.dumps({"format": 1, "functions": entries}).encode()), [RECORD])

    def test_not_a_state_file(self):
        """Content that is not a state file of this format is refused."""
        for data in (b"[]", b'{"format": 2}', b"{"):
            self.assertRaises(ValueError, decode_records, data)

    def test_load_and_save(self):
        """Saved records load back; a missing or corrupt file loads as none."""
        path = self.mktemp()
        self.assertEqual(load_records(path), [])
        save_records(path, [RECORD])
        self.assertEqual(load_records(path), [RECORD])
        self.assertEqual([name for name in os.listdir(path) if name != STATE_FILE], [])
        with open(os.path.join(path, STATE_FILE), "wb") as f:
            f.write(b'{"format": 1, "functions": [')
        self.assertEqual(load_records(path), [])
