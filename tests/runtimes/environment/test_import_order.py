"""
Tests for :mod:`difydaemon.runtimes.environment.import_order`: the scan of
import statements, the predicted import order through a real directory tree,
and the order the background compilation takes from it.
"""

from __future__ import annotations

import os
import subprocess
import sys

from difydaemon.runtimes.environment.import_order import (
    compile_first,
    compile_order,
    SOURCE_BYTES,
    _python_sources,
    _read,
    import_statements,
    predicted_imports,
)
from difydaemon.runtimes.environment.steps import site_packages_compile_command
from difydaemon.testing.cases import SynchronousTestCase
from difydaemon.testing.packages import write_files

SITE = os.path.join(".venv", "lib", "python3.12", "site-packages")


class ImportStatementsTests(SynchronousTestCase):
    def test_forms(self):
        """Plain, dotted, aliased, parenthesized, continued, relative and star imports are each read."""
        text = (
            "import a, b.c as d\n"
            "from e.f import (g,\n    h as i,\n)\n"
            "from . import j\n"
            "from ..k import l \\\n    , m\n"
            "from n import *\n"
            "    import indented\n"
        )
        self.assertEqual(
            list(import_statements(text)),
            [
                ("a", ()),
                ("b.c", ()),
                ("e.f", ("g", "h")),
                (".", ("j",)),
                ("..k", ("l", "m")),
                ("n", ()),
                ("indented", ()),
            ],
        )

    def test_blocks_that_do_not_run(self):
        """Imports right inside a function or an if TYPE_CHECKING block are left out; those under try or if are kept."""
        text = (
            "try:\n    import kept_try\nexcept ImportError:\n    kept_except = None\n"
            "if TYPE_CHECKING:\n    import typing_only\n"
            "if sys.version_info >= (3, 11):\n    import kept_if\n"
            "def f():\n\n    # comment\n    import lazy\n"
            "async def g():\n    from lazy2 import x\n"
            "class C:\n    import kept_class\n"
        )
        self.assertEqual([name for name, _ in import_statements(text)], ["kept_try", "kept_if", "kept_class"])

    def test_not_at_a_line_start(self):
        """The word import inside a line (a string, a comment, a name) is not an import."""
        text = 'x = "import os"\n# from a import b\nreimport = 1\nimportlib = 2\n'
        self.assertEqual(list(import_statements(text)), [])

    def test_blocks_nested(self):
        """An import's block is found past the imports of deeper blocks between it and its header."""
        text = (
            "def f():\n    if TYPE_CHECKING:\n        import typing_only\n    import lazy\n"
            "class C:\n    try:\n        import deep\n    except ImportError:\n        pass\n    import kept\n"
            "if TYPE_CHECKING:\n    if x:\n        import nested_typing\n    import typing_too\n"
        )
        self.assertEqual([name for name, _ in import_statements(text)], ["deep", "kept", "nested_typing"])

    def test_dots_that_lead_nowhere(self):
        """A from line of 100,000 dots and no import after them is read in one pass (it took minutes, holding the GIL)."""
        text = "from " + "." * 100_000 + "!import\nimport after\n"
        self.assertEqual(list(import_statements(text)), [("after", ())])

    def test_many_indented_imports(self):
        """50,000 imports in one class body are each read (each used to walk back over all before it)."""
        text = "class A:\n" + "    import a\n" * 50_000 + "def f():\n    import lazy\n"
        self.assertEqual(list(import_statements(text)), [("a", ())] * 50_000)

    def test_one_line_saying_import_often(self):
        """A 6 MB line saying import a million times is looked at once (it was searched back once per word)."""
        text = "x = 1 # " + "import" * 1_000_000 + "\nimport after\n"
        self.assertEqual(list(import_statements(text)), [("after", ())])


class PredictedImportsTests(SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.working_dir = os.path.abspath(self.mktemp())
        self.site = os.path.join(self.working_dir, SITE)
        write_files(
            self.working_dir,
            {
                "main.py": b"from pkg import thing\nimport missing_module\n",
                "tools/tool.py": b"import other\n",
                f"{SITE}/pkg/__init__.py": b"from .sub import x\nfrom . import leaf\nimport pkg.deep.inner\n",
                f"{SITE}/pkg/sub.py": b"from .. import nothing\nimport dep\n",
                f"{SITE}/pkg/leaf.py": b"import pkg\n",
                f"{SITE}/pkg/deep/__init__.py": b"",
                f"{SITE}/pkg/deep/inner.py": b"",
                f"{SITE}/dep.py": b"import pkg.sub\n",
                f"{SITE}/other/__init__.py": b"",
                f"{SITE}/unused/__init__.py": b"",
            },
        )

    def predicted(self):
        roots = [os.path.join(self.working_dir, "main.py"), os.path.join(self.working_dir, "tools", "tool.py")]
        reached = predicted_imports(roots, [self.working_dir, self.site])
        return [os.path.relpath(path, self.working_dir) for path in reached]

    def test_order_python_would_reach(self):
        """Each module comes before what it imports, a package before its submodules; cycles and unknown names end a branch."""
        self.assertEqual(
            self.predicted(),
            [
                "main.py",
                f"{SITE}/pkg/__init__.py",
                f"{SITE}/pkg/sub.py",
                f"{SITE}/dep.py",
                f"{SITE}/pkg/leaf.py",
                f"{SITE}/pkg/deep/__init__.py",
                f"{SITE}/pkg/deep/inner.py",
                "tools/tool.py",
                f"{SITE}/other/__init__.py",
            ],
        )

    def test_unreadable_file_not_followed(self):
        """A source that cannot be read is reached but not followed."""

        def read(path):
            if path.endswith("sub.py"):
                raise PermissionError(path)
            with open(path) as f:
                return f.read()

        reached = predicted_imports([os.path.join(self.working_dir, "main.py")], [self.working_dir, self.site], read)
        self.assertIn(os.path.join(self.site, "pkg", "sub.py"), reached)
        self.assertNotIn(os.path.join(self.site, "dep.py"), reached)

    def test_deadline(self):
        """When the clock passes the deadline, the files reached so far are the prediction."""
        ticks = iter(range(100))
        reached = predicted_imports(
            [os.path.join(self.working_dir, "main.py")], [self.working_dir, self.site], None, 3, lambda: next(ticks)
        )
        self.assertEqual(len(reached), 3)


class ReadTests(SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def test_head_only(self):
        """A huge source is read up to SOURCE_BYTES, not whole."""
        path = os.path.join(self.directory, "huge.py")
        with open(path, "wb") as f:
            f.write(b"#" * (3 * SOURCE_BYTES))
        self.assertEqual(len(_read(path)), SOURCE_BYTES)

    def test_not_utf8(self):
        """Bytes that are not UTF-8 are replaced, not an error."""
        path = os.path.join(self.directory, "latin.py")
        with open(path, "wb") as f:
            f.write(b"import caf\xe9\x00\n")
        self.assertEqual(_read(path), "import caf\ufffd\x00\n")

    def test_inside(self):
        """A file is read only if it is in one of the real directories given."""
        path = os.path.join(self.directory, "mod.py")
        with open(path, "w") as f:
            f.write("import x\n")
        self.assertEqual(_read(path, inside=[os.path.realpath(self.directory)]), "import x\n")
        self.assertRaises(OSError, _read, path, inside=[os.path.realpath(self.directory) + "-other"])

    def test_symlink_fifo_directory(self):
        """A symbolic link, a FIFO and a directory are not read: OSError, without waiting."""
        target = os.path.join(self.directory, "target.py")
        with open(target, "w") as f:
            f.write("import x\n")
        os.symlink(target, os.path.join(self.directory, "link.py"))
        os.symlink("/dev/zero", os.path.join(self.directory, "zero.py"))
        os.mkfifo(os.path.join(self.directory, "fifo.py"))
        os.mkdir(os.path.join(self.directory, "package.py"))
        for name in ("link.py", "zero.py", "fifo.py", "package.py"):
            self.assertRaises(OSError, _read, os.path.join(self.directory, name))


class CompileOrderTests(SynchronousTestCase):
    def test_reverse_of_the_reach(self):
        """The last top-level name reached comes first; in each, its predicted modules in reverse; then their other modules but tests."""
        predicted = ["a/__init__.py", "a/x.py", "b.py", "c/__init__.py", "a/y.py", "c/z.py"]
        sources = [
            "a/__init__.py", "a/x.py", "a/y.py", "a/other.py", "a/tests/test_a.py",
            "b.py", "c/__init__.py", "c/z.py", "c/more.py", "d/__init__.py",
        ]
        self.assertEqual(
            compile_order(predicted, sources),
            [
                "c/z.py", "c/__init__.py", "b.py", "a/y.py", "a/x.py", "a/__init__.py",
                "c/more.py", "a/other.py",
            ],
        )

    def test_only_what_is_left(self):
        """Sources already compiled (not among ``sources``) are left out, and so are predicted files that are not sources."""
        self.assertEqual(compile_order(["a/__init__.py", "a/x.py", "gone.py"], ["a/x.py"]), ["a/x.py"])


class CompileFirstTests(SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.working_dir = os.path.abspath(self.mktemp())
        write_files(
            self.working_dir,
            {
                "main.py": b"import first\nimport second\n",
                f"{SITE}/first.py": b"",
                f"{SITE}/second/__init__.py": b"from . import part\n",
                f"{SITE}/second/part.py": b"",
                f"{SITE}/second/unused.py": b"",
                f"{SITE}/never.py": b"",
            },
        )

    def test_all_of_site_packages(self):
        """With nothing compiled yet, the plugin's reach in reverse, paths relative to the working directory."""
        self.assertEqual(
            compile_first(self.working_dir, [SITE], None),
            [f"{SITE}/second/part.py", f"{SITE}/second/__init__.py", f"{SITE}/first.py", f"{SITE}/second/unused.py"],
        )

    def test_missing_only(self):
        """With a bytecode cache's leftovers, only those."""
        missing = [f"{SITE}/first.py", f"{SITE}/never.py"]
        self.assertEqual(compile_first(self.working_dir, [SITE], missing), [f"{SITE}/first.py"])

    def test_plugin_made_link(self):
        """A plugin's link to a file elsewhere is not read (the daemon may read what the plugin may not)."""
        outside = os.path.abspath(self.mktemp())
        write_files(outside, {"elsewhere.py": b"import never\n"})
        os.symlink(os.path.join(outside, "elsewhere.py"), os.path.join(self.working_dir, "link.py"))
        self.assertEqual(
            compile_first(self.working_dir, [SITE], None),
            [f"{SITE}/second/part.py", f"{SITE}/second/__init__.py", f"{SITE}/first.py", f"{SITE}/second/unused.py"],
        )

    def test_plugin_made_directory_link(self):
        """A module reached through a plugin's link to a directory elsewhere is not read."""
        outside = os.path.abspath(self.mktemp())
        write_files(outside, {"__init__.py": b"", "mod.py": b"import never\n"})
        os.symlink(outside, os.path.join(self.working_dir, "elsewhere"))
        with open(os.path.join(self.working_dir, "main.py"), "a") as f:
            f.write("import elsewhere.mod\n")
        self.assertEqual(
            compile_first(self.working_dir, [SITE], None),
            [f"{SITE}/second/part.py", f"{SITE}/second/__init__.py", f"{SITE}/first.py", f"{SITE}/second/unused.py"],
        )

    def test_plugin_made_fifo(self):
        """A plugin's FIFO or directory named like a module neither stops nor changes the scan (opening the FIFO waited forever)."""
        os.mkfifo(os.path.join(self.working_dir, "fifo.py"))
        os.mkdir(os.path.join(self.working_dir, "dir.py"))
        self.assertEqual(
            compile_first(self.working_dir, [SITE], None),
            [f"{SITE}/second/part.py", f"{SITE}/second/__init__.py", f"{SITE}/first.py", f"{SITE}/second/unused.py"],
        )

    def test_out_of_time(self):
        """With no time for the scan, nothing is put first (the compilation takes site-packages as before)."""
        self.assertEqual(compile_first(self.working_dir, [SITE], None, seconds=0), [])

    def test_site_packages_walk_out_of_time(self):
        """The walk of site-packages ends at the deadline too: a running plugin may keep filling it."""
        site = os.path.join(self.working_dir, SITE)
        self.assertEqual(sorted(_python_sources(site, 1, lambda: 0)), ["first.py", "never.py", "second/__init__.py", "second/part.py", "second/unused.py"])
        self.assertEqual(list(_python_sources(site, 1, lambda: 1)), [])

    def test_odd_names_stay_paths(self):
        """Names with a leading dash, a space or a newline are compiled as files, none taken as an option of compileall."""
        odd = ["-h.py", "--help x.py", "new\nline.py"]
        write_files(self.working_dir, {f"{SITE}/second/{name}": b"VALUE = 1\n" for name in odd})
        first = compile_first(self.working_dir, [SITE], None)
        self.assertTrue({f"{SITE}/second/{name}" for name in odd} <= set(first))
        command = site_packages_compile_command(self.working_dir, [SITE], None, None, parallel=False, first=first)
        argv = (sys.executable, *command.argv[1:])
        self.assertTrue(all(word.startswith(".venv/") for word in argv[4:]))
        subprocess.run(argv, cwd=self.working_dir, check=True, capture_output=True)
        cache = os.path.join(self.working_dir, SITE, "second", "__pycache__")
        tag = sys.implementation.cache_tag
        self.assertTrue({f"{name[:-3]}.{tag}.pyc" for name in odd} <= set(os.listdir(cache)))

    def test_bounded(self):
        """The list stops before the paths' bytes would pass the limit."""
        one = len(f"{SITE}/second/part.py") + 1
        self.assertEqual(compile_first(self.working_dir, [SITE], None, limit=one), [f"{SITE}/second/part.py"])
