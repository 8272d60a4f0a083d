"""
Decoding time and peak memory of packages, each measured in a fresh
process: the real fixtures, the hostile ones, the synthetic telegram-like
package and any ``.difypkg`` given.

For each package: the outcome (identifier, or the error class and message),
the best and median of ``--repeats`` in-process ``decode_package`` calls,
and the peak RSS of the measuring process (its baseline after imports is
printed once).  ``--daemon-source DIR`` measures another version of the
code (the measuring processes import ``difydaemon`` from there).

Usage: ``python bench/package_decode.py [--repeats 5] [--daemon-source DIR] [--no-hostile] [PACKAGE ...]``
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "..", "shared", "fixtures")

# Run in a fresh interpreter per package: imports, then the decodes.
MEASURE = r"""
import json, resource, sys, time
import difydaemon
assert difydaemon.__file__.startswith(sys.argv[3]), difydaemon.__file__
from difydaemon.errors import DaemonError
from difydaemon.packaging.package import PackagePolicy, decode_package
from difydaemon.packaging.signature import official_public_key
policy = PackagePolicy(max_size=52428800, force_verify=False, enforce_langgenius=True,
                       public_keys=(official_public_key(),))
data = open(sys.argv[1], "rb").read()
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times, outcome = [], None
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    try:
        outcome = decode_package(data, policy).identifier.raw
    except DaemonError as error:
        outcome = f"{type(error).__name__}: {error.message}"
    times.append(time.perf_counter() - start)
times.sort()
print(json.dumps({"outcome": outcome, "best": times[0], "median": times[len(times) // 2],
                  "baseline_kib": baseline, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def measure(path: str, repeats: int, source: str, directory: str) -> dict:
    env = dict(os.environ, PYTHONPATH=source)
    # Away from the repository: "-c" puts the working directory first on sys.path.
    completed = subprocess.run([sys.executable, "-c", MEASURE, os.path.abspath(path), str(repeats), source], env=env,
                               cwd=directory, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        return {"outcome": f"CRASHED ({completed.returncode}): {completed.stderr.strip().splitlines()[-1:]}",
                "best": float("nan"), "median": float("nan"), "baseline_kib": 0, "peak_kib": 0}
    return json.loads(completed.stdout)


def synthetic_package(directory: str) -> str:
    sys.path.insert(0, REPO)
    from difydaemon.testing.packages import build_package, heavy_trigger_plugin_files

    path = os.path.join(directory, "synthetic-telegram-like.difypkg")
    with open(path, "wb") as handle:
        handle.write(build_package(heavy_trigger_plugin_files()))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--daemon-source", default=REPO)
    parser.add_argument("--no-hostile", action="store_true",
                        help="leave out the hostile fixtures (the alias bomb took 3 GiB and 94 s before)")
    args = parser.parse_args()
    source = os.path.abspath(args.daemon_source)
    print(f"code measured: {source}; cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as directory:
        paths = sorted(glob.glob(os.path.join(FIXTURES, "*.difypkg")))
        paths += [synthetic_package(directory)] + list(args.packages)
        if not args.no_hostile:
            paths += sorted(glob.glob(os.path.join(FIXTURES, "hostile", "*.difypkg")))
        for path in paths:
            result = measure(path, args.repeats, source, directory)
            print(
                f"{os.path.basename(path)}: best {result['best'] * 1e3:.0f} ms, median {result['median'] * 1e3:.0f} ms, "
                f"peak RSS {result['peak_kib'] / 1024:.0f} MiB (after imports {result['baseline_kib'] / 1024:.0f} MiB): "
                f"{result['outcome'][:110]}"
            )


if __name__ == "__main__":
    main()
