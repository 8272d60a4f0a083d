"""
The order in which a fresh venv's background compilation takes
site-packages, so that it helps the plugin starting beside it.

A plugin started from a venv without bytecode compiles every module it
imports on its way to its first heartbeat (about two thirds of an SDK
plugin's uncompiled start).  The background compilation runs on the other
core meanwhile; whatever it compiles before the plugin gets there, the
plugin only loads.  Taking site-packages in name order, it compiles much
the plugin never imports first; following the plugin's own order, it would
chase the plugin and compile what the plugin is compiling too.  So the
plugin's imports are predicted from its sources (a plain scan of their
import statements, followed through site-packages as Python would reach
them), and the compilation takes the distributions they reach in reverse
of that order: it starts where the plugin ends, and the two meet.

Only top-level names are predicted (``pydantic``, ``gevent``): imports made
by compiled extensions or by name at run time are not in any source, but
they are mostly of the distribution the plugin is already in.  What the
prediction misses is compiled afterwards, as before.

Everything here blocks on the filesystem: call it in a thread pool.  The
plugin's files are a stranger's, and a plugin running meanwhile may add
some: only regular files are read (no link, FIFO or device), only their
first :data:`SOURCE_BYTES`, the scan is linear in what it reads, and it
ends after :data:`SCAN_SECONDS` with what it has by then (a daemon's stop
waits for the thread).
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Sequence

#: the most bytes of paths put on the compilation's command line (Linux
#: takes 2 MiB of arguments and environment in all)
ARGUMENT_BYTES = 256 * 1024

#: the most bytes of a source file read: a plugin's files are a stranger's,
#: and the imports that run when a module is imported are at its top
SOURCE_BYTES = 1024 * 1024

#: the longest the whole scan may take: it only orders a compilation, and
#: a daemon's stop waits for the thread it runs in
SCAN_SECONDS = 2.0

# One statement, matched at the start of a line that holds the word "import".
# Every repetition is followed by what it cannot match: no input makes the
# match backtrack (it holds the GIL, and so the reactor, while it runs).
_IMPORT = re.compile(
    r"[ \t]*(?:import[ \t]+(?P<names>[\w. \t,]+)"
    r"|from[ \t]+(?P<base>[\w.]+)[ \t]+import[ \t]+(?P<what>\([^)]*\)|(?:\\\n|[^\n#;])*))"
)

_INDENT = re.compile(r"[ \t]*")

# Blocks whose imports do not run when their module is imported.
_SKIPPED_BLOCK = re.compile(r"(?:async[ \t]+)?def[ \t]|if[ \t].*TYPE_CHECKING")

# Directories whose modules a plugin does not import: compiled with the rest.
_TEST_DIRECTORIES = frozenset(("test", "tests", "testing"))


def import_statements(text: str) -> Iterator[tuple[str, tuple[str, ...]]]:
    """
    The imports of a module's source, in source order: ``(module, names)``
    where ``module`` may be relative (``..pkg``) and ``names`` are what a
    ``from`` import takes from it (possibly submodules); ``import a, b.c``
    gives ``("a", ())`` and ``("b.c", ())``.

    A plain scan, not a parse: an import right inside a function or an
    ``if TYPE_CHECKING:`` block is left out (it does not run when the
    module is imported), but one deeper in such a block counts, and so does
    a line of a docstring that reads like one; the result is only an order
    to compile in.
    """
    headers: dict[int, int] = {}
    skipped: dict[int, bool] = {}
    for match in _import_lines(text):
        line = match.start()
        if text[line] in " \t":
            header = _enclosing_header(text, line, headers)
            if header not in skipped:
                skipped[header] = header >= 0 and _SKIPPED_BLOCK.match(_line_at(text, header).lstrip(" \t")) is not None
            if skipped[header]:
                continue
        names = match.group("names")
        if names is not None:
            for part in names.split(","):
                words = part.split()
                if words:
                    yield words[0], ()
            continue
        what = match.group("what").replace("\\\n", " ").strip("()\\ \t\n")
        taken = tuple(words[0] for words in (part.split() for part in what.split(",")) if words and words[0] != "*")
        yield match.group("base"), taken


def _line_at(text: str, start: int) -> str:
    """The line starting at ``start``, without its newline."""
    end = text.find("\n", start)
    return text[start:] if end == -1 else text[start:end]


def _indent(text: str, start: int) -> int:
    return _INDENT.match(text, start).end() - start


def _enclosing_header(text: str, line: int, headers: dict[int, int]) -> int:
    """
    Where the first less indented line (not blank, not a comment) above the
    line starting at ``line`` starts; -1 for none.

    :param headers: the answers for the lines asked about before, filled in:
        the lines between a line and its header are all at least as
        indented as it, so the walk jumps over them (without, a module of
        many indented imports cost the square of their number).
    """
    indent = _indent(text, line)
    end = line
    while end > 0:
        start = text.rfind("\n", 0, end - 1) + 1
        if start in headers and _indent(text, start) >= indent:
            end = headers[start]
            if end < 0:
                break
            if _indent(text, end) < indent:
                headers[line] = end
                return end
            continue
        previous = text[start:end].rstrip("\n")
        stripped = previous.lstrip(" \t")
        if stripped and not stripped.startswith("#") and len(previous) - len(stripped) < indent:
            headers[line] = start
            return start
        end = start
    headers[line] = -1
    return -1


def _import_lines(text: str) -> Iterator[re.Match]:
    """
    The matches of :data:`_IMPORT` at line starts: found from the word, far
    quicker than trying every line.  Each line is looked at once, however
    often it says "import".
    """
    position = text.find("import")
    while position != -1:
        match = _IMPORT.match(text, text.rfind("\n", 0, position) + 1)
        if match is not None:
            yield match
        end = text.find("\n", position)
        if end == -1:
            return
        position = text.find("import", end)


def _absolute(base: str, module: str, is_package: bool) -> str | None:
    """The absolute name of ``base`` imported from ``module``; None if it climbs out of the top package."""
    dots = len(base) - len(base.lstrip("."))
    if not dots:
        return base
    package = module.split(".") if is_package else module.split(".")[:-1]
    if dots > 1:
        if dots - 1 > len(package):
            return None
        package = package[: len(package) - (dots - 1)]
    rest = base[dots:]
    name = ".".join([*package, rest] if rest else package)
    return name or None


def predicted_imports(
    roots: Sequence[str],
    search_path: Sequence[str],
    read: Callable[[str], str] | None = None,
    deadline: float = float("inf"),
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """
    The source files that importing ``roots`` is predicted to reach, in the
    order Python would first reach them (each module before what it
    imports, a package's ``__init__`` before its submodules).

    :param roots: the plugin's own source files, its entry point first.
    :param search_path: absolute directories modules are found in (the
        plugin's directory, then site-packages), as ``sys.path``.
    :param read: reads a source file's text (for tests); unreadable files
        (``OSError``) are reached but not followed.
    :param deadline: when ``clock`` says it, the files reached so far are
        the prediction.
    """
    read = read or _read
    located: dict[str, str | None] = {}
    order: list[str] = []
    reached: set[str] = set()

    def locate(name: str) -> str | None:
        if name not in located:
            relative = name.replace(".", os.sep)
            located[name] = next(
                (
                    candidate
                    for directory in search_path
                    for candidate in (
                        f"{directory}{os.sep}{relative}{os.sep}__init__.py",
                        f"{directory}{os.sep}{relative}.py",
                    )
                    if os.path.isfile(candidate)
                ),
                None,
            )
        return located[name]

    # longest first: site-packages lies inside the plugin's directory
    directories = sorted(search_path, key=len, reverse=True)

    def module_of(path: str) -> tuple[str, bool]:
        for directory in directories:
            if path.startswith(directory + os.sep):
                name = path[len(directory) + 1 : -len(".py")].replace(os.sep, ".")
                if name.endswith(".__init__"):
                    return name[: -len(".__init__")], True
                return name, False
        return "", False

    # An explicit stack, not recursion: import chains can be deep.
    stack: list[Iterator[str]] = []

    def enter(path: str) -> None:
        if path in reached:
            return
        reached.add(path)
        order.append(path)
        stack.append(_reached_by(path))

    def _reached_by(path: str) -> Iterator[str]:
        try:
            text = read(path)
        except OSError:
            return
        module, is_package = module_of(path)
        for base, names in import_statements(text):
            name = _absolute(base, module, is_package)
            if name is None:
                continue
            parts = name.split(".")
            # importing a.b.c runs a, then a.b, then a.b.c
            for end in range(1, len(parts) + 1):
                found = locate(".".join(parts[:end]))
                if found is None:
                    break
                yield found
            else:
                for taken in names:
                    found = locate(f"{name}.{taken}")
                    if found is not None:
                        yield found

    for root in roots:
        enter(root)
        while stack:
            if clock() >= deadline:
                return order
            following = next(stack[-1], None)
            if following is None:
                stack.pop()
            else:
                enter(following)
    return order


def compile_order(predicted: Sequence[str], sources: Sequence[str]) -> list[str]:
    """
    The sources to compile first, in the order that helps a starting plugin:
    the top-level names of site-packages the prediction reaches, last
    reached first; in each, its predicted modules in reverse, then its
    other modules but its tests.

    :param predicted: site-packages files in predicted import order, as
        paths relative to site-packages (``/``-separated).
    :param sources: every source still to compile, likewise.
    :return: a subset of ``sources``; the others are left for afterwards.
    """
    remaining = set(sources)
    tops: list[str] = []
    by_top: dict[str, list[str]] = {}
    for path in predicted:
        if path not in remaining:
            continue
        top = _top_level(path)
        if top not in by_top:
            tops.append(top)
            by_top[top] = []
        by_top[top].append(path)
    others: dict[str, list[str]] = {}
    for path in sorted(remaining):
        top = _top_level(path)
        if top in by_top and not _TEST_DIRECTORIES.intersection(path.split("/")[:-1]):
            others.setdefault(top, []).append(path)
    order: list[str] = []
    for top in reversed(tops):
        order += by_top[top][::-1]
    taken = set(order)
    for top in reversed(tops):
        order += [path for path in others.get(top, []) if path not in taken]
    return order


def _top_level(path: str) -> str:
    """The top-level module of a site-packages path (``pkg/sub/x.py`` -> ``pkg``, ``mod.py`` -> ``mod``)."""
    first = path.split("/", 1)[0]
    return first[: -len(".py")] if first.endswith(".py") and "/" not in path else first


def compile_first(
    working_dir: str,
    site_packages: Sequence[str],
    missing: Sequence[str] | None,
    limit: int = ARGUMENT_BYTES,
    seconds: float = SCAN_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> list[str]:
    """
    The sources the background compilation takes first, in order (see
    :func:`compile_order`), for its command line: everything else follows
    as before.

    :param site_packages: the site-packages directories, relative to ``working_dir``.
    :param missing: the sources left to compile, relative to ``working_dir``;
        None for all of site-packages.
    :param limit: the most bytes of paths returned; the order's tail
        beyond it is left for afterwards (a command line is bounded).
    :param seconds: how long the plugin's files may be looked for and
        followed (``clock`` measures it); what is predicted by then is
        the prediction.
    :return: paths relative to ``working_dir``.
    """
    deadline = clock() + seconds
    search_path = [working_dir, *(os.path.join(working_dir, directory) for directory in site_packages)]
    inside = tuple(os.path.realpath(directory) for directory in search_path)
    reached = predicted_imports(
        _plugin_sources(working_dir, deadline, clock),
        search_path,
        lambda path: _read(path, inside=inside),
        deadline,
        clock,
    )
    first: list[str] = []
    for directory in site_packages:
        absolute = os.path.join(working_dir, directory)
        prefix = directory + os.sep
        if missing is None:
            sources = [path.replace(os.sep, "/") for path in _python_sources(absolute, deadline, clock)]
        else:
            sources = [path[len(prefix) :].replace(os.sep, "/") for path in missing if path.startswith(prefix)]
        predicted = [
            os.path.relpath(path, absolute).replace(os.sep, "/") for path in reached if path.startswith(absolute + os.sep)
        ]
        first += [os.path.join(directory, path) for path in compile_order(predicted, sources)]
    size = 0
    for index, path in enumerate(first):
        size += len(os.fsencode(path)) + 1
        if size > limit:
            return first[:index]
    return first


def _plugin_sources(working_dir: str, deadline: float, clock: Callable[[], float]) -> list[str]:
    """
    The plugin's own ``.py`` files (not the venv's), ``main.py`` (the usual
    entry point) first; those found by ``deadline`` (a running plugin may
    keep adding some).
    """
    sources = []
    for directory, dirnames, filenames in os.walk(working_dir):
        if clock() >= deadline:
            break
        dirnames[:] = sorted(name for name in dirnames if not name.startswith(".") and name != "__pycache__")
        sources += [os.path.join(directory, name) for name in sorted(filenames) if name.endswith(".py")]
    entry = os.path.join(working_dir, "main.py")
    return sorted(sources, key=lambda path: path != entry)


def _python_sources(site_packages: str, deadline: float, clock: Callable[[], float]) -> Iterator[str]:
    """
    The ``.py`` files under ``site_packages``, relative to it; those found
    by ``deadline`` (a running plugin may keep adding some).
    """
    for directory, dirnames, filenames in os.walk(site_packages):
        if clock() >= deadline:
            return
        dirnames[:] = [name for name in dirnames if name != "__pycache__"]
        for name in filenames:
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(directory, name), site_packages)


def _read(path: str, limit: int = SOURCE_BYTES, inside: Sequence[str] = ()) -> str:
    """
    The first ``limit`` bytes of the regular file ``path``, decoded.

    Neither a symbolic link (a running plugin may make one to ``/dev/zero``
    or to a file only the daemon may read) nor a FIFO (whose opening would
    wait for a writer) nor a device is read: ``OSError``.

    :param inside: real directories the file must be in, once opened (a
        linked directory on the way must not lead elsewhere); empty for
        anywhere.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(f"not a regular file: {path!r}")
        if inside and not _opened_inside(descriptor, path, inside):
            raise OSError(f"outside the plugin's directory: {path!r}")
        with os.fdopen(descriptor, "rb", closefd=False) as f:
            data = f.read(limit)
    finally:
        os.close(descriptor)
    return data.decode("utf-8", errors="replace")


def _opened_inside(descriptor: int, path: str, inside: Sequence[str]) -> bool:
    """
    Whether the file open as ``descriptor`` is in one of the real
    directories ``inside``: asked of the descriptor itself where ``/proc``
    says, so that a link swapped in after the opening changes nothing.
    """
    try:
        real = os.readlink(f"/proc/self/fd/{descriptor}")
    except OSError:
        real = os.path.realpath(path)
    return any(real.startswith(directory + os.sep) for directory in inside)
