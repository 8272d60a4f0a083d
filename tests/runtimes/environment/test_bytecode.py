"""
Tests for :mod:`difydaemon.runtimes.environment.bytecode`: the pure parts, the
cache on a fake site-packages, and real uv venvs sharing it.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import zipfile


from difydaemon.runtimes.environment import (
    UNLISTED_LABEL,
    BytecodeCache,
    BytecodeLinks,
    StepCommand,
    bytecode_salt,
    group_key,
    pyc_index,
    pyc_matches_source,
    record_sources,
    run_step,
)
from difydaemon.testing import sdk
from difydaemon.testing.cases import (
    AsyncTestCase,
    SynchronousTestCase,
)
from tests.runtimes.environment.fakes import (
    SITE_PACKAGES,
    copy_echo_plugin,
    SALT,
    pyc_header,
    SOURCE_MTIME,
    FakeSitePackages,
    two_distributions,
)


class BytecodePureTests(SynchronousTestCase):
    def test_record_sources(self):
        """RECORD's .py lines inside site-packages come out normalized with their hash; others are left out."""
        record = (
            "a/__init__.py,sha256=AAA,10\n"
            "a/./b/../c.py,sha256=BBB,20\n"
            '"a/with,comma.py",sha256=CCC,30\n'
            "a/nohash.py,,\n"
            "a/data.txt,sha256=DDD,40\n"
            "../../../bin/tool.py,sha256=EEE,50\n"
            "/abs/x.py,sha256=FFF,60\n"
            "a-1.0.dist-info/RECORD,,\n"
            "\n"
        )
        self.assertEqual(
            record_sources(record),
            [("a/__init__.py", "sha256=AAA"), ("a/c.py", "sha256=BBB"), ("a/with,comma.py", "sha256=CCC"), ("a/nohash.py", "")],
        )

    def test_group_key(self):
        """A group's key ignores the order of its files and changes with the salt, the label, a path or a hash."""
        pairs = [("a/x.py", "h1"), ("a/y.py", "h2")]
        key = group_key(SALT, "a-1.0.dist-info", pairs)
        self.assertEqual(key, group_key(SALT, "a-1.0.dist-info", list(reversed(pairs))))
        self.assertEqual(len({
            key,
            group_key(bytecode_salt("/py/python3.12", "-o 1"), "a-1.0.dist-info", pairs),
            group_key(bytecode_salt("/other/python3.12", None), "a-1.0.dist-info", pairs),
            group_key(SALT, "a-1.1.dist-info", pairs),
            group_key(SALT, "a-1.0.dist-info", [("a/x.py", "h1"), ("a/z.py", "h2")]),
            group_key(SALT, "a-1.0.dist-info", [("a/x.py", "h1"), ("a/y.py", "h3")]),
        }), 6)

    def test_pyc_matches_source(self):
        """Only a timestamp .pyc for the source's very mtime and size matches, as Python checks it."""
        self.assertTrue(pyc_matches_source(pyc_header(1700000000, 123), 1700000000.9, 123))
        self.assertTrue(pyc_matches_source(pyc_header(2**32 + 5, 2**32 + 7), 2**32 + 5, 2**32 + 7))
        self.assertFalse(pyc_matches_source(pyc_header(1700000000, 123), 1700000001, 123))
        self.assertFalse(pyc_matches_source(pyc_header(1700000000, 123), 1700000000, 124))
        self.assertFalse(pyc_matches_source(pyc_header(1700000000, 123, flags=3), 1700000000, 123))
        self.assertFalse(pyc_matches_source(pyc_header(1700000000, 123)[:15], 1700000000, 123))

    def test_pyc_index(self):
        """A __pycache__ listing is filed by source stem, optimization levels included, other names dropped."""
        names = [
            "app.cpython-312.pyc",
            "app.cpython-312.opt-1.pyc",
            "app_x.cpython-312.pyc",
            "a.b.cpython-312.pyc",
            "x.pyc",
            "app.py",
            "app.cpython-312.pyc.140234.tmp",
        ]
        self.assertEqual(
            pyc_index(names),
            {
                "app": ["app.cpython-312.opt-1.pyc", "app.cpython-312.pyc"],
                "app_x": ["app_x.cpython-312.pyc"],
                "a.b": ["a.b.cpython-312.pyc"],
            },
        )


class BytecodeCacheTests(SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.base = os.path.abspath(self.mktemp())
        self.cache = BytecodeCache(os.path.join(self.base, "bytecode"), max_entries=10)

    def site(self, name: str) -> FakeSitePackages:
        return FakeSitePackages(os.path.join(self.base, name, "site-packages"))

    def entries(self) -> list[str]:
        return sorted(os.listdir(self.cache.root)) if os.path.isdir(self.cache.root) else []

    def test_scan_groups(self):
        """Files go with the one RECORD that lists them with a hash; the rest are grouped by content."""
        site = self.site("v1")
        two_distributions(site)
        site.distribution("c-1.0.dist-info", {"c.py": b"C\n"}, hashed=False)
        site.distribution("d-1.0.dist-info", {"ns/__init__.py": b"D\n"})
        site.distribution("e-1.0.dist-info", {"ns/__init__.py": b"E\n"})  # overwrites d's file
        site.write("orphan.py", b"O\n")
        present, groups = self.cache.scan(site.root, SALT)
        self.assertEqual(present, {"a/__init__.py", "a/x.py", "b.py", "c.py", "ns/__init__.py", "orphan.py"})
        self.assertEqual(
            [(group.label, group.sources) for group in groups],
            [
                ("a-1.0.dist-info", ("a/__init__.py", "a/x.py")),
                ("b-2.0.dist-info", ("b.py",)),
                (UNLISTED_LABEL, ("c.py", "ns/__init__.py", "orphan.py")),
            ],
        )
        unlisted_key = groups[-1].key
        site.write("orphan.py", b"changed\n")
        self.assertNotEqual(self.cache.scan(site.root, SALT)[1][-1].key, unlisted_key)

    def test_first_link_misses(self):
        """An empty cache links nothing and reports every source missing, every group uncached."""
        site = self.site("v1")
        two_distributions(site)
        links = self.cache.link(site.root, SALT)
        self.assertEqual((links.linked, links.missing), (0, ("a/__init__.py", "a/x.py", "b.py")))
        self.assertEqual([group.label for group in links.uncached], ["a-1.0.dist-info", "b-2.0.dist-info"])
        self.assertEqual(site.pycs(), [])

    def test_store_then_link_into_another_venv(self):
        """Stored bytecode is hard-linked into a venv with the same files; nothing is left to compile."""
        first = self.site("v1")
        two_distributions(first)
        links = self.cache.link(first.root, SALT)
        first.compile()
        self.assertEqual(self.cache.store(first.root, links.uncached), 2)
        self.assertEqual(len(self.entries()), 2)
        second = self.site("v2")
        two_distributions(second)
        links = self.cache.link(second.root, SALT)
        self.assertEqual(links, BytecodeLinks(3, (), ()))
        self.assertEqual(second.pycs(), first.pycs())
        for source in ("a/__init__.py", "a/x.py", "b.py"):
            self.assertEqual(os.stat(second.pyc_path(source)).st_ino, os.stat(first.pyc_path(source)).st_ino)

    def test_other_content_misses(self):
        """A distribution whose RECORD differs gets nothing, nor does anything under another salt."""
        first = self.site("v1")
        two_distributions(first)
        links = self.cache.link(first.root, SALT)
        first.compile()
        self.cache.store(first.root, links.uncached)
        second = self.site("v2")
        second.distribution("a-1.0.dist-info", {"a/__init__.py": b"", "a/x.py": b"X = 2\n"})
        second.distribution("b-2.0.dist-info", {"b.py": b"B = 2\n"})
        links = self.cache.link(second.root, SALT)
        self.assertEqual((links.linked, links.missing), (1, ("a/__init__.py", "a/x.py")))
        self.assertEqual([group.label for group in links.uncached], ["a-1.0.dist-info"])
        third = self.site("v3")
        two_distributions(third)
        self.assertEqual(self.cache.link(third.root, bytecode_salt("/py/python3.12", "-o 2")).linked, 0)

    def test_stale_entry_replaced(self):
        """Sources re-extracted with another mtime get no .pyc; the entry is stored again for them."""
        first = self.site("v1")
        two_distributions(first)
        links = self.cache.link(first.root, SALT)
        first.compile()
        self.cache.store(first.root, links.uncached)
        second = self.site("v2")
        two_distributions(second, mtime=SOURCE_MTIME + 60)
        links = self.cache.link(second.root, SALT)
        self.assertEqual((links.linked, len(links.missing), len(links.uncached)), (0, 3, 2))
        second.compile()
        self.assertEqual(self.cache.store(second.root, links.uncached), 2)
        third = self.site("v3")
        two_distributions(third, mtime=SOURCE_MTIME + 60)
        self.assertEqual(self.cache.link(third.root, SALT), BytecodeLinks(3, (), ()))
        self.assertEqual([name for name in self.entries() if name.startswith(".")], [])

    def test_store_needs_every_source(self):
        """A group is stored only when every source has a valid timestamp .pyc."""
        site = self.site("v1")
        two_distributions(site)
        links = self.cache.link(site.root, SALT)
        site.compile("a/x.py", "b.py")  # a/__init__.py did not compile
        self.assertEqual(self.cache.store(site.root, links.uncached), 1)
        site.compile("a/__init__.py", flags=1)  # hash-based: not for this cache
        self.assertEqual(self.cache.store(site.root, links.uncached), 0)
        self.assertEqual(len(self.entries()), 1)

    def test_existing_pyc_kept(self):
        """A .pyc already in the venv (shipped by a wheel) is not replaced; compileall gets its source."""
        first = self.site("v1")
        two_distributions(first)
        links = self.cache.link(first.root, SALT)
        first.compile()
        self.cache.store(first.root, links.uncached)
        second = self.site("v2")
        two_distributions(second)
        shipped = second.pyc_path("b.py")
        os.makedirs(os.path.dirname(shipped))
        with open(shipped, "wb") as f:
            f.write(b"shipped")
        links = self.cache.link(second.root, SALT)
        self.assertEqual((links.linked, links.missing), (2, ("b.py",)))
        with open(shipped, "rb") as f:
            self.assertEqual(f.read(), b"shipped")

    def test_concurrent_store_keeps_one(self):
        """A second build storing the same group leaves the first one's entry and no staging behind."""
        first, second = self.site("v1"), self.site("v2")
        two_distributions(first)
        two_distributions(second)
        first_links = self.cache.link(first.root, SALT)
        second_links = self.cache.link(second.root, SALT)
        first.compile()
        second.compile()
        self.assertEqual(self.cache.store(first.root, first_links.uncached), 2)
        before = {name: os.stat(os.path.join(self.cache.root, name)).st_ino for name in self.entries()}
        self.assertEqual(self.cache.store(second.root, second_links.uncached), 0)
        self.assertEqual({name: os.stat(os.path.join(self.cache.root, name)).st_ino for name in self.entries()}, before)

    def test_prune_least_recently_used(self):
        """Pruning keeps the most recently used entries, drops trash, and stale staging only."""
        cache = BytecodeCache(self.cache.root, max_entries=2, clock=lambda: SOURCE_MTIME + 10 * 3600)
        for age, name in enumerate(["new", "middle", "old", ".trash-x", ".staging-dead", ".staging-live"]):
            os.makedirs(os.path.join(cache.root, name, "sub"))
            mtime = SOURCE_MTIME + 10 * 3600 - (7200 * age if name != ".staging-live" else 60)
            os.utime(os.path.join(cache.root, name), (mtime, mtime))
        self.assertEqual(cache.prune(), 1)
        self.assertEqual(self.entries(), [".staging-live", "middle", "new"])

    def test_link_marks_use(self):
        """Linking from an entry makes it recently used."""
        site = self.site("v1")
        two_distributions(site)
        links = self.cache.link(site.root, SALT)
        site.compile()
        self.cache.store(site.root, links.uncached)
        for name in self.entries():
            os.utime(os.path.join(self.cache.root, name), (SOURCE_MTIME, SOURCE_MTIME))
        other = self.site("v2")
        two_distributions(other)
        self.cache.link(other.root, SALT)
        for name in self.entries():
            self.assertGreater(os.stat(os.path.join(self.cache.root, name)).st_mtime, SOURCE_MTIME)

    def test_cache_deleted_under_a_venv(self):
        """Deleting the whole cache leaves linked venvs intact."""
        first = self.site("v1")
        two_distributions(first)
        links = self.cache.link(first.root, SALT)
        first.compile()
        self.cache.store(first.root, links.uncached)
        second = self.site("v2")
        two_distributions(second)
        self.cache.link(second.root, SALT)
        shutil.rmtree(self.cache.root)
        with open(second.pyc_path("a/x.py"), "rb") as f:
            self.assertTrue(f.read().endswith(b"code of a/x.py"))
        self.assertEqual(self.cache.link(self.site("v3").root, SALT).linked, 0)


# Run by the venv's own python: how many sources of site-packages lack a
# .pyc that this interpreter would use as it is (magic, mtime, size).
_UNUSABLE_PYCS = """
import importlib.util, os, sys
unusable = 0
for directory, dirnames, names in os.walk(sys.argv[1]):
    dirnames[:] = [name for name in dirnames if name != "__pycache__"]
    for name in names:
        if not name.endswith(".py"):
            continue
        source = os.path.join(directory, name)
        stat = os.stat(source)
        try:
            with open(importlib.util.cache_from_source(source), "rb") as f:
                header = f.read(16)
        except OSError:
            unusable += 1
            continue
        expected = importlib.util.MAGIC_NUMBER + bytes(4) + (
            (int(stat.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little") + (stat.st_size & 0xFFFFFFFF).to_bytes(4, "little")
        )
        unusable += header != expected
print(unusable)
"""


def tiny_wheel(directory: str) -> str:
    """A pure-Python wheel of two modules, ``tinydist`` 1.0, built by hand (no index needed)."""
    files = {
        "tinydist/__init__.py": b"from tinydist.more import VALUE\n",
        "tinydist/more.py": b"VALUE = 42\n",
        "tinydist-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinydist\nVersion: 1.0\n",
        "tinydist-1.0.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: difydaemon-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for name, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(content)}")
    record.append("tinydist-1.0.dist-info/RECORD,,")
    files["tinydist-1.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tinydist-1.0-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return path


class RealBytecodeCacheTests(AsyncTestCase):
    """Real uv venvs of the echo plugin sharing prepared venvs and cached bytecode."""

    timeout = 300

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.builder = sdk.environment_builder(reactor, prepared_venvs_dir=os.path.abspath(self.mktemp()))
        # Background keeping must be over before trial looks for leftovers.
        self.addCleanup(self.builder.settled)

    async def build(self, *extra_requirements):
        """Build a copy of the echo plugin with more requirement lines; its directory, python and progress."""
        working_dir = copy_echo_plugin(os.path.abspath(self.mktemp()))
        with open(os.path.join(working_dir, "requirements.txt"), "a") as f:
            f.write("".join(line + "\n" for line in extra_requirements))
        progress = []
        python = await self.builder.build(working_dir, "3.12", progress.append)
        return working_dir, python, progress

    async def unusable_pycs(self, python, working_dir):
        """How many sources of the venv's site-packages its python would have to compile again."""
        outcome = await run_step(
            self.reactor,
            StepCommand(
                "checking .pyc files",
                (python, "-c", _UNUSABLE_PYCS, os.path.join(working_dir, SITE_PACKAGES)),
                {"PATH": os.environ.get("PATH", "")},
                working_dir,
            ),
            60,
            60,
        )
        self.assertTrue(outcome.succeeded, outcome)
        return int(outcome.tail)

    async def test_new_dependency_set_links_cached_bytecode(self):
        """A plugin with a never-seen dependency set links the SDK's cached bytecode, compiles none of it, and starts."""
        first, _, progress = await self.build()
        self.assertIn("byte-compiling site-packages", progress)
        await self.builder.settled()
        second, python, progress = await self.build("# a dependency set of its own")
        self.assertNotIn("copying a prepared venv", progress)
        linked = [line for line in progress if line.startswith("linked ")]
        self.assertEqual(len(linked), 1, progress)
        self.assertGreater(int(linked[0].split()[1]), 500)
        self.assertEqual([line for line in progress if "site-packages" in line], [])
        self.assertEqual(await self.unusable_pycs(python, second), 0)
        pyc = os.path.join(SITE_PACKAGES, "dify_plugin", "__pycache__", "__init__.cpython-312.pyc")
        self.assertEqual(os.stat(os.path.join(second, pyc)).st_ino, os.stat(os.path.join(first, pyc)).st_ino)
        self.assertGreater(await sdk.seconds_to_first_heartbeat(self.reactor, python, second), 0)

    async def test_new_distribution_compiled_alone(self):
        """A distribution no plugin installed before is the only thing compiled, and is cached in its turn."""
        wheel = tiny_wheel(os.path.abspath(self.mktemp()))
        await self.build()
        await self.builder.settled()
        second, python, progress = await self.build(wheel)
        self.assertIn("byte-compiling 2 files of site-packages", progress)
        self.assertEqual(await self.unusable_pycs(python, second), 0)
        await self.builder.settled()
        third, python, progress = await self.build(wheel, "# yet another set")
        self.assertEqual([line for line in progress if "site-packages" in line], [])
        self.assertEqual(await self.unusable_pycs(python, third), 0)
