"""
The Python environment of a local plugin (``runtimes.md`` §1.2–§1.3).

A plugin's working directory gets a ``.venv`` built with uv: ``uv venv``, then
``uv pip install -r requirements.txt`` or ``uv sync``, then byte-compilation,
then the marker ``.venv/dify/plugin.json`` that says the venv is complete.
Every step is a child process spawned on the injected reactor, watched for
inactivity and for total duration; a failed step raises an
:class:`~difydaemon.errors.InternalServerError` that names the step and
carries the end of its output.

The pure parts (working directory naming, dependency file choice, command
lines, the replaced environment, output tails) are module functions so that
they can be tested without spawning anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Collection, Mapping, Sequence

from attrs import field, frozen
from twisted.internet.defer import Deferred, DeferredLock, DeferredSemaphore
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from difydaemon.errors import InternalServerError
from difydaemon.packaging.identifier import PluginIdentifier, parse_identifier

log = Logger()

VENV_DIR = ".venv"
VENV_PYTHON = os.path.join(VENV_DIR, "bin", "python")
MARKER_PATH = os.path.join(VENV_DIR, "dify", "plugin.json")
DEFAULT_RUNNER_VERSION = "3.12"
REQUIREMENTS_TXT = "requirements.txt"
PYPROJECT_TOML = "pyproject.toml"
UV_LOCK = "uv.lock"
TAIL_BYTES = 2048

# Passed through from the daemon's environment into uv's otherwise empty one:
# private index credentials and the CA bundles that TLS-intercepting networks
# need (without SSL_CERT_FILE uv cannot reach PyPI on such machines).
PASSED_THROUGH_VARIABLES = (
    "UV_INDEX_NEXUS_USERNAME",
    "UV_INDEX_NEXUS_PASSWORD",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
)

PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")

_RUNNER_VERSION = re.compile(r"(\d{1,3})\.(\d{1,3})(?:\.\d{1,4})?", re.ASCII)
_UV_TRACING_LINE = re.compile(rb"^\s*(?:[\d.]+s\s+)?(?:TRACE|DEBUG)\s")
_VERSION_PROBE = "import sys; print('%d.%d' % sys.version_info[:2])"
_PROBE_TIMEOUT = 30.0


# -- pure parts --------------------------------------------------------------


def working_dir_for(working_path: str, identifier: str | PluginIdentifier) -> str:
    """
    The directory a plugin is unpacked into and run from.

    ``$PLUGIN_WORKING_PATH/<author>/<name>-<version>@<checksum>``: the identity
    ``author/name:version`` with ``:`` replaced by ``-``, so the author is a
    directory level (``runtimes.md`` §1.2).  An identifier without an author
    lives directly under ``working_path``.

    :raises UniqueIdentifierError: when ``identifier`` breaks the grammar,
        which also keeps ``..`` and absolute parts out of the path.
    """
    parsed = identifier if isinstance(identifier, PluginIdentifier) else parse_identifier(identifier)
    leaf = f"{parsed.name}-{parsed.version}@{parsed.checksum}"
    if parsed.author is None:
        return os.path.join(working_path, leaf)
    return os.path.join(working_path, parsed.author, leaf)


def runner_version(version: str | None) -> str:
    """
    The ``major.minor`` Python version a manifest's ``meta.runner.version`` asks for.

    Empty means 3.12, the only version the Go daemon ever uses; a patch part
    is dropped.

    :raises InternalServerError: when the text is not a Python version.
    """
    text = (version or "").strip()
    if not text:
        return DEFAULT_RUNNER_VERSION
    match = _RUNNER_VERSION.fullmatch(text)
    if match is None:
        raise InternalServerError(f"meta.runner.version {text!r} is not a Python version")
    return f"{int(match.group(1))}.{int(match.group(2))}"


def choose_dependency_file(present: Collection[str], pip_mirror_url: str | None) -> str:
    """
    The dependency file to install from, given the names present in the working directory.

    ``requirements.txt`` when a mirror is set and it exists; otherwise
    ``pyproject.toml`` first, then ``requirements.txt`` (``runtimes.md`` §1.3
    step 5).

    :raises InternalServerError: when neither file is present.
    """
    if pip_mirror_url and REQUIREMENTS_TXT in present:
        return REQUIREMENTS_TXT
    if PYPROJECT_TOML in present:
        return PYPROJECT_TOML
    if REQUIREMENTS_TXT in present:
        return REQUIREMENTS_TXT
    raise InternalServerError(f"the plugin has neither {PYPROJECT_TOML} nor {REQUIREMENTS_TXT}")


def install_environment(
    environ: Mapping[str, str],
    working_dir: str,
    uv_cache_dir: str,
    proxies: Mapping[str, str],
) -> dict[str, str]:
    """
    The whole environment of the build steps: it replaces the daemon's, it does not extend it.

    Only ``VIRTUAL_ENV``, the daemon's ``PATH``, ``UV_CACHE_DIR`` (shared by
    all plugins), the pass-through variables that are set, and the configured
    proxies.  Notably ``PYTHONDONTWRITEBYTECODE`` never reaches the build.

    :param environ: the daemon's environment.
    :param proxies: ``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` to values; empty values are left out.
    """
    env = {
        "VIRTUAL_ENV": os.path.join(working_dir, VENV_DIR),
        "PATH": environ.get("PATH", os.defpath),
        "UV_CACHE_DIR": uv_cache_dir,
    }
    for name in PASSED_THROUGH_VARIABLES:
        if environ.get(name):
            env[name] = environ[name]
    for name in PROXY_VARIABLES:
        if proxies.get(name):
            env[name] = proxies[name]
    return env


def split_extra_args(text: str | None) -> list[str]:
    """Extra command-line arguments from a configuration string, split on whitespace."""
    return (text or "").split()


@frozen
class StepCommand:
    """
    One child process of a build.

    :ivar step: what the step does, in words (``"installing dependencies"``).
    :ivar argv: the command line, ``argv[0]`` being the executable's path.
    :ivar env: the child's whole environment.
    :ivar path: the child's working directory.
    :ivar watch_inactivity: whether silence for ``init_timeout`` kills it.
        ``compileall -q`` is silent by design, so its steps only get the total time-out.
    :ivar required: whether a failure fails the build; byte-compilation is
        best effort, since some wheels ship files that do not compile.
    """

    step: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(hash=False)
    path: str
    watch_inactivity: bool = True
    required: bool = True


def venv_command(uv: str, working_dir: str, interpreter: str, env: Mapping[str, str]) -> StepCommand:
    """``uv venv .venv --python <interpreter>`` in the working directory."""
    return StepCommand(
        step="creating venv",
        argv=(uv, "venv", VENV_DIR, "--python", interpreter),
        env=env,
        path=working_dir,
    )


def install_command(
    uv: str,
    working_dir: str,
    dependency_file: str,
    env: Mapping[str, str],
    *,
    pip_mirror_url: str | None,
    pip_extra_args: str | None,
    pip_verbose: bool,
    frozen_lock: bool,
) -> StepCommand:
    """
    The dependency installation of ``runtimes.md`` §1.3 step 6.

    :param frozen_lock: whether ``uv sync`` gets ``--frozen`` (a ``uv.lock``
        exists and ``PLUGIN_IGNORE_UV_LOCK`` is off); only for ``pyproject.toml``.
    """
    extra = split_extra_args(pip_extra_args)
    if dependency_file == REQUIREMENTS_TXT:
        argv = [uv, "pip", "install"]
        if pip_mirror_url:
            argv += ["-i", pip_mirror_url]
        argv += ["-r", REQUIREMENTS_TXT]
        if pip_verbose:
            argv.append("-vvv")
        argv += extra
    elif dependency_file == PYPROJECT_TOML:
        argv = [uv, "sync", "--no-dev"]
        if frozen_lock:
            argv.append("--frozen")
        if pip_mirror_url:
            argv += ["-i", pip_mirror_url]
        if pip_verbose:
            argv.append("-v")
        # Whether the lock is honoured is decided above, not by extra args.
        argv += [arg for arg in extra if arg != "--frozen"]
    else:
        raise ValueError(f"unknown dependency file {dependency_file!r}")
    return StepCommand(
        step=f"installing dependencies from {dependency_file}",
        argv=tuple(argv),
        env=env,
        path=working_dir,
    )


def compile_commands(
    working_dir: str,
    site_packages: Sequence[str],
    env: Mapping[str, str],
    compile_extra_args: str | None,
) -> list[StepCommand]:
    """
    Byte-compilation of the plugin's own files and of the venv's site-packages.

    ``compileall`` writes ``.pyc`` files whatever ``PYTHONDONTWRITEBYTECODE``
    says, and the build environment does not carry that variable anyway.
    Without this a plugin cold-starts in about 3 s instead of about 1.2 s.
    """
    python = os.path.join(working_dir, VENV_PYTHON)
    extra = split_extra_args(compile_extra_args)
    commands = [
        StepCommand(
            step="byte-compiling the plugin",
            argv=(python, "-m", "compileall", "-q", *extra, "-x", r"\.venv|\.uv-cache", "."),
            env=env,
            path=working_dir,
            watch_inactivity=False,
            required=False,
        )
    ]
    if site_packages:
        commands.append(
            StepCommand(
                step="byte-compiling site-packages",
                # One worker per core: site-packages is most of the build's
                # time, and two free cores cut it by about a third.
                argv=(python, "-m", "compileall", "-q", "-j", "0", *extra, *site_packages),
                env=env,
                path=working_dir,
                watch_inactivity=False,
                required=False,
            )
        )
    return commands


def marker_content(timestamp: float) -> bytes:
    """The content of ``.venv/dify/plugin.json``: ``{"timestamp":<unix seconds>}``."""
    return json.dumps({"timestamp": int(timestamp)}, separators=(",", ":")).encode("ascii")


def venv_is_valid(working_dir: str) -> bool:
    """Whether ``.venv``, ``.venv/bin/python`` and the marker all exist."""
    return (
        os.path.isdir(os.path.join(working_dir, VENV_DIR))
        and os.path.exists(os.path.join(working_dir, VENV_PYTHON))
        and os.path.isfile(os.path.join(working_dir, MARKER_PATH))
    )


class OutputTail:
    """
    The last few KiB of a step's output, for error messages.

    Bytes arrive in arbitrary pieces; only whole lines are kept, and uv's
    ``DEBUG``/``TRACE`` lines (``-v``, ``-vvv``) are dropped so that its
    final complaint is what remains.
    """

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self._limit = limit
        self._partial = b""
        self._lines: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        """Add a piece of output."""
        pieces = (self._partial + data).split(b"\n")
        self._partial = pieces.pop()
        if len(self._partial) > self._limit:
            self._partial = self._partial[-self._limit :]
        for line in pieces:
            self._keep(line)

    def _keep(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if not line.strip() or _UV_TRACING_LINE.match(line):
            return
        self._lines.append(line)
        self._size += len(line) + 1
        while self._size > self._limit and len(self._lines) > 1:
            self._size -= len(self._lines.pop(0)) + 1

    def text(self) -> str:
        """The kept lines (and any unfinished last line), at most about ``limit`` bytes."""
        lines = list(self._lines)
        if self._partial.strip() and not _UV_TRACING_LINE.match(self._partial):
            lines.append(self._partial)
        joined = b"\n".join(lines)
        if len(joined) > self._limit:
            joined = joined[-self._limit :]
        return joined.decode("utf-8", errors="replace").strip()


@frozen
class StepOutcome:
    """
    How a step's process ended.

    :ivar exit_code: the exit status, or None when a signal ended it.
    :ivar signal: the signal number, or None.
    :ivar tail: the end of its output (see :class:`OutputTail`).
    :ivar timed_out: why the watchdog killed it, or None.
    """

    exit_code: int | None
    signal: int | None
    tail: str
    timed_out: str | None = None

    @property
    def succeeded(self) -> bool:
        """Whether the process exited 0 by itself."""
        return self.timed_out is None and self.exit_code == 0


def failure_message(step: str, outcome: StepOutcome) -> str:
    """The error text of a failed step: what failed, how, and the end of its output."""
    if outcome.timed_out is not None:
        how = f"{step} timed out ({outcome.timed_out})"
    elif outcome.exit_code is not None:
        how = f"{step} failed (exit {outcome.exit_code})"
    else:
        how = f"{step} failed (signal {outcome.signal})"
    if outcome.tail:
        return f"{how}:\n{outcome.tail}"
    return f"{how}, without output"


# -- finding executables -----------------------------------------------------


def find_uv(uv_path: str | None) -> str:
    """
    The uv executable: ``UV_PATH``, else the binary of the ``uv`` package
    installed with the daemon, else ``uv`` on ``PATH``.

    :raises InternalServerError: when none is found, or ``uv_path`` is not executable.
    """
    if uv_path:
        if not _is_executable(uv_path):
            raise InternalServerError(f"UV_PATH {uv_path!r} is not an executable file")
        return uv_path
    try:
        import uv as uv_package

        return uv_package.find_uv_bin()
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("uv")
    if found is None:
        raise InternalServerError("uv not found: set UV_PATH or install the uv package")
    return found


def _is_executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _pyenv_versions(pyenv_root: str, version: str) -> list[str]:
    """``<root>/versions/<version>[.N]/bin/python<version>``, newest patch first."""
    versions_dir = os.path.join(pyenv_root, "versions")
    try:
        names = os.listdir(versions_dir)
    except OSError:
        return []
    pattern = re.compile(re.escape(version) + r"(?:\.(\d+))?", re.ASCII)
    matching = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is not None:
            matching.append((int(match.group(1) or -1), name))
    matching.sort(reverse=True)
    return [os.path.join(versions_dir, name, "bin", f"python{version}") for _, name in matching]


def interpreter_candidates(
    version: str,
    environ: Mapping[str, str],
    search_dirs: Sequence[str] = ("/usr/bin", "/usr/local/bin"),
) -> list[str]:
    """
    Executables that should be Python ``version``, in the order they are tried.

    ``python<version>`` on ``PATH``, then pyenv's ``versions/<version>.*``
    (root from ``$PYENV_ROOT``, else ``~/.pyenv``), then ``search_dirs``.
    Only existing executables are listed, each once.  Names can lie (a pyenv
    shim fails when the version is not selected), so each is asked later.
    """
    name = f"python{version}"
    paths = [os.path.join(d, name) for d in environ.get("PATH", "").split(os.pathsep) if d]
    home = environ.get("HOME") or os.path.expanduser("~")
    pyenv_root = environ.get("PYENV_ROOT") or os.path.join(home, ".pyenv")
    paths += _pyenv_versions(pyenv_root, version)
    paths += [os.path.join(d, name) for d in search_dirs]
    seen: set[str] = set()
    candidates = []
    for path in paths:
        if path not in seen and _is_executable(path):
            seen.add(path)
            candidates.append(path)
    return candidates


async def find_interpreter(
    reactor,
    version: str,
    configured_path: str | None,
    environ: Mapping[str, str] | None = None,
    search_dirs: Sequence[str] = ("/usr/bin", "/usr/local/bin"),
) -> str:
    """
    A Python interpreter of ``version`` (``"3.12"``) on this machine.

    ``configured_path`` (``PYTHON_INTERPRETER_PATH``) wins if it is that
    version; otherwise the :func:`interpreter_candidates` are tried.  Each is
    asked its version by running it, on the reactor, never blocking it.

    :raises InternalServerError: naming the version when none is found.
    """
    environ = os.environ if environ is None else environ
    candidates = interpreter_candidates(version, environ, search_dirs)
    if configured_path:
        candidates.insert(0, configured_path)
    probe_env = {key: value for key, value in environ.items() if key in ("PATH", "HOME", "PYENV_ROOT")}
    for candidate in candidates:
        if not _is_executable(candidate):
            continue
        outcome = await run_step(
            reactor,
            StepCommand(
                step=f"asking {candidate} its version",
                argv=(candidate, "-c", _VERSION_PROBE),
                env=probe_env,
                path="/",
            ),
            _PROBE_TIMEOUT,
            _PROBE_TIMEOUT,
        )
        if outcome.succeeded and outcome.tail.splitlines()[-1:] == [version]:
            return candidate
    raise InternalServerError(
        f"no Python {version} interpreter found for the plugin runner "
        f"(tried PYTHON_INTERPRETER_PATH, PATH, pyenv and {', '.join(search_dirs)})"
    )


# -- running steps -----------------------------------------------------------


class _StepProtocol(ProcessProtocol):
    """Collects a step's output tail and kills it when the watchdog fires."""

    def __init__(self, reactor, inactivity_timeout: float | None, total_timeout: float) -> None:
        self.ended: Deferred[StepOutcome] = Deferred()
        self._reactor = reactor
        self._inactivity_timeout = inactivity_timeout
        self._total_timeout = total_timeout
        self._tail = OutputTail()
        self._timed_out: str | None = None
        self._idle_call = None
        self._total_call = None

    def connectionMade(self) -> None:
        self.transport.closeStdin()
        if self._inactivity_timeout is not None:
            self._idle_call = self._reactor.callLater(
                self._inactivity_timeout,
                self._kill,
                f"no output for {self._inactivity_timeout:g} s",
            )
        self._total_call = self._reactor.callLater(
            self._total_timeout, self._kill, f"still running after {self._total_timeout:g} s"
        )

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self._tail.feed(data)
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self._inactivity_timeout)

    def _kill(self, why: str) -> None:
        self._timed_out = why
        for call in (self._idle_call, self._total_call):
            if call is not None and call.active():
                call.cancel()
        try:
            self.transport.signalProcess("KILL")
        except ProcessExitedAlready:
            pass
        # A grandchild (a build backend) may still hold the pipes open;
        # closing our ends lets processEnded fire once the child is reaped.
        self.transport.loseConnection()

    def processEnded(self, reason) -> None:
        for call in (self._idle_call, self._total_call):
            if call is not None and call.active():
                call.cancel()
        self.ended.callback(
            StepOutcome(
                exit_code=getattr(reason.value, "exitCode", None),
                signal=getattr(reason.value, "signal", None),
                tail=self._tail.text(),
                timed_out=self._timed_out,
            )
        )


async def run_step(reactor, command: StepCommand, inactivity_timeout: float, total_timeout: float) -> StepOutcome:
    """
    Run one step as a child process on ``reactor`` and report how it ended.

    :param inactivity_timeout: seconds of silence on stdout and stderr before
        the child is killed (ignored unless ``command.watch_inactivity``).
    :param total_timeout: seconds before the child is killed regardless.
    """
    protocol = _StepProtocol(
        reactor,
        inactivity_timeout if command.watch_inactivity else None,
        total_timeout,
    )
    reactor.spawnProcess(
        protocol,
        command.argv[0],
        list(command.argv),
        env=dict(command.env),
        path=command.path,
    )
    return await protocol.ended


# -- the builder -------------------------------------------------------------


class PythonEnvironmentBuilder:
    """
    Builds (or reuses) the ``.venv`` of local plugins' working directories.

    Builds of one working directory are serialized; builds of different ones
    run in parallel, bounded by ``launch_semaphore`` when one is given
    (``PLUGIN_LOCAL_LAUNCHING_CONCURRENT``).  A caller that already holds that
    semaphore around the whole launch must not pass it here as well.

    :param uv_path: the uv executable (see :func:`find_uv`).
    :param uv_cache_dir: ``UV_CACHE_DIR`` shared by every plugin
        (``$PLUGIN_WORKING_PATH/.uv-cache`` in the daemon).
    :param prefer_binary: ``PIP_PREFER_BINARY``; accepted for configuration
        parity, but uv has no such option (uv already prefers wheels), so it
        changes nothing, as in the Go daemon's uv path.
    :param proxies: ``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` to values.
    :param init_timeout: ``PYTHON_ENV_INIT_TIMEOUT``: seconds of silence
        after which a step is killed.
    :param total_timeout: seconds after which any one step is killed.
    :param python_interpreter_path: ``PYTHON_INTERPRETER_PATH``, used when it
        is the version the plugin asks for.
    :param environ: the daemon's environment (pass-through variables, PATH).
    :param threadpool: where the blocking deletion of an invalid venv runs;
        the reactor's own thread pool by default.
    :param prepared_venvs_dir: where finished, byte-compiled venvs are kept,
        keyed by everything that decides their content (interpreter,
        dependency files, index and extra arguments).  A plugin whose key is
        there gets a hard-linked copy in milliseconds instead of an install
        and a site-packages compilation (seconds); None disables it.
    """

    def __init__(
        self,
        reactor,
        uv_path: str,
        uv_cache_dir: str,
        pip_mirror_url: str | None = None,
        pip_extra_args: str | None = None,
        pip_verbose: bool = False,
        prefer_binary: bool = True,
        proxies: Mapping[str, str] | None = None,
        compile_extra_args: str | None = None,
        ignore_uv_lock: bool = False,
        init_timeout: float = 120.0,
        total_timeout: float = 600.0,
        *,
        python_interpreter_path: str | None = None,
        launch_semaphore: DeferredSemaphore | None = None,
        environ: Mapping[str, str] | None = None,
        interpreter_search_dirs: Sequence[str] = ("/usr/bin", "/usr/local/bin"),
        threadpool=None,
        prepared_venvs_dir: str | None = None,
    ) -> None:
        self._reactor = reactor
        self._prepared = prepared_venvs_dir
        self._uv = uv_path
        self._uv_cache_dir = uv_cache_dir
        self._pip_mirror_url = pip_mirror_url
        self._pip_extra_args = pip_extra_args
        self._pip_verbose = pip_verbose
        self._prefer_binary = prefer_binary
        self._proxies = dict(proxies or {})
        self._compile_extra_args = compile_extra_args
        self._ignore_uv_lock = ignore_uv_lock
        self._init_timeout = init_timeout
        self._total_timeout = total_timeout
        self._python_interpreter_path = python_interpreter_path
        self._launch_semaphore = launch_semaphore
        self._environ = dict(os.environ if environ is None else environ)
        self._interpreter_search_dirs = tuple(interpreter_search_dirs)
        self._threadpool = threadpool
        self._locks: dict[str, DeferredLock] = {}
        self._interpreters: dict[str, str] = {}

    def build(self, working_dir: str, runner_version_text: str | None, progress: Callable[[str], None]) -> Deferred:
        """
        Make sure ``working_dir/.venv`` is complete; fire with its python's absolute path.

        :param runner_version_text: the manifest's ``meta.runner.version``
            (empty means 3.12).
        :param progress: called with short status lines as the build goes.
        :return: a Deferred firing with ``<working_dir>/.venv/bin/python``, or
            failing with :class:`InternalServerError` naming the failed step.
        """
        return Deferred.fromCoroutine(self._build(os.path.abspath(working_dir), runner_version_text, progress))

    async def _build(self, working_dir: str, runner_version_text: str | None, progress) -> str:
        lock = self._locks.setdefault(working_dir, DeferredLock())
        try:
            async with lock:
                if venv_is_valid(working_dir):
                    progress("reusing the existing venv")
                    return os.path.join(working_dir, VENV_PYTHON)
                if self._launch_semaphore is None:
                    await self._create(working_dir, runner_version_text, progress)
                else:
                    async with self._launch_semaphore:
                        await self._create(working_dir, runner_version_text, progress)
                return os.path.join(working_dir, VENV_PYTHON)
        finally:
            if not lock.locked and not lock.waiting:
                self._locks.pop(working_dir, None)

    async def _create(self, working_dir: str, runner_version_text: str | None, progress) -> None:
        version = runner_version(runner_version_text)
        dependency_file = choose_dependency_file(_listdir(working_dir), self._pip_mirror_url)
        if os.path.lexists(os.path.join(working_dir, VENV_DIR)):
            progress("deleting an incomplete venv")
            await deferToThreadPool(
                self._reactor, self._pool(), shutil.rmtree, os.path.join(working_dir, VENV_DIR), True
            )
        interpreter = await self._interpreter(version)
        env = install_environment(self._environ, working_dir, self._uv_cache_dir, self._proxies)
        frozen_lock = (
            dependency_file == PYPROJECT_TOML
            and not self._ignore_uv_lock
            and os.path.exists(os.path.join(working_dir, UV_LOCK))
        )
        prepared = None
        if self._prepared is not None:
            key = await deferToThreadPool(
                self._reactor, self._pool(), self._prepared_key, working_dir, interpreter, dependency_file, frozen_lock
            )
            prepared = os.path.join(self._prepared, key)
        fresh = prepared is None or not venv_is_valid(prepared)
        if not fresh:
            progress("copying a prepared venv")
            await self._run(_link_copy(os.path.join(prepared, VENV_DIR), os.path.join(working_dir, VENV_DIR), env))
            for command in compile_commands(working_dir, [], env, self._compile_extra_args):
                progress(command.step)
                await self._run(command)
        else:
            progress(f"creating venv with Python {version}")
            await self._run(venv_command(self._uv, working_dir, interpreter, env))

            progress(f"installing dependencies from {dependency_file}")
            await self._run(
                install_command(
                    self._uv,
                    working_dir,
                    dependency_file,
                    env,
                    pip_mirror_url=self._pip_mirror_url,
                    pip_extra_args=self._pip_extra_args,
                    pip_verbose=self._pip_verbose,
                    frozen_lock=frozen_lock,
                )
            )

            for command in compile_commands(
                working_dir, _site_packages(working_dir), env, self._compile_extra_args
            ):
                progress(command.step)
                await self._run(command)

        marker = os.path.join(working_dir, MARKER_PATH)
        os.makedirs(os.path.dirname(marker), mode=0o755, exist_ok=True)
        with open(marker, "wb") as f:
            f.write(marker_content(self._reactor.seconds()))
        if prepared is not None and fresh:
            await self._keep_prepared(working_dir, prepared, env)
        progress("venv ready")

    def _prepared_key(self, working_dir: str, interpreter: str, dependency_file: str, frozen_lock: bool) -> str:
        """What decides a venv's content, hashed (blocking: reads files)."""
        digest = hashlib.sha256()
        for part in (interpreter, dependency_file, self._pip_mirror_url or "", self._pip_extra_args or "", str(frozen_lock)):
            digest.update(part.encode() + b"\0")
        names = [dependency_file]
        if dependency_file == PYPROJECT_TOML and os.path.exists(os.path.join(working_dir, UV_LOCK)):
            names.append(UV_LOCK)
        for name in names:
            with open(os.path.join(working_dir, name), "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
        return digest.hexdigest()

    async def _keep_prepared(self, working_dir: str, prepared: str, env) -> None:
        """Keep a hard-linked copy of a fresh venv for the next plugin with the same key."""
        staging = f"{prepared}.{os.getpid()}.{int(self._reactor.seconds() * 1000)}"
        try:
            os.makedirs(staging, mode=0o755, exist_ok=True)
            outcome = await run_step(
                self._reactor,
                _link_copy(os.path.join(working_dir, VENV_DIR), os.path.join(staging, VENV_DIR), env),
                self._init_timeout,
                self._total_timeout,
            )
            if outcome.succeeded and not os.path.exists(prepared):
                os.rename(staging, prepared)
        except OSError as e:
            log.warn("keeping a prepared venv failed: {error}", error=str(e))
        finally:
            if os.path.exists(staging):
                await deferToThreadPool(self._reactor, self._pool(), shutil.rmtree, staging, True)

    async def _interpreter(self, version: str) -> str:
        cached = self._interpreters.get(version)
        if cached is None:
            cached = await find_interpreter(
                self._reactor,
                version,
                self._python_interpreter_path,
                self._environ,
                self._interpreter_search_dirs,
            )
            self._interpreters[version] = cached
        return cached

    async def _run(self, command: StepCommand) -> None:
        outcome = await run_step(self._reactor, command, self._init_timeout, self._total_timeout)
        if outcome.succeeded:
            return
        message = failure_message(command.step, outcome)
        if command.required:
            raise InternalServerError(message)
        log.warn("{step} of {path} failed, continuing: {message}", step=command.step, path=command.path, message=message)

    def _pool(self):
        if self._threadpool is None:
            self._threadpool = self._reactor.getThreadPool()
        return self._threadpool


def _link_copy(source: str, target: str, env) -> StepCommand:
    """
    A copy of a venv made of hard links (``cp -al``): instant, and safe to
    share because Python and uv replace files instead of rewriting them.
    """
    return StepCommand(
        step="copying a prepared venv",
        argv=("/bin/cp", "-al", source, target),
        env=env,
        path=os.path.dirname(target) or ".",
    )


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as e:
        raise InternalServerError(f"cannot read the plugin's working directory {path}: {e.strerror}") from e


def _site_packages(working_dir: str) -> list[str]:
    """The venv's ``lib/python*/site-packages`` directories, relative to the working directory."""
    lib = os.path.join(VENV_DIR, "lib")
    try:
        names = sorted(os.listdir(os.path.join(working_dir, lib)))
    except OSError:
        return []
    return [
        os.path.join(lib, name, "site-packages")
        for name in names
        if name.startswith("python") and os.path.isdir(os.path.join(working_dir, lib, name, "site-packages"))
    ]
