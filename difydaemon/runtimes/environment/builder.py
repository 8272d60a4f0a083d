"""
:class:`PythonEnvironmentBuilder`: builds (or reuses) a plugin's ``.venv``
with uv and writes the marker that says it is complete as soon as the
dependencies are in.  Byte-compiling site-packages (seconds) happens
afterwards, in the background, niced, while the plugin starts; then the
finished venv is kept as a prepared venv and its bytecode in the
:class:`~difydaemon.runtimes.environment.bytecode.BytecodeCache`, so that
later builds of the same or similar dependencies are cheap.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence

from twisted.internet.defer import CancelledError, Deferred, DeferredList, DeferredLock, DeferredSemaphore
from twisted.internet.threads import deferToThreadPool
from twisted.application.service import Service
from twisted.logger import Logger

from difydaemon.background import start_tracked
from difydaemon.errors import InternalServerError
from difydaemon.runtimes.child_environment import plugin_environment
from difydaemon.runtimes.environment.bytecode import (
    BYTECODE_DIR,
    DEFAULT_BYTECODE_ENTRIES,
    BytecodeCache,
    BytecodeLinks,
    bytecode_salt,
)
from difydaemon.runtimes.environment.import_order import compile_first
from difydaemon.runtimes.environment.interpreters import find_interpreter, find_uv
from difydaemon.runtimes.environment.layout import (
    MARKER_PATH,
    PYPROJECT_TOML,
    REQUIREMENTS_TXT,
    UV_LOCK,
    WHEELS_DIR,
    VENV_DIR,
    VENV_PYTHON,
    choose_dependency_file,
    marker_content,
    runner_version,
    venv_is_valid,
)
from difydaemon.runtimes.environment.steps import (
    LOCKED_REQUIREMENTS,
    StepCommand,
    export_lock_command,
    failure_message,
    install_command,
    install_environment,
    plugin_compile_command,
    niced,
    run_step,
    site_packages_compile_command,
    unreachable_index_message,
    venv_command,
)
from difydaemon.runtimes.parent_death import ParentDeathSignal

log = Logger()

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
    :param environ: the daemon's environment, of which the steps get only
        what :func:`install_environment` (uv) and
        :func:`~difydaemon.runtimes.child_environment.plugin_environment`
        (the venv's Python) allow.
    :param passthrough: the names listed in ``PLUGIN_ENV_PASSTHROUGH``.
    :param parent_death: the launcher that makes every step die with the
        daemon (:func:`~difydaemon.runtimes.parent_death.parent_death_signal`);
        None starts them directly.
    :param threadpool: where blocking work runs (deleting an invalid venv,
        the caches' file work); the reactor's own thread pool by default.
    :param prepared_venvs_dir: where finished, byte-compiled venvs are kept,
        keyed by everything that decides their content (interpreter,
        dependency files, index and extra arguments).  A plugin whose key is
        there gets a hard-linked copy in milliseconds instead of an install
        and a site-packages compilation (seconds); None disables it.  Its
        ``bytecode`` directory is a :class:`BytecodeCache`: a plugin with a
        new dependency set gets the ``.pyc`` files of every distribution
        an earlier plugin installed, and compiles only the rest.  Both are
        filled in the background after a fresh build (see :meth:`settled`).
    :param bytecode_entries: how many distributions' bytecode is kept.
    :param compile_in_background: whether a fresh build returns as soon as
        the dependencies are in, leaving the compilation of site-packages
        to the background (see :meth:`settled`): the plugin answers seconds
        sooner, compiling what it imports itself.  False compiles before
        returning (short-lived users such as ``dify plugin run``).
    :param wheelhouse: ``PIP_WHEELHOUSE_PATH``: a directory of wheels a
        ``requirements.txt`` install first tries alone, with no index, then
        offered alongside the index; None for none.
    :param nice_path: the ``nice`` executable, which lowers the priority of
        that background compilation; None runs it at normal priority.
    :param prefer_offline: ``PIP_PREFER_OFFLINE``: a ``requirements.txt``
        install from an index first tries uv's cache alone (``--offline``),
        then the index.  A warm cache's index pages go stale after ten
        minutes (PyPI's ``max-age``), and uv then asks the index again about
        every package, which took about 1 s of an echo plugin's 1.2 s
        install here; the price is that an unpinned requirement gets the
        newest version the cache knows.
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
        bytecode_entries: int = DEFAULT_BYTECODE_ENTRIES,
        passthrough: Iterable[str] = (),
        parent_death: ParentDeathSignal | None = None,
        nice_path: str | None = None,
        compile_in_background: bool = False,
        wheelhouse: str | None = None,
        prefer_offline: bool = False,
    ) -> None:
        self._wheelhouse = wheelhouse
        self._prefer_offline = prefer_offline
        self._reactor = reactor
        self._compile_in_background = compile_in_background
        self._nice_path = nice_path
        # Site-packages compilations running after their build returned.
        self._compiling: set[Deferred] = set()
        self._prepared = prepared_venvs_dir
        self._bytecode = (
            None
            if prepared_venvs_dir is None
            else BytecodeCache(os.path.join(prepared_venvs_dir, BYTECODE_DIR), bytecode_entries)
        )
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
        self._passthrough = tuple(passthrough)
        self._parent_death = parent_death
        self._interpreter_search_dirs = tuple(interpreter_search_dirs)
        self._threadpool = threadpool
        self._locks: dict[str, DeferredLock] = {}
        # Background keeping of finished builds, to the prepared venv each keeps (or None).
        self._background: dict[Deferred, str | None] = {}
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
        env = install_environment(self._environ, working_dir, self._uv_cache_dir, self._proxies, self._passthrough)
        # The venv's Python runs the .pth files of what uv installed: it
        # gets what a plugin gets, not uv's index credentials.
        python_env = plugin_environment(self._environ, self._proxies, self._passthrough)
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
            # A build of the same dependencies that just finished may be
            # keeping its venv: a copy is far quicker than a build.
            await self._settled(prepared)
        fresh = prepared is None or not venv_is_valid(prepared)
        linked: list[tuple[str, BytecodeLinks]] = []
        if not fresh:
            progress("copying a prepared venv")
            await self._run(_link_copy(os.path.join(prepared, VENV_DIR), os.path.join(working_dir, VENV_DIR), python_env))
            command = plugin_compile_command(working_dir, python_env, self._compile_extra_args)
            progress(command.step)
            await self._run(command)
        else:
            progress(f"creating venv with Python {version}")
            await self._run(venv_command(self._uv, working_dir, interpreter, env))

            progress(f"installing dependencies from {dependency_file}")
            # The plugin's own files need only the venv's python: they are
            # compiled while uv installs, off the critical path.
            command = plugin_compile_command(working_dir, python_env, self._compile_extra_args)
            progress(command.step)
            plugin_compiled = Deferred.fromCoroutine(self._run(command))
            try:
                await self._install(working_dir, dependency_file, env, frozen_lock)
            finally:
                # Awaited even when the install fails: whoever then deletes
                # the directory must not race compileall walking it.
                await plugin_compiled
            linked, site_packages, missing = await self._link_site_packages(working_dir, interpreter, progress)
            compile_site = site_packages_compile_command(
                working_dir,
                site_packages,
                python_env,
                self._compile_extra_args,
                missing,
                parallel=not self._compile_in_background,
            )
            if compile_site is not None and not self._compile_in_background:
                progress(compile_site.step)
                await self._run(compile_site)
                compile_site = None

        marker = os.path.join(working_dir, MARKER_PATH)
        os.makedirs(os.path.dirname(marker), mode=0o755, exist_ok=True)
        with open(marker, "wb") as f:
            f.write(marker_content(self._reactor.seconds()))
        if fresh:
            # The venv works without its bytecode: the plugin starts now and
            # compiles what it imports itself, while the rest is compiled
            # in the background, niced, then kept for later builds.
            if compile_site is not None:
                progress("byte-compiling site-packages in the background")
            self._finish_later(working_dir, prepared, linked, compile_site, site_packages, missing)
        progress("venv ready")

    async def _install(self, working_dir: str, dependency_file: str, env, frozen_lock: bool) -> None:
        """
        Install the dependencies: from the package's ``wheels/`` alone when
        it ships one; else from the wheelhouse alone when it has everything,
        else from the index (offered the wheelhouse too).
        """

        def command(find_links: str | None = None, no_index: bool = False, **options) -> StepCommand:
            return install_command(
                self._uv,
                working_dir,
                options.pop("dependency_file", dependency_file),
                env,
                pip_mirror_url=self._pip_mirror_url,
                pip_extra_args=self._pip_extra_args,
                pip_verbose=self._pip_verbose,
                frozen_lock=frozen_lock,
                find_links=find_links,
                no_index=no_index,
                **options,
            )

        if dependency_file == PYPROJECT_TOML and frozen_lock and self._pip_mirror_url:
            # the lock's own URLs would bypass the mirror
            os.makedirs(os.path.dirname(os.path.join(working_dir, LOCKED_REQUIREMENTS)), mode=0o755, exist_ok=True)
            await self._run(export_lock_command(self._uv, working_dir, env))
            await self._run(
                command(dependency_file=REQUIREMENTS_TXT, requirements_path=LOCKED_REQUIREMENTS),
                index_url=self._pip_mirror_url,
            )
            return

        if dependency_file == REQUIREMENTS_TXT:
            if os.path.isdir(os.path.join(working_dir, WHEELS_DIR)):
                await self._run(command(WHEELS_DIR, no_index=True))
                return
            if self._wheelhouse is not None:
                if await self._first_try(command(self._wheelhouse, no_index=True), "the wheelhouse", working_dir):
                    return
                await self._run(command(self._wheelhouse), index_url=self._pip_mirror_url)
                return
            if self._prefer_offline and await self._first_try(command(offline=True), "uv's cache", working_dir):
                return
        await self._run(command(), index_url=self._pip_mirror_url)

    async def _first_try(self, attempt: StepCommand, source: str, working_dir: str) -> bool:
        """Run an install from ``source`` alone; whether it did; a failure is logged, not raised."""
        outcome = await self._step(attempt)
        if outcome.succeeded:
            return True
        log.info(
            "{source} lacks some of {path}'s dependencies, trying the index: {message}",
            source=source,
            path=working_dir,
            message=failure_message(attempt.step, outcome),
        )
        return False

    def stop_compiling(self) -> None:
        """Kill the background compilations still running (at stop: they are only an optimisation)."""
        for done in list(self._compiling):
            done.cancel()

    def settled(self) -> Deferred:
        """
        A Deferred that fires (with None) once the work finished builds left
        in the background is done: compiling their site-packages, then
        keeping their venv as a prepared venv and their new bytecode in the
        cache.  It never fails.
        """
        return Deferred.fromCoroutine(self._settled())

    async def _settled(self, prepared: str | None = None, compiling: bool = True) -> None:
        """
        Wait for background work: all of it, or only the keeping of
        ``prepared``, or (``compiling`` false) only the keeping of venvs
        and bytecode, not the compilations before it.
        """
        while True:
            pending = [d for d, target in self._background.items() if prepared is None or target == prepared]
            if compiling and prepared is None:
                pending += list(self._compiling)
            if not pending:
                return
            await DeferredList(pending)

    def _finish_later(
        self,
        working_dir: str,
        prepared: str | None,
        linked,
        compile_site: StepCommand | None,
        site_packages: Sequence[str] = (),
        missing: Sequence[str] | None = None,
    ) -> None:
        """
        Compile site-packages (niced), what the plugin is predicted to
        import first, then keep the build for later ones; tracked until
        done, errors logged.
        """

        async def finish() -> None:
            if compile_site is not None:
                try:
                    command = await self._in_import_order(compile_site, working_dir, site_packages, missing)
                    await self._run(niced(command, self._nice_path))
                except CancelledError:
                    # the daemon is stopping: the venv runs without bytecode
                    log.info("byte-compiling {path} stopped with the daemon", path=working_dir)
                    return
            if prepared is not None or self._bytecode is not None:
                # not awaited: a stop cancels this coroutine, and the keeping
                # runs in a thread that cannot be stopped half-way; it is
                # tracked (settled() waits for it) and logs its own outcome
                self._keep_for_later(working_dir, prepared, linked)

        start_tracked(finish(), self._compiling, "finishing {path} in the background failed", path=working_dir)

    async def _in_import_order(
        self, command: StepCommand, working_dir: str, site_packages: Sequence[str], missing: Sequence[str] | None
    ) -> StepCommand:
        """
        ``command`` taking first, in reverse, what the plugin starting
        beside it is predicted to import (see
        :mod:`~difydaemon.runtimes.environment.import_order`): compiled
        before the plugin gets there, it only loads them.  The prediction is
        an optimisation: when it fails, ``command`` as it is.
        """
        try:
            first = await deferToThreadPool(
                self._reactor, self._pool(), compile_first, working_dir, site_packages, missing
            )
        except CancelledError:
            raise
        except Exception:
            log.failure("predicting the imports of {path} failed", path=working_dir)
            return command
        ordered = site_packages_compile_command(
            working_dir, site_packages, command.env, self._compile_extra_args, missing, parallel=False, first=first
        )
        return command if ordered is None else ordered

    def _keep_for_later(self, working_dir: str, prepared: str | None, linked) -> Deferred:
        """
        Start keeping a fresh build for later ones; tracked until done, its errors logged.

        :return: a Deferred firing with None when it is done (it never fails).
        """

        def forget(result: None) -> None:
            self._background.pop(done, None)

        done = deferToThreadPool(self._reactor, self._pool(), self._keep_blocking, working_dir, prepared, linked)
        self._background[done] = prepared
        done.addCallbacks(
            lambda _: log.info("{path}: compiled and kept for later builds", path=working_dir),
            lambda failure: log.failure("keeping {path} for later builds failed", failure, path=working_dir),
        )
        done.addBoth(forget)
        return done

    def _keep_blocking(self, working_dir: str, prepared: str | None, linked) -> None:
        """Keep a prepared venv and new bytecode from a finished build (blocking)."""
        if prepared is not None:
            _keep_prepared(os.path.join(working_dir, VENV_DIR), prepared)
        if self._bytecode is not None:
            self._store_bytecode(working_dir, linked)

    async def _link_site_packages(
        self, working_dir: str, interpreter: str, progress
    ) -> tuple[list[tuple[str, BytecodeLinks]], list[str], list[str] | None]:
        """
        Give site-packages what the bytecode cache has, and say what is left to compile.

        :return: each site-packages directory with what the cache gave it
            (empty without a cache, or when the cache failed), the
            site-packages directories (relative to ``working_dir``), and the
            sources left to compile (relative to ``working_dir``; None for all).
        """
        site_packages = _site_packages(working_dir)
        linked: list[tuple[str, BytecodeLinks]] = []
        missing: list[str] | None = None
        if self._bytecode is not None and site_packages:
            salt = bytecode_salt(interpreter, self._compile_extra_args)
            # Bytecode other builds are storing right now is worth the wait;
            # their compilations are not.
            await self._settled(compiling=False)
            try:
                for directory in site_packages:
                    links = await deferToThreadPool(
                        self._reactor, self._pool(), self._bytecode.link, os.path.join(working_dir, directory), salt
                    )
                    linked.append((directory, links))
            except Exception:
                # The cache is an optimisation: whatever breaks it, compile everything.
                log.failure("linking cached bytecode into {path} failed", path=working_dir)
                linked = []
            else:
                missing = [os.path.join(directory, path) for directory, links in linked for path in links.missing]
                progress(f"linked {sum(links.linked for _, links in linked)} cached .pyc files")
        return linked, site_packages, missing

    def _store_bytecode(self, working_dir: str, linked: Sequence[tuple[str, BytecodeLinks]]) -> None:
        """Keep what was compiled for the next venvs, and bound the cache (blocking)."""
        try:
            for directory, links in linked:
                self._bytecode.store(os.path.join(working_dir, directory), links.uncached)
            self._bytecode.prune()
        except Exception:
            log.failure("caching the bytecode of {path} failed", path=working_dir)

    def _prepared_key(self, working_dir: str, interpreter: str, dependency_file: str, frozen_lock: bool) -> str:
        """What decides a venv's content, hashed (blocking: reads files)."""
        digest = hashlib.sha256()
        parts = (
            interpreter,
            dependency_file,
            self._pip_mirror_url or "",
            self._pip_extra_args or "",
            str(frozen_lock),
            self._wheelhouse or "",
            str(os.path.isdir(os.path.join(working_dir, WHEELS_DIR))),
        )
        if self._prefer_offline:
            # a cache-only install may pick older versions; without the
            # option, keys stay what they were
            parts += ("prefer offline",)
        for part in parts:
            digest.update(part.encode() + b"\0")
        names = [dependency_file]
        if dependency_file == PYPROJECT_TOML and os.path.exists(os.path.join(working_dir, UV_LOCK)):
            names.append(UV_LOCK)
        for name in names:
            with open(os.path.join(working_dir, name), "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
        return digest.hexdigest()

    async def _interpreter(self, version: str) -> str:
        cached = self._interpreters.get(version)
        if cached is None:
            cached = await find_interpreter(
                self._reactor,
                version,
                self._python_interpreter_path,
                self._environ,
                self._interpreter_search_dirs,
                self._parent_death,
            )
            self._interpreters[version] = cached
        return cached

    async def _run(self, command: StepCommand, index_url: str | None | bool = False) -> None:
        """
        Run a step; a required one that fails raises its failure.

        :param index_url: for a step that uses an index, that index (None
            for PyPI): when uv could not reach it the error says so first.
        """
        outcome = await self._step(command)
        if outcome.succeeded:
            return
        message = failure_message(command.step, outcome)
        unreachable = None if index_url is False else unreachable_index_message(outcome.tail, index_url)
        if unreachable is not None:
            message = f"{unreachable}\n{message}"
        if command.required:
            raise InternalServerError(message)
        log.warn("{step} of {path} failed, continuing: {message}", step=command.step, path=command.path, message=message)

    async def _step(self, command: StepCommand):
        """Run a step; its outcome, its duration logged (where an install's time goes)."""
        started = self._reactor.seconds()
        outcome = await run_step(self._reactor, command, self._init_timeout, self._total_timeout, self._parent_death)
        log.debug(
            "{step} of {path} ended after {seconds} s",
            step=command.step,
            path=command.path,
            seconds=round(self._reactor.seconds() - started, 3),
        )
        return outcome

    def _pool(self):
        if self._threadpool is None:
            self._threadpool = self._reactor.getThreadPool()
        return self._threadpool


class BackgroundBuildsService(Service):
    """
    Makes a daemon's stop end the work its builder left in the background:
    a site-packages compilation still running is killed (the venv works
    without bytecode), and the keeping of finished builds is waited for, so
    that no build step outlives the daemon's services.
    """

    def __init__(self, builder: PythonEnvironmentBuilder) -> None:
        self._builder = builder

    def stopService(self) -> Deferred:
        Service.stopService(self)
        # a compilation would hold the stop for seconds (or, stopped, for
        # the steps' whole time-out): kill it, then wait for what is left
        self._builder.stop_compiling()
        return self._builder.settled()


def _keep_prepared(venv: str, prepared: str) -> None:
    """
    Keep a hard-linked copy of a finished venv as the prepared venv
    ``prepared``, unless a valid one is there already (blocking).

    The copy is made in a staging directory and renamed into place, so a
    prepared venv is whole or absent; it is kept only if it is valid, and it
    replaces an invalid leftover.  The plugin may be running meanwhile:
    Python replaces the ``.pyc`` files it writes, it never rewrites them, so
    the copy sees each file whole.
    """
    if venv_is_valid(prepared):
        return
    token = f"{os.getpid()}.{secrets.token_hex(4)}"
    staging = f"{prepared}.{token}"
    old = f"{prepared}.{token}.old"
    try:
        shutil.copytree(venv, os.path.join(staging, VENV_DIR), symlinks=True, copy_function=os.link)
        if not venv_is_valid(staging):
            return
        try:
            os.rename(staging, prepared)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or venv_is_valid(prepared):
                raise
            os.rename(prepared, old)
            os.rename(staging, prepared)
    except (OSError, shutil.Error) as e:
        # Unless another build kept the same venv first, the plugin's
        # directory went away (a failed launch, an uninstall) or the disk
        # refused: the next build of these dependencies builds afresh.
        if not venv_is_valid(prepared):
            log.warn("keeping a prepared venv failed: {error}", error=str(e))
    finally:
        for path in (staging, old):
            if os.path.lexists(path):
                shutil.rmtree(path, ignore_errors=True)


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


def configured_builder(reactor, local, working_path: str, environ: Mapping[str, str], parent_death) -> PythonEnvironmentBuilder:
    """
    The builder the daemon's local runtime and the SRI connector both use:
    configured from ``local`` (a :class:`~difydaemon.config.LocalRuntimeConfig`:
    ``UV_PATH``, ``PIP_MIRROR_URL``, ``PYTHON_INTERPRETER_PATH``...), its uv
    cache in ``working_path/.uv-cache`` and its prepared venvs (with the
    bytecode cache) in ``working_path/.prepared-venvs``.

    :param working_path: an absolute directory.
    :param environ: the process's environment, of which the steps inherit
        only the allow-listed variables.
    :raises InternalServerError: when uv cannot be found.
    """
    return PythonEnvironmentBuilder(
        reactor,
        find_uv(local.uv_path or None),
        os.path.join(working_path, ".uv-cache"),
        pip_mirror_url=local.pip_mirror_url or None,
        pip_extra_args=local.pip_extra_args or None,
        pip_verbose=local.pip_verbose,
        prefer_binary=local.pip_prefer_binary,
        proxies=local.proxy_environment(),
        compile_extra_args=local.python_compile_all_extra_args or None,
        ignore_uv_lock=local.plugin_ignore_uv_lock,
        init_timeout=local.python_env_init_timeout_seconds,
        python_interpreter_path=local.python_interpreter_path or None,
        prepared_venvs_dir=os.path.join(working_path, ".prepared-venvs"),
        environ=environ,
        passthrough=local.plugin_env_passthrough,
        parent_death=parent_death,
        nice_path=shutil.which("nice", path=environ.get("PATH") or os.defpath),
        compile_in_background=True,
        wheelhouse=os.path.abspath(local.pip_wheelhouse_path) if local.pip_wheelhouse_path else None,
        prefer_offline=local.pip_prefer_offline,
    )
