"""
Fuzz the package decoder with random mutations of the three real fixture
packages (``../shared/fixtures``), in one run:

- every mutated package goes through ``decode_package``; anything it raises
  that is not a DaemonError is an escape, printed with the mutation that
  caused it;
- every mutated YAML file is also read by the libyaml loader and by the
  reference (PyYAML's pure-Python SafeLoader with the same resolver rules,
  the loader the daemon used before): both must build the same value, or
  both must refuse it.  Where libyaml and the Python parser disagree on the
  syntax itself, the case is counted apart (a parser difference, not a
  resolver one).

Prints one line per fixture and a total line.

Usage: ``python bench/package_fuzz.py [--cases 30000] [--seed 1]``
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

from difydaemon.errors import DaemonError  # noqa: E402
from difydaemon.packaging.archive import read_package  # noqa: E402
from difydaemon.packaging.package import PackagePolicy, decode_package  # noqa: E402
from difydaemon.packaging.plugin_yaml import (  # noqa: E402
    Loader,
    PythonLoader,
    YamlBudget,
    YamlRefused,
    parse_yaml,
    plain,
)
from difydaemon.testing.mutations import mutations  # noqa: E402
from difydaemon.testing.packages import build_package  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "fixtures")
PACKAGES = ("unsigned-test_0.0.1.difypkg", "langgenius-agent_0.0.14.difypkg", "langgenius-openai_0.0.19.difypkg")
POLICY = PackagePolicy(max_size=52428800, force_verify=False, enforce_langgenius=False, public_keys=())


def reference(text: str):
    """The value the daemon's previous loader built, or the exception class it raised."""
    try:
        return "value", plain(yaml.load(text, Loader=PythonLoader))  # noqa: S506 - SafeLoader subclass
    except (yaml.YAMLError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as error:
        return "error", type(error).__name__


def ours(text: str, loader):
    try:
        return "value", parse_yaml(text, YamlBudget(), loader)
    except (yaml.YAMLError, YamlRefused) as error:
        return "error", type(error).__name__


def compare(text: bytes, counts: collections.Counter, differences: list, description: str) -> None:
    """Count how the libyaml loader and the reference agree on one YAML text."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        counts["yaml not utf-8"] += 1
        return
    expected = reference(decoded)
    python_events = ours(decoded, PythonLoader)
    libyaml = ours(decoded, Loader)
    if expected[0] == "value":
        if python_events == expected and libyaml == expected:
            counts["yaml same value"] += 1
        elif python_events == expected and libyaml[0] == "error":
            counts["yaml libyaml parser refuses, Python parser accepts"] += 1
        else:
            counts["yaml DIFFERENT"] += 1
            differences.append((description, expected, python_events, libyaml))
    elif python_events[0] == "error" and libyaml[0] == "error":
        counts["yaml both refuse"] += 1
    elif python_events[0] == "error":
        counts["yaml libyaml parser accepts, Python parser refuses"] += 1
    else:
        counts["yaml DIFFERENT"] += 1
        differences.append((description, expected, python_events, libyaml))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=30000, help="mutations in all (split over the fixtures)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    total = collections.Counter()
    escapes = []
    differences: list = []
    started = time.perf_counter()
    for name in PACKAGES:
        with open(os.path.join(FIXTURES, name), "rb") as handle:
            files = dict(read_package(handle.read(), 1 << 26))
        counts = collections.Counter()
        for mutation in mutations(rng, files, args.cases // len(PACKAGES)):
            counts["cases"] += 1
            changed = mutation.description.split(":", 1)[0]
            compare(mutation.files[changed], counts, differences, f"{name} {mutation.description}")
            try:
                decode_package(build_package(mutation.files), POLICY)
                counts["accepted"] += 1
            except DaemonError as error:
                counts[f"refused {type(error).__name__}"] += 1
            except Exception as error:  # noqa: BLE001 - the point is to find these
                counts["ESCAPED"] += 1
                escapes.append((name, mutation.description, repr(error)))
        print(name, dict(sorted(counts.items())))
        total.update(counts)
    print(f"total {dict(sorted(total.items()))} in {time.perf_counter() - started:.0f} s, seed {args.seed}")
    for escape in escapes[:20]:
        print("escape:", *escape)
    for difference in differences[:20]:
        print("difference:", *difference)


if __name__ == "__main__":
    main()
