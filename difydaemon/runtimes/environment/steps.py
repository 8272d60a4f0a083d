"""
The child processes of a venv build: their command lines and environment
(pure), and :func:`run_step`, which runs one on the injected reactor,
watches it for inactivity and total duration, and reports how it ended with
the end of its output.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

from attrs import evolve, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol

from difydaemon.runtimes.child_environment import uv_environment
from difydaemon.runtimes.environment.layout import REQUIREMENTS_TXT, PYPROJECT_TOML, VENV_DIR, VENV_PYTHON
from difydaemon.runtimes.parent_death import ParentDeathSignal, child_argv

TAIL_BYTES = 2048

# Up to this many files, compiling them one by one beats starting compileall's
# process pool (about 0.3-0.5 s here) and re-checking all of site-packages.
SEQUENTIAL_COMPILE_LIMIT = 200


_UV_TRACING_LINE = re.compile(rb"^\s*(?:[\d.]+s\s+)?(?:TRACE|DEBUG)\s")


def install_environment(
    environ: Mapping[str, str],
    working_dir: str,
    uv_cache_dir: str,
    proxies: Mapping[str, str],
    passthrough: Iterable[str] = (),
) -> dict[str, str]:
    """
    The whole environment of the uv steps: it replaces the daemon's, it does not extend it.

    The allow-listed variables and uv's own ``UV_*`` ones
    (:func:`~difydaemon.runtimes.child_environment.uv_environment`), then
    ``VIRTUAL_ENV`` and ``UV_CACHE_DIR`` (shared by all plugins).  Notably
    ``PYTHONDONTWRITEBYTECODE`` and the daemon's secrets never reach the build.

    :param environ: the daemon's environment.
    :param proxies: resolved proxy variables; empty values are left out.
    :param passthrough: the names listed in ``PLUGIN_ENV_PASSTHROUGH``.
    """
    env = uv_environment(environ, proxies, passthrough)
    env.setdefault("PATH", os.defpath)
    env["VIRTUAL_ENV"] = os.path.join(working_dir, VENV_DIR)
    env["UV_CACHE_DIR"] = uv_cache_dir
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
    find_links: str | None = None,
    no_index: bool = False,
    requirements_path: str = REQUIREMENTS_TXT,
    offline: bool = False,
) -> StepCommand:
    """
    The dependency installation of ``runtimes.md`` §1.3 step 6.

    :param frozen_lock: whether ``uv sync`` gets ``--frozen`` (a ``uv.lock``
        exists and ``PLUGIN_IGNORE_UV_LOCK`` is off); only for ``pyproject.toml``.
    :param find_links: a directory of wheels offered to uv (the package's
        ``wheels/`` folder, or ``PIP_WHEELHOUSE_PATH``); requirements only.
    :param no_index: install from ``find_links`` alone, with no index at all.
    :param requirements_path: the requirements file ``-r`` reads (a locked
        export, see :func:`export_lock_command`), for ``requirements.txt``.
    :param offline: from uv's cache alone (``--offline``), for ``requirements.txt``.
    """
    extra = split_extra_args(pip_extra_args)
    if dependency_file == REQUIREMENTS_TXT:
        argv = [uv, "pip", "install"]
        if offline:
            argv.append("--offline")
        if no_index:
            argv.append("--no-index")
        elif pip_mirror_url:
            argv += ["-i", pip_mirror_url]
        if find_links:
            argv += ["--find-links", find_links]
        argv += ["-r", requirements_path]
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


LOCKED_REQUIREMENTS = os.path.join(VENV_DIR, "dify", "locked-requirements.txt")


def export_lock_command(uv: str, working_dir: str, env: Mapping[str, str]) -> StepCommand:
    """
    ``uv export`` of a ``uv.lock`` to pinned requirements (``LOCKED_REQUIREMENTS``).

    ``uv sync --frozen`` downloads from the URLs written in the lock, whatever
    index it is given: with ``PIP_MIRROR_URL`` set, the locked versions are
    installed from the mirror with ``uv pip install`` instead.
    """
    return StepCommand(
        step="exporting uv.lock",
        argv=(
            uv, "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project",
            "--format", "requirements-txt", "-o", LOCKED_REQUIREMENTS,
        ),
        env=env,
        path=working_dir,
    )


def plugin_compile_command(working_dir: str, env: Mapping[str, str], compile_extra_args: str | None) -> StepCommand:
    """
    Byte-compilation of the plugin's own files (everything but the venv), as
    the Go daemon does it (``runtimes.md`` §1.3 step 7).

    ``compileall`` writes ``.pyc`` files whatever ``PYTHONDONTWRITEBYTECODE``
    says, and the build environment does not carry that variable anyway.
    """
    python = os.path.join(working_dir, VENV_PYTHON)
    return StepCommand(
        step="byte-compiling the plugin",
        argv=(python, "-m", "compileall", "-q", *split_extra_args(compile_extra_args), "-x", r"\.venv|\.uv-cache", "."),
        env=env,
        path=working_dir,
        watch_inactivity=False,
        required=False,
    )


def site_packages_compile_command(
    working_dir: str,
    site_packages: Sequence[str],
    env: Mapping[str, str],
    compile_extra_args: str | None,
    missing: Sequence[str] | None = None,
    parallel: bool = True,
    first: Sequence[str] = (),
) -> StepCommand | None:
    """
    Byte-compilation of the venv's site-packages, or of the part of it the
    bytecode cache did not provide.

    Without it a plugin cold-starts in about 3 s instead of about 1.2 s.

    :param site_packages: the site-packages directories, relative to ``working_dir``.
    :param missing: the sources still to compile, relative to ``working_dir``;
        None means all of site-packages.
    :param parallel: one worker process per core; False compiles in one
        process, as in the background: its workers would escape the
        parent-death signal (only the process itself gets it), and the
        cores belong to the plugins then.
    :param first: sources to compile before the rest, in this order
        (relative to ``working_dir``; see
        :func:`~difydaemon.runtimes.environment.import_order.compile_first`).
    :return: None when there is nothing to compile.
    """
    python = os.path.join(working_dir, VENV_PYTHON)
    extra = split_extra_args(compile_extra_args)
    if not site_packages or missing is not None and not missing:
        return None
    if missing is not None and len(missing) <= SEQUENTIAL_COMPILE_LIMIT:
        listed = set(first)
        return StepCommand(
            step=f"byte-compiling {len(missing)} files of site-packages",
            argv=(python, "-m", "compileall", "-q", *extra, *first, *(path for path in missing if path not in listed)),
            env=env,
            path=working_dir,
            watch_inactivity=False,
            required=False,
        )
    return StepCommand(
        step="byte-compiling site-packages",
        # One worker per core: site-packages is most of the build's time,
        # and two free cores cut it by about a third.  Files whose .pyc is
        # already valid (linked from the cache) are only checked.
        argv=(python, "-m", "compileall", "-q", *(("-j", "0") if parallel else ()), *extra, *first, *site_packages),
        env=env,
        path=working_dir,
        watch_inactivity=False,
        required=False,
    )


BACKGROUND_NICENESS = 10


def niced(command: StepCommand, nice_path: str | None, niceness: int = BACKGROUND_NICENESS) -> StepCommand:
    """
    ``command`` run under ``nice -n <niceness>``: work done in the background
    while a plugin starts and answers must leave the cores to it.

    :param nice_path: the ``nice`` executable; None runs the command as it is.
    """
    if nice_path is None:
        return command
    return evolve(command, argv=(nice_path, "-n", str(niceness), *command.argv))


def compile_commands(
    working_dir: str,
    site_packages: Sequence[str],
    env: Mapping[str, str],
    compile_extra_args: str | None,
) -> list[StepCommand]:
    """
    Byte-compilation of the plugin's own files and of all of the venv's
    site-packages (see :func:`plugin_compile_command` and
    :func:`site_packages_compile_command`).
    """
    commands = [plugin_compile_command(working_dir, env, compile_extra_args)]
    site = site_packages_compile_command(working_dir, site_packages, env, compile_extra_args)
    if site is not None:
        commands.append(site)
    return commands


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


DEFAULT_INDEX_URL = "https://pypi.org/simple"

# What uv says when it cannot connect to an index at all (as opposed to an
# index that answers "no such package").
_UNREACHABLE = re.compile(
    r"(error sending request|tcp connect error|Connection refused|dns error|failed to lookup address"
    r"|Network is unreachable|No route to host|connection timed out|operation timed out)",
    re.IGNORECASE,
)


def unreachable_index_message(tail: str, index_url: str | None) -> str | None:
    """
    The plain "needs the network and has none" error of a failed install,
    or None when uv's output does not say it could not connect.

    :param tail: the end of uv's output.
    :param index_url: the index in use (``PIP_MIRROR_URL``), None for PyPI.
    """
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    causes = [line for line in lines if _UNREACHABLE.search(line)]
    if not causes:
        return None
    cause = re.sub(r"^(?:[^\w]*\s*)?(?:cause:\s*)?", "", causes[-1]) or causes[-1]
    return f"cannot reach the package index {index_url or DEFAULT_INDEX_URL}: {cause}"


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


class _StepProtocol(ProcessProtocol):
    """Collects a step's output tail and kills it when the watchdog fires."""

    def __init__(self, reactor, inactivity_timeout: float | None, total_timeout: float) -> None:
        # cancelling the wait kills the step (a background compilation at stop)
        self.ended: Deferred[StepOutcome] = Deferred(lambda _: self._kill("cancelled"))
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
        if self.transport is None:
            return
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
        if self.ended.called:
            # cancelled: the waiter has gone
            return
        self.ended.callback(
            StepOutcome(
                exit_code=getattr(reason.value, "exitCode", None),
                signal=getattr(reason.value, "signal", None),
                tail=self._tail.text(),
                timed_out=self._timed_out,
            )
        )


async def run_step(
    reactor,
    command: StepCommand,
    inactivity_timeout: float,
    total_timeout: float,
    parent_death: ParentDeathSignal | None = None,
) -> StepOutcome:
    """
    Run one step as a child process on ``reactor`` and report how it ended.

    :param inactivity_timeout: seconds of silence on stdout and stderr before
        the child is killed (ignored unless ``command.watch_inactivity``).
    :param total_timeout: seconds before the child is killed regardless.
    :param parent_death: the launcher that makes the child die with the
        daemon; None starts it directly.
    """
    protocol = _StepProtocol(
        reactor,
        inactivity_timeout if command.watch_inactivity else None,
        total_timeout,
    )
    argv = child_argv(parent_death, command.argv)
    reactor.spawnProcess(protocol, argv[0], argv, env=dict(command.env), path=command.path)
    return await protocol.ended
