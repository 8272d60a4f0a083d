"""Tests for difydaemon.packaging.plugin_yaml."""

from __future__ import annotations

import yaml

from difydaemon.errors import InvalidManifestError, MalformedPackageError
from difydaemon.packaging.archive import read_package
from difydaemon.packaging.declaration import build_declaration
from difydaemon.packaging.plugin_yaml import (
    Loader,
    PackageYaml,
    PythonLoader,
    YamlBudget,
    YamlLimits,
    YamlRefused,
    allowed_alias_ratio,
    parse_yaml,
    plain,
)
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.packages import echo_plugin_files

from tests.packaging.fixtures import (
    ALIAS_BOMB,
    ALL_PACKAGES,
    ARCH_MAPPING,
    DEEP_MAPPING,
    DEEP_SEQUENCE,
    HOSTILE_PACKAGES,
    MAX_SIZE,
    SELF_ALIAS,
    fixture_bytes,
)

LOADERS = (Loader, PythonLoader)


def reference(text: str):
    """What the daemon's previous loader built: PyYAML's Python SafeLoader with the plugin rules."""
    return plain(yaml.load(text, Loader=PythonLoader))  # noqa: S506 - a SafeLoader subclass


class ReferenceYaml(PackageYaml):
    """A package read by the previous loader (no budget), to compare declarations."""

    def load(self, filename, kind="file"):
        if filename not in self.files:
            raise InvalidManifestError(f"failed to read {kind}: {filename} (not found in the package)")
        return reference(self.files[filename].decode("utf-8"))


def parse(text: str, loader=Loader, **limits):
    return parse_yaml(text, YamlBudget(YamlLimits(**limits)), loader)


def files_of(name: str) -> dict:
    return dict(read_package(fixture_bytes(name), MAX_SIZE))


def manifest_text(name: str) -> str:
    return files_of(name)["manifest.yaml"].decode("utf-8")


class LoaderTests(SynchronousTestCase):
    """One loader, libyaml's parser where it exists, with the plugin resolver rules."""

    def test_libyaml_when_available(self):
        """Loader is built on CSafeLoader when PyYAML has libyaml, else on SafeLoader."""
        if yaml.__with_libyaml__:
            self.assertTrue(issubclass(Loader, yaml.CSafeLoader))
        else:
            self.assertIs(Loader, PythonLoader)
        self.assertTrue(issubclass(PythonLoader, yaml.SafeLoader))

    def test_resolver_rules(self):
        """Timestamps stay text and only true/false are booleans; numbers and nulls as before, both loaders."""
        text = (
            "t: true\nT: TRUE\nf: False\nyes: yes\nno: No\non: on\noff: OFF\n"
            "date: 2025-01-01\nstamp: 2025-03-30T14:38:08.927240378Z\n"
            "int: 42\nhex: 0x1F\nunderscore: 1_000\nsexagesimal: 190:20:30\nneg: -7\n"
            "float: 1.5\nexp: 6.02e+23\nquoted: '42'\ndouble: \"true\"\n"
            "null1: ~\nnull2: null\nnull3:\n"
        )
        expected = {
            "t": True, "T": True, "f": False, "yes": "yes", "no": "No", "on": "on", "off": "OFF",
            "date": "2025-01-01", "stamp": "2025-03-30T14:38:08.927240378Z",
            "int": 42, "hex": 31, "underscore": 1000, "sexagesimal": 685230, "neg": -7,
            "float": 1.5, "exp": 6.02e23, "quoted": "42", "double": "true",
            "null1": None, "null2": None, "null3": None,
        }
        self.assertEqual(reference(text), expected)
        for loader in LOADERS:
            value = parse(text, loader)
            self.assertEqual(value, expected, loader)
            self.assertIs(value["t"], True)

    def test_keys_become_text_as_before(self):
        """Non-text keys become text as before: booleans lowercased, collisions resolved the same way."""
        text = "1: a\n'1': b\ntrue: c\nnull: d\n1.5: e\n.inf: f\n"
        expected = reference(text)
        # true == 1 for Python: PyYAML's dict kept one key, which "1" then replaced.
        self.assertEqual(expected, {"1": "b", "None": "d", "1.5": "e", "inf": "f"})
        self.assertEqual(reference("false: x\n"), {"false": "x"})
        for loader in LOADERS:
            self.assertEqual(parse("false: x\n", loader), {"false": "x"})
        for loader in LOADERS:
            self.assertEqual(parse(text, loader), expected)

    def test_fixture_yaml_matches_reference(self):
        """Every YAML file of the real fixtures and of the readable hostile packages builds the same value."""
        compared = 0
        for name in ALL_PACKAGES + (ARCH_MAPPING,):
            for filename, content in files_of(name).items():
                if not filename.endswith(".yaml"):
                    continue
                text = content.decode("utf-8")
                try:
                    expected = reference(text)
                except yaml.YAMLError:
                    # The arch-mapping package's provider file is cut short.
                    for loader in LOADERS:
                        self.assertRaises(yaml.YAMLError, parse, text, loader)
                    continue
                for loader in LOADERS:
                    self.assertEqual(parse(text, loader), expected, (name, filename))
                compared += 1
        self.assertGreater(compared, 50)

    def test_fixture_declarations_match_reference(self):
        """The declarations of the real fixtures equal those the previous loader gave."""
        for name in ALL_PACKAGES:
            files = files_of(name)
            self.assertEqual(build_declaration(files), build_declaration(files, ReferenceYaml(files)), name)

    def test_hostile_declarations_refused_alike(self):
        """The arch-mapping package is refused with the same message by both loaders."""
        files = files_of(ARCH_MAPPING)
        messages = []
        for package in (PackageYaml(files), ReferenceYaml(files)):
            with self.assertRaises(InvalidManifestError) as caught:
                build_declaration(files, package)
            messages.append(caught.exception.message)
        self.assertEqual(messages[0], messages[1])
        self.assertIn("meta.arch", messages[0])

    def test_aliases_are_independent_copies(self):
        """An alias expands into a copy of its anchor's value, as before."""
        text = "a: &x {k: [1, 2]}\nb: *x\nc: *x\n"
        for loader in LOADERS:
            value = parse(text, loader)
            self.assertEqual(value, reference(text))
            value["b"]["k"].append(3)
            self.assertEqual(value["a"], {"k": [1, 2]})
            self.assertEqual(value["c"], {"k": [1, 2]})

    def test_tags_and_merge_keys_keep_pyyaml_meaning(self):
        """Explicit tags and merge keys build what PyYAML builds."""
        text = (
            "base: &b {x: 1, y: 2}\nmerged:\n  <<: *b\n  y: 3\n"
            "text: !!str 12\nnumber: !!int '7'\nblob: !!binary aGVsbG8=\nset: !!set {a: null}\n"
            "stamp: !!timestamp 2025-01-02\n"
        )
        expected = reference(text)
        self.assertEqual(expected["merged"], {"x": 1, "y": 3})
        self.assertEqual(expected["stamp"], "2025-01-02")
        for loader in LOADERS:
            self.assertEqual(parse(text, loader), expected)

    def test_integers_beyond_64_bits(self):
        """Integers no 64-bit type holds become floats, as yaml.v3 reads them, so that orjson can store them."""
        import orjson

        text = "u: 18446744073709551615\nbig: 18446744073709551616\nlow: -9223372036854775809\nkey:\n  99999999999999999999: k\n"
        for loader in LOADERS:
            value = parse(text, loader)
            self.assertEqual(value, reference(text))
            self.assertEqual(value["u"], 2**64 - 1)
            self.assertEqual(value["big"], float(2**64))
            self.assertIsInstance(value["low"], float)
            self.assertEqual(value["key"], {"99999999999999999999": "k"})
            orjson.dumps(value)
        self.assertRaises(YamlRefused, parse, "a: 1" + "0" * 400 + "\n")

    def test_empty_and_scalar_documents(self):
        """An empty document is None and a top-level scalar is itself."""
        for loader in LOADERS:
            self.assertIsNone(parse("", loader))
            self.assertIsNone(parse("# only a comment\n", loader))
            self.assertEqual(parse("--- 12\n", loader), 12)


class RefusalTests(SynchronousTestCase):
    """What cannot be built is refused with YamlRefused (or YAMLError), never another exception."""

    def assertRefused(self, text, *words, **limits):
        for loader in LOADERS:
            with self.assertRaises(YamlRefused) as caught:
                parse(text, loader, **limits)
            for word in words:
                self.assertIn(word, str(caught.exception))

    def test_values_pyyaml_cannot_construct(self):
        """Ints of more than 4300 digits and impossible tagged values are refused, not ValueError or KeyError."""
        self.assertRefused("n: " + "9" * 5000 + "\n", "int")
        self.assertRefused("n: !!int abc\n", "cannot build")
        self.assertRefused("b: !!bool maybe\n", "cannot build")

    def test_non_finite_numbers(self):
        """NaN and infinity are refused as values."""
        for text in ("a: .nan\n", "a: [-.inf]\n", ".inf\n"):
            self.assertRefused(text, "non-finite")

    def test_structure_errors(self):
        """Several documents, duplicate anchors, unknown aliases and collection keys are refused."""
        self.assertRefused("--- 1\n--- 2\n", "single document")
        self.assertRefused("a: &x 1\nb: &x 2\n", "duplicate anchor")
        self.assertRefused("a: *nope\n", "undefined alias")
        self.assertRefused("? [a]\n: 1\n", "unhashable key")

    def test_self_reference(self):
        """An alias inside its own anchor is refused instead of building a cycle."""
        self.assertRefused("rec: &r [*r]\n", "'r'", "itself")
        self.assertRefused("rec: &m {a: {b: *m}}\n", "'m'", "itself")

    def test_depth(self):
        """Nesting beyond max_depth is refused; max_depth itself is accepted."""
        self.assertEqual(parse("[" * 10 + "]" * 10, max_depth=10), [[[[[[[[[[]]]]]]]]]])
        self.assertRefused("[" * 11 + "]" * 11, "deeper than 10", max_depth=10)
        self.assertRefused("a:\n" + "".join("  " * i + f"k{i}:\n" for i in range(1, 12)) + "  " * 12 + "v\n",
                           "deeper than 10", max_depth=10)

    def test_depth_counts_alias_height(self):
        """An alias of a deep anchor placed deep counts the anchor's height."""
        text = "a: &x [[[[1]]]]\nb: [[[[[[*x]]]]]]\n"
        self.assertEqual(parse(text, max_depth=11)["b"], [[[[[[[[[[1]]]]]]]]]])
        self.assertRefused(text, "deeper than 10", max_depth=10)

    def test_node_budget_counts_expansions(self):
        """Every node counts, an alias all the nodes it expands to."""
        text = "a: &x [1, 2, 3]\nb: [*x, *x]\n"
        budget = YamlBudget()
        parse_yaml(text, budget)
        self.assertEqual(budget.nodes, 1 + 2 + 4 + 1 + 2 * 4)
        self.assertEqual(parse(text, max_nodes=16)["b"], [[1, 2, 3], [1, 2, 3]])
        self.assertRefused(text, "over 15 nodes", max_nodes=15)

    def test_default_node_budget(self):
        """By default a document of 250,000 nodes is read and one of 250,001 refused."""
        # the mapping, its key, the sequence and its items
        text = "a: [" + "1," * 249_997 + "]\n"
        self.assertEqual(len(parse_yaml(text, YamlBudget())["a"]), 249_997)
        with self.assertRaises(YamlRefused) as caught:
            parse_yaml("a: [" + "1," * 249_998 + "]\n", YamlBudget())
        self.assertIn("over 250000 nodes", str(caught.exception))

    def test_excessive_aliasing(self):
        """A document made almost only of alias expansions is refused after a few thousand nodes."""
        lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x]"]
        for level in range(1, 9):
            lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
        budget = YamlBudget()
        with self.assertRaises(YamlRefused) as caught:
            parse_yaml("\n".join(lines) + "\n", budget)
        self.assertIn("excessive aliasing", str(caught.exception))
        self.assertLess(budget.nodes, 20000)

    def test_alias_ratio_rule(self):
        """The allowed share of aliased nodes is Go's: 99% up to 400k nodes, 10% from 4M, linear between."""
        self.assertEqual(allowed_alias_ratio(1000), 0.99)
        self.assertEqual(allowed_alias_ratio(400_000), 0.99)
        self.assertAlmostEqual(allowed_alias_ratio(2_200_000), 0.545)
        self.assertEqual(allowed_alias_ratio(4_000_000), 0.10)

    def test_many_small_aliases_accepted(self):
        """Aliases that stay below Go's share are read in full."""
        text = "base: &b {type: string, description: d}\n" + "".join(
            f"p{index}: {{name: n{index}, a: 1, b: 2, c: 3, schema: *b}}\n" for index in range(400)
        )
        for loader in LOADERS:
            self.assertEqual(parse(text, loader), reference(text))


class PackageYamlTests(SynchronousTestCase):
    """PackageYaml reads a package's YAML under one budget and names the file in errors."""

    def test_budget_spans_files(self):
        """Bytes and nodes of every file read add up for the package."""
        files = {"a.yaml": b"k: [1, 2, 3]\n", "b.yaml": b"k: [1, 2, 3]\n"}
        package = PackageYaml(files, YamlLimits(max_bytes=20))
        package.load("a.yaml")
        with self.assertRaises(MalformedPackageError) as caught:
            package.load("b.yaml")
        self.assertEqual(caught.exception.message,
                         "failed to unmarshal file b.yaml: the package's YAML files are over 20 bytes together")
        package = PackageYaml(files, YamlLimits(max_nodes=8))
        package.load("a.yaml")
        with self.assertRaises(MalformedPackageError) as caught:
            package.load("b.yaml")
        self.assertIn("over 8 nodes", caught.exception.message)

    def test_errors_name_the_file_on_one_line(self):
        """A syntax error names the kind and file, on one line."""
        with self.assertRaises(MalformedPackageError) as caught:
            PackageYaml({"t.yaml": b"a: [\n"}).load("t.yaml", "tool file")
        self.assertTrue(caught.exception.message.startswith("failed to unmarshal tool file t.yaml: "))
        self.assertNotIn("\n", caught.exception.message)

    def test_missing_and_not_a_mapping(self):
        """A missing file is InvalidManifestError; a mapping file that is not one is MalformedPackageError."""
        package = PackageYaml({"list.yaml": b"[1]\n", "bad.yaml": b"\xff\n"})
        self.assertRaises(InvalidManifestError, package.load, "gone.yaml")
        self.assertRaises(InvalidManifestError, package.load, ["not", "a", "name"])
        self.assertRaises(MalformedPackageError, package.mapping, "list.yaml")
        self.assertRaises(MalformedPackageError, package.load, "bad.yaml")

    def test_echo_plugin_reads(self):
        """The echo plugin's declaration builds through the budgeted reader."""
        files = echo_plugin_files()
        self.assertEqual(build_declaration(files, PackageYaml(files))["tool"]["identity"]["name"], "echo")


class HostilePackageTests(SynchronousTestCase):
    """Every hostile fixture is refused with a clear error by both parsers."""

    def refusal(self, name, loader):
        files = files_of(name)
        with self.assertRaises((MalformedPackageError, InvalidManifestError)) as caught:
            build_declaration(files, PackageYaml(files, loader=loader))
        return caught.exception.message

    def test_every_hostile_package_refused(self):
        """Each hostile package is refused by both loaders, naming manifest.yaml or the field."""
        for name in HOSTILE_PACKAGES:
            for loader in LOADERS:
                message = self.refusal(name, loader)
                self.assertTrue("manifest.yaml" in message or "meta.arch" in message, (name, message))

    def test_reasons(self):
        """Each hostile package is refused for its own reason."""
        for name, words in (
            (DEEP_MAPPING, "nested deeper than 100 levels"),
            (ALIAS_BOMB, "excessive aliasing"),
            (SELF_ALIAS, "contains an alias to itself"),
            (ARCH_MAPPING, "invalid manifest field meta.arch: unknown architecture"),
        ):
            for loader in LOADERS:
                self.assertIn(words, self.refusal(name, loader), (name, loader))
        # libyaml stops at its own limit of 1000 flow levels first.
        self.assertIn("nested deeper than 100 levels", self.refusal(DEEP_SEQUENCE, PythonLoader))
        self.assertIn("depth", self.refusal(DEEP_SEQUENCE, Loader))
