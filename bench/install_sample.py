"""
Upload -> install task success -> plugin listed (-> first answer for the
echo plugin), each package on a fresh daemon: nothing cached by the daemon
(an empty working path and prepared-venv directory), the machine's uv cache
as it is (warm after the first round).  Prints one line per package and
round, then the phases of the install as the daemon logged them (seconds
from the upload's start).

Packages: the echo plugin the tests build (``echo``, also measured a second
time on the prepared venv the first install kept, ``echo-prepared``: its
daemon is stopped only once that is done) and
every ``.difypkg`` given with ``--package`` (the official fixtures, say).

With ``--shared-caches`` the packages of a round share one prepared-venv
directory and bytecode cache, each install kept before the next starts:
a daemon that installed them in turn (the echo plugin first).

``--compare-env NAME=VALUE`` measures each package a second time right
after the first, on a daemon with that variable set (A B A B ...).

Usage: ``python bench/install_sample.py [--rounds 2] [--package PATH ...] [--phases] [--shared-caches]
[--compare-env NAME=VALUE ...]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from statistics import median

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.harness import TENANT, Daemon, HTTPConnection, http_call  # noqa: E402
from difydaemon.testing.packages import build_package, echo_plugin_files  # noqa: E402

ECHO_BODY = json.dumps(
    {"user_id": "u1", "data": {"provider": "echo", "tool": "echo", "tool_parameters": {"text": "hi"}, "credentials": {}}}
).encode()
ECHO_HEADERS = {"Content-Type": "application/json", "X-Plugin-ID": "acme/echo"}


def install_steps(log_path: str, since: float) -> list[tuple[float, str]]:
    """(seconds after ``since``, step) of every install progress line of the daemon's JSON log."""
    steps = []
    with open(log_path, "rb") as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            log_format = event.get("log_format", "")
            if log_format.startswith("install of {identifier}"):
                steps.append((event["log_time"] - since, event["step"]))
            elif log_format.startswith("{step} of {path} ended after"):
                steps.append((event["log_time"] - since, f"    ({event['step']} ended after {event['seconds']} s)"))
    return steps


async def measure(name: str, package: bytes, prepared: str, answer: bool, keep: bool = False, env=None) -> dict:
    """
    One upload on a fresh daemon sharing ``prepared``: the client's times and
    the daemon's steps.  With ``keep``, the daemon is stopped only once it
    kept the install for later builds.
    """
    daemon = Daemon(prepared_venvs=prepared, extra_env={"LOG_OUTPUT_FORMAT": "json", "LOG_LEVEL": "DEBUG", **(env or {})})
    try:
        await daemon.wait_ready()
        start_wall = time.time()
        start = time.perf_counter()
        identifier = await daemon.upload_install(package)
        installed = time.perf_counter() - start
        status, reply = await http_call("GET", daemon.port, f"/plugin/{TENANT}/management/list?page=1&page_size=100")
        listed_ids = [p["plugin_unique_identifier"] for p in json.loads(reply)["data"]["list"]]
        assert identifier in listed_ids, reply
        listed = time.perf_counter() - start
        answered = None
        if answer:
            connection = HTTPConnection(daemon.port)
            await connection.open()
            status, reply = await connection.request(
                "POST", f"/plugin/{TENANT}/dispatch/tool/invoke", ECHO_BODY, ECHO_HEADERS
            )
            connection.close()
            assert status == 200 and b'"hi"' in reply, reply
            answered = time.perf_counter() - start
        if keep and not await daemon.wait_kept():
            print("    (the install was not kept for later builds)")
        daemon.log.flush()
        return {
            "name": name,
            "installed": installed,
            "listed": listed,
            "answered": answered,
            "steps": install_steps(daemon.log.name, start_wall),
        }
    finally:
        daemon.stop()


def print_result(result: dict, phases: bool) -> None:
    answered = "" if result["answered"] is None else f", first answer {result['answered']:.2f} s"
    print(
        f"  {result['name']}: installed {result['installed']:.2f} s, listed {result['listed']:.2f} s{answered}",
        flush=True,
    )
    if phases:
        for at, step in result["steps"]:
            print(f"      {at:6.2f}  {step}")


async def main(args) -> None:
    print(f"cores: {os.cpu_count()}; uv cache: {os.environ.get('DIFYDAEMON_TEST_UV_CACHE') or 'the tests’ shared one'}")
    packages = [("echo", build_package(echo_plugin_files()), True)]
    for path in args.package:
        with open(path, "rb") as f:
            packages.append((os.path.basename(path), f.read(), False))
    if args.compare_env:
        # each package also measured right after with these variables: interleaved A B A B
        extra = dict(item.split("=", 1) for item in args.compare_env)
        label = ",".join(args.compare_env)
        packages = [p for name, package, answer in packages for p in ((name, package, answer, None), (f"{name} [{label}]", package, answer, extra))]
    else:
        packages = [(name, package, answer, None) for name, package, answer in packages]
    results: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}:", flush=True)
        # with --shared-caches, one prepared-venv directory (and bytecode cache) for the round
        shared = tempfile.mkdtemp(prefix="difydaemon-bench-prepared-") if args.shared_caches else None
        try:
            for name, package, answer, env in packages:
                # nothing cached by the daemon: a new working path and prepared-venv directory
                prepared = shared or tempfile.mkdtemp(prefix="difydaemon-bench-prepared-")
                try:
                    try:
                        result = await measure(name, package, prepared, answer, keep=answer or shared is not None, env=env)
                    except Exception as e:  # a package whose requirements cannot be had here
                        print(f"  {name}: failed: {e}", flush=True)
                        continue
                    print_result(result, args.phases)
                    results.setdefault(name, []).append(result["answered"] or result["listed"])
                    if answer and shared is None:
                        again = await measure(f"{name}-prepared", package, prepared, answer, env=env)
                        print_result(again, args.phases)
                        results.setdefault(again["name"], []).append(again["answered"])
                finally:
                    if shared is None:
                        shutil.rmtree(prepared, ignore_errors=True)
        finally:
            if shared is not None:
                shutil.rmtree(shared, ignore_errors=True)
    print("medians (upload -> listed, or first answer where measured):")
    for name, values in results.items():
        print(f"  {name}: {median(values):.2f} s over {len(values)} runs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--package", action="append", default=[], help="a .difypkg to measure too")
    parser.add_argument("--phases", action="store_true", help="print each install step's time")
    parser.add_argument(
        "--compare-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="measure each package again right after, with this daemon variable (repeatable)",
    )
    parser.add_argument(
        "--shared-caches",
        action="store_true",
        help="the packages of a round share the daemon's caches, each kept before the next (a daemon that installed them in turn)",
    )
    asyncio.run(main(parser.parse_args()))
