"""
Bringing local plugins up: unpack, build the venv, start the processes.

:class:`LocalRuntimeFactory` makes one attempt each time the
:class:`~difydaemon.runtimes.registry.RuntimeRegistry` asks; the registry
decides when to try (an install, the daemon's start, a retry after a
failure, a request for a plugin that is not up).
"""

from __future__ import annotations

import os
import shutil

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.logger import Logger
from twisted.python.failure import Failure

from difydaemon.errors import DaemonError, InternalServerError, ObjectNotFoundError
from difydaemon.packaging.archive import extract_package, read_package
from difydaemon.packaging.identifier import parse_identifier
from difydaemon.runtimes.containment import give_to, prepare_private_directory
from difydaemon.runtimes.environment import venv_is_valid, working_dir_for
from difydaemon.runtimes.local import LocalRuntime
from difydaemon.runtimes.memory import MINIMUM_MEMORY_LIMIT, declared_memory, memory_limit_of

log = Logger()


class SharedResult:
    """
    One Deferred's outcome handed to any number of waiters, each getting its
    own Deferred (a failure is delivered to every waiter and consumed once).

    Cancelling a waiter detaches it; with ``cancel_when_abandoned``, the
    last waiter's cancellation cancels the shared Deferred too (an install
    that timed out must not leave its plugin starting for nobody).
    """

    def __init__(self, result: Deferred, cancel_when_abandoned: bool = False) -> None:
        self.result = result
        self._waiters: list[Deferred] = []
        self._outcome = None
        self._done = False
        self._cancel_when_abandoned = cancel_when_abandoned
        result.addBoth(self._settle)

    def _settle(self, outcome):
        self._done = True
        self._outcome = outcome
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(outcome) if not _is_failure(outcome) else waiter.errback(outcome)
        return None

    @property
    def done(self) -> bool:
        """Whether the outcome is known."""
        return self._done

    def addWaiter(self) -> Deferred:
        """A new Deferred that fires with the shared outcome."""
        waiter = Deferred(self._waiter_cancelled)
        if self._done:
            if _is_failure(self._outcome):
                waiter.errback(self._outcome)
            else:
                waiter.callback(self._outcome)
        else:
            self._waiters.append(waiter)
        return waiter

    def _waiter_cancelled(self, waiter: Deferred) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            if self._cancel_when_abandoned and not self._waiters and not self._done:
                self.result.cancel()


def _is_failure(value) -> bool:
    return isinstance(value, Failure)


class LocalRuntimeFactory:
    """
    Brings local plugins up for the :class:`RuntimeRegistry`: unpack the
    package into its working directory, build its venv, start its
    instances, and wait for the first heartbeat.

    A launch that fails removes the working directory it created, so a
    failed install leaves no directory and no process behind; a launch that
    is cancelled stops what it started.  The package is read from storage
    only when the working directory has to be filled.

    :param reactor: spawns processes and keeps time.
    :param persistence: an IPersistence (to restore installed plugins).
    :param storage: an IObjectStorage (the installed-package copies).
    :param paths: the storage prefixes (``StoragePaths``).
    :param runner: where unpacking and deleting run (a blocking runner).
    :param builder: the ``PythonEnvironmentBuilder``.
    :param working_path: ``PLUGIN_WORKING_PATH``.
    :param environ: the plugin processes' base environment.
    :param max_package_size: ``MAX_PLUGIN_PACKAGE_SIZE``.
    :param runtime_options: keyword arguments of ``LocalRuntime`` (instance
        count, timeouts, buffer sizes).
    :param launch_concurrency: ``PLUGIN_LOCAL_LAUNCHING_CONCURRENT``.
    :param plugin_home: the plugins' ``HOME`` (already in ``environ``),
        created 0700 before each launch; None leaves ``HOME`` alone.
    :param run_as: the :class:`~difydaemon.runtimes.parent_death.RunAs`
        plugins and their builds run as (``PLUGIN_RUN_AS_USER``): their
        working directories, ``plugin_home`` and ``shared_dirs`` are given
        to that user.
    :param shared_dirs: directories every build writes to (the uv cache,
        the prepared venvs), given to ``run_as`` once, at the first launch.
    :param declarations: the
        :class:`~difydaemon.management.declarations.DeclarationCache` to
        read stored declarations through (a large one is then decoded in
        the pool, once), if any.
    """

    def __init__(
        self,
        reactor,
        persistence,
        storage,
        paths,
        runner,
        builder,
        working_path: str,
        environ: dict,
        max_package_size: int,
        runtime_options: dict | None = None,
        launch_concurrency: int = 2,
        plugin_home: str | None = None,
        run_as=None,
        shared_dirs: tuple = (),
        declarations=None,
    ) -> None:

        self._reactor = reactor
        self._persistence = persistence
        self._declarations = declarations
        self._storage = storage
        self._paths = paths
        self._runner = runner
        self._builder = builder
        self._working_path = working_path
        self._environ = dict(environ)
        # plugins may write the .pyc of what was not compiled ahead
        self._environ.pop("PYTHONDONTWRITEBYTECODE", None)
        self._max_package_size = max_package_size
        self._runtime_options = dict(runtime_options or {})
        self._semaphore = DeferredSemaphore(launch_concurrency)
        self._plugin_home = plugin_home
        self._run_as = run_as
        self._shared_dirs = tuple(shared_dirs)
        self._shared_given = False

    @property
    def builder(self):
        """The :class:`~difydaemon.runtimes.environment.PythonEnvironmentBuilder` of the venvs."""
        return self._builder

    @property
    def runtime_options(self) -> dict:
        """The keyword arguments every ``LocalRuntime`` is made with (a copy)."""
        return dict(self._runtime_options)

    def launch(self, plugin_unique_identifier, declaration, package, progress):
        """Deferred[LocalRuntime], ready to take sessions."""

        async def given():
            return package

        return self._semaphore.run(
            lambda: Deferred.fromCoroutine(
                self._launch(plugin_unique_identifier, declaration, given, progress)
            )
        )

    def launch_installed(self, plugin_unique_identifier, progress):
        """
        Launch an identifier installed earlier, from its stored declaration
        and installed package.  Deferred[LocalRuntime], or Deferred[None]
        when it is not a plugin installed locally (no ``plugins`` row, or
        another install type such as a remote debugging plugin).
        """
        return self._semaphore.run(
            lambda: Deferred.fromCoroutine(self._launch_installed(plugin_unique_identifier, progress))
        )

    def build_installed(self, plugin_unique_identifier, progress):
        """
        Make an installed identifier's working directory and venv without
        starting it (a plugin left idle until its first call: that call then
        pays only for the process).  Deferred[None]; nothing for a plugin
        that is not installed locally.  Under the same concurrency bound as
        launches: a burst of installs elsewhere must not run every build at once.
        """
        return self._semaphore.run(
            lambda: Deferred.fromCoroutine(
                self._launch_installed(plugin_unique_identifier, progress, start=False)
            )
        )

    async def _launch_installed(self, identifier, progress, start=True):
        plugin = await self._persistence.get_plugin(identifier)
        if plugin is None or plugin.install_type != "local":
            return None
        if self._declarations is not None:
            declaration = await self._declarations.value(identifier)
        else:
            declaration = await self._persistence.get_declaration(identifier)
        if declaration is None:
            raise InternalServerError(f"installed plugin {identifier} has no declaration")

        async def stored():
            try:
                return await self._storage.load(self._paths.installed_package(identifier))
            except ObjectNotFoundError:
                raise InternalServerError(f"the installed package of {identifier} is missing from storage")

        return await self._launch(identifier, declaration, stored, progress, start)

    def installed(self):
        """Deferred[list of the identifiers installed locally] (daemon start)."""
        return Deferred.fromCoroutine(self._installed())

    async def _installed(self):
        return [plugin.plugin_unique_identifier for plugin in await self._persistence.list_plugins("local")]

    async def _launch(self, identifier, declaration, load_package, progress, start=True):
        ident = parse_identifier(identifier)
        meta = declaration.get("meta") or {}
        runner_meta = meta.get("runner") or {}
        if runner_meta.get("language", "python") != "python":
            raise InternalServerError(f"unsupported runner language {runner_meta.get('language')!r}")
        working_dir = os.path.abspath(working_dir_for(self._working_path, identifier))
        await self._prepare_shared()
        created = await self._runner.run(prepare_directory, working_dir)
        try:
            if created:
                package = await load_package()
                progress("unpacking the package")
                try:
                    await self._runner.run(_unpack, package, self._max_package_size, working_dir)
                except DaemonError as exc:
                    raise InternalServerError(f"unpacking the package failed: {exc.message}")
            if self._run_as is not None:
                await self._runner.run(give_to, working_dir, self._run_as)
            python = await self._builder.build(working_dir, runner_meta.get("version"), progress)
            if self._run_as is not None:
                # what the daemon itself wrote during the build (a prepared
                # venv copied in) must be the plugin's too
                await self._runner.run(give_to, working_dir, self._run_as)
            if not start:
                progress("plugin is built; idle until its first call")
                return None
            progress("starting the plugin")
            memory_limit = memory_limit_of(declaration)
            declared = declared_memory(declaration)
            if memory_limit is None and declared is not None:
                # the two reasons a declared limit is not enforced
                log.warn(
                    "plugin {identifier} declares resource.memory {declared} bytes, {reason}: not enforced",
                    identifier=identifier,
                    declared=declared,
                    reason=f"below {MINIMUM_MEMORY_LIMIT}, a placeholder"
                    if declared < MINIMUM_MEMORY_LIMIT
                    else "more than the launcher can set",
                )
            runtime = LocalRuntime(
                self._reactor,
                identifier,
                ident.plugin_id,
                working_dir,
                python,
                entrypoint=runner_meta.get("entrypoint") or "main",
                env=self._environ,
                declaration=declaration,
                memory_limit=memory_limit,
                **self._runtime_options,
            )
            try:
                await runtime.start()
            except DaemonError as exc:
                raise InternalServerError(f"starting the plugin failed: {exc.message}")
            except BaseException:
                # cancelled (an abandoned install, the daemon stopping): the
                # runtime's canceller stops it; its processes end before
                # their directory goes
                await runtime.stop(drain_timeout=0)
                raise
            progress("plugin is ready")
            return runtime
        except BaseException:
            if created:
                await self._runner.run(_remove_tree, working_dir)
            raise

    async def _prepare_shared(self) -> None:
        if self._plugin_home is not None:
            await self._runner.run(prepare_private_directory, self._plugin_home, self._run_as)
        if self._run_as is not None and not self._shared_given:
            for path in self._shared_dirs:
                await self._runner.run(_give_directory, path, self._run_as)
            self._shared_given = True

    def discard(self, plugin_unique_identifier):
        """Delete an identifier's working directory. Deferred[None]."""
        working_dir = os.path.abspath(working_dir_for(self._working_path, plugin_unique_identifier))
        return self._runner.run(_remove_tree, working_dir)


#: written into a working directory once its package is wholly unpacked
UNPACKED_MARKER = ".difydaemon-unpacked"


def prepare_directory(path: str) -> bool:
    """
    Create ``path`` if missing; True when the package must be unpacked into
    it.  A directory's files alone do not say its unpack finished: a
    cancelled unpack's thread, or a daemon killed during one, leaves some of
    them (and a cancelled unpack may still be writing after its directory was
    removed), so only the marker written after a whole unpack counts.  The
    identifier names the package's bytes, so what an unpack cut short left
    is removed and the package unpacked again.  A directory from before the
    marker existed counts as whole when its venv was built: the build only
    ever follows a whole unpack.
    """
    if os.path.exists(os.path.join(path, UNPACKED_MARKER)):
        return False
    if venv_is_valid(path):
        _mark_unpacked(path)
        return False
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o755, exist_ok=True)
    return True


def _mark_unpacked(path: str) -> None:
    with open(os.path.join(path, UNPACKED_MARKER), "wb"):
        pass


def unpack_files(files, target: str) -> None:
    """Write a decoded package's files into ``target``, then the marker that says they are all there."""
    extract_package(files, target)
    _mark_unpacked(target)


def _give_directory(path: str, run_as) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    give_to(path, run_as)


def _unpack(package: bytes, max_size: int, target: str) -> None:
    unpack_files(read_package(package, max_size), target)


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
