"""
A launch, from the uploaded package to a running function
(``serverless.md`` §9.1 step 3):

1. decode the package as the daemon does (size bound, zip safety, manifest)
   and check that its checksum is the one its file name claims;
2. unpack it into its own working directory under ``SRI_WORKING_PATH``;
3. build its venv with the local runtime's
   :class:`~difydaemon.runtimes.environment.PythonEnvironmentBuilder`
   (uv, prepared venvs, bytecode cache);
4. start ``<venv python> -m <entrypoint>`` with ``INSTALL_METHOD=serverless``
   on a free port of ``SRI_FUNCTION_HOST`` and wait until ``/health`` answers.

Progress goes to a callback as :class:`~difydaemon.sri.wire.LaunchEvent`
values.  A failure raises :class:`LaunchFailed` naming the stage and why,
after removing the working directory it created: a failed launch leaves
no directory and no process behind.  Launches of one package at once share
one outcome; a package whose function runs is not launched again.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
from collections.abc import Callable, Mapping

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, DeferredSemaphore
from twisted.logger import Logger

from difydaemon.errors import DaemonError
from difydaemon.packaging.package import PackagePolicy, decode_package
from difydaemon.packaging.signature import official_public_key
from difydaemon.runtimes.environment import working_dir_for
from difydaemon.runtimes.launch import SharedResult, prepare_directory, unpack_files
from difydaemon.sri import wire
from difydaemon.sri.function_site import install_function_site
from difydaemon.sri.state import FunctionRecord, load_records, save_records
from difydaemon.sri.functions import STATE_STOPPED, Function, FunctionSpec, FunctionStartError, FunctionTable

log = Logger()

#: where functions' working directories live under ``SRI_WORKING_PATH``
FUNCTIONS_DIR = "functions"


class LaunchFailed(Exception):
    """
    A launch that failed.

    :ivar stage: the launch stream stage it failed in.
    :ivar message: why.
    """

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.message = message


def free_port(host: str, taken: set[int]) -> int:
    """
    A TCP port of ``host`` that nothing listens on now and no function holds.

    The function binds it a moment later; another program could take it in
    between, and the launch then fails on its health check (the port is
    never shared silently: the SDK's bind would fail).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(100):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
        if port not in taken:
            return port
    raise OSError(f"no free port on {host}")


def port_is_free(host: str, port: int) -> bool:
    """Whether nothing listens on ``host:port`` now (a bind succeeds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def function_environment(
    base: Mapping[str, str], host: str, port: int, daemon_url: str, site_dir: str | None = None
) -> dict[str, str]:
    """
    A function's whole environment: ``base`` (the allow-listed variables,
    never the connector's key) and the SDK's serverless settings; with
    ``site_dir``, ``PYTHONPATH`` names it (:mod:`difydaemon.sri.function_site`).
    """
    env = dict(base)
    if site_dir is not None:
        env["PYTHONPATH"] = site_dir
    # functions may write the .pyc of what was not compiled ahead
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(
        {
            "INSTALL_METHOD": "serverless",
            "SERVERLESS_HOST": host,
            "SERVERLESS_PORT": str(port),
            "DIFY_PLUGIN_DAEMON_URL": daemon_url,
        }
    )
    return env


class FunctionLauncher:
    """
    Launches packages as functions and keeps them in ``table``.

    :param reactor: spawns and keeps time.
    :param builder: a ``PythonEnvironmentBuilder`` (or a fake with its ``build``).
    :param run_blocking: ``run_blocking(f, *args) -> Deferred``: runs ``f`` off the reactor thread.
    :param table: the :class:`FunctionTable`.
    :param working_path: ``SRI_WORKING_PATH``, absolute.
    :param function_host: ``SRI_FUNCTION_HOST``.
    :param daemon_url: ``SRI_DAEMON_URL``.
    :param base_environment: what every function inherits (allow-listed).
    :param probe: ``probe(url) -> Deferred[bool]``: the health check.
    :param max_package_size: the package bound (zip and uncompressed).
    :param start_timeout: ``SRI_FUNCTION_START_TIMEOUT``.
    :param parent_death: the launcher that makes functions die with the connector.
    :param allocate_port: ``allocate_port(host, taken) -> int``.
    :param is_port_free: ``is_port_free(host, port) -> bool`` (restoring functions).
    :param build_concurrency: venv builds running at once
        (``PLUGIN_LOCAL_LAUNCHING_CONCURRENT``); later launches wait.
    """

    def __init__(
        self,
        reactor,
        builder,
        run_blocking: Callable[..., Deferred],
        table: FunctionTable,
        working_path: str,
        function_host: str,
        daemon_url: str,
        base_environment: Mapping[str, str],
        probe: Callable[[str], Deferred],
        max_package_size: int,
        start_timeout: float = 60.0,
        parent_death=None,
        allocate_port: Callable[[str, set[int]], int] = free_port,
        stop_grace_period: float | None = None,
        is_port_free: Callable[[str, int], bool] | None = None,
        build_concurrency: int = 2,
    ) -> None:
        self._reactor = reactor
        self._builder = builder
        self._run_blocking = run_blocking
        self.table = table
        self._working_path = working_path
        self._function_host = function_host
        self._daemon_url = daemon_url
        self._base_environment = dict(base_environment)
        self._probe = probe
        self._policy = PackagePolicy(
            max_size=max_package_size, force_verify=False, enforce_langgenius=False, public_keys=(official_public_key(),)
        )
        self._start_timeout = start_timeout
        self._parent_death = parent_death
        self._allocate_port = allocate_port
        self._is_port_free = port_is_free if is_port_free is None else is_port_free
        self._stop_grace_period = stop_grace_period
        self._pending: dict[str, SharedResult] = {}
        self._reserved: set[int] = set()
        # functions started but not yet in the table; a stop must reach them too
        self._starting: set[Function] = set()
        self._stopping = False
        self._site_dir: str | None = None
        self._state_lock = DeferredLock()
        # builds are CPU- and disk-heavy: at most this many at once
        self._builds = DeferredSemaphore(build_concurrency)

    def launch(self, form: wire.LaunchForm, progress: Callable[[wire.LaunchEvent], None]) -> Deferred:
        """
        The package's function, launched unless it runs already.

        :return: Deferred[Function]; fails with :class:`LaunchFailed`.  A
            second launch of a package while the first runs waits for the
            first's outcome (its progress goes to the first caller only).
        """
        if self._stopping:
            refused: Deferred = Deferred()
            refused.errback(LaunchFailed(wire.STAGE_START, "the connector is stopping"))
            return refused
        running = self.table.get(form.filename)
        if running is not None and running.state == STATE_STOPPED:
            # its process could not be brought back: launch it afresh
            self.table.forget(form.filename)
            running = None
        if running is not None:
            progress(wire.starting("reusing the running function"))
            done: Deferred = Deferred()
            done.callback(running)
            return done
        shared = self._pending.get(form.filename)
        if shared is None:
            result = Deferred.fromCoroutine(self._launch(form, progress))
            shared = SharedResult(result)
            self._pending[form.filename] = shared
            result.addBoth(self._forget_pending, form.filename)
        else:
            progress(wire.building("another launch of this package is under way; waiting for it"))
        return shared.addWaiter()

    async def _launch(self, form: wire.LaunchForm, progress) -> Function:
        identifier = form.identifier
        progress(wire.LaunchEvent(wire.STAGE_START, wire.STATE_RUNNING, "checking the package"))
        try:
            decoded = await self._run_blocking(decode_package, form.package, self._policy)
        except DaemonError as error:
            raise LaunchFailed(wire.STAGE_START, f"the package is not valid: {error.message}") from None
        if decoded.identifier.raw != identifier.raw:
            raise LaunchFailed(
                wire.STAGE_START,
                f"the package is {decoded.identifier.raw}, not the {identifier.raw} its file name says",
            )
        runner = (decoded.declaration.get("meta") or {}).get("runner") or {}
        if self._site_dir is None:
            self._site_dir = await self._run_blocking(install_function_site, self._working_path)
        working_dir = os.path.abspath(working_dir_for(os.path.join(self._working_path, FUNCTIONS_DIR), identifier))
        created = await self._run_blocking(prepare_directory, working_dir)
        stage = wire.STAGE_BUILD
        try:
            if created:
                progress(wire.building("unpacking the package"))
                await self._run_blocking(unpack_files, decoded.files, working_dir)
            if not self._builds.tokens:
                progress(wire.building("waiting for other builds to finish"))
            try:
                python = await self._builds.run(
                    self._builder.build, working_dir, runner.get("version"), lambda line: progress(wire.building(line))
                )
            except DaemonError as error:
                raise LaunchFailed(stage, error.message) from None
            stage = wire.STAGE_RUN
            port = self._allocate_port(self._function_host, self.table.ports() | self._reserved)
            self._reserved.add(port)
            try:
                function = await self._start(form, identifier, working_dir, python, runner, port, progress)
            finally:
                self._reserved.discard(port)
        except LaunchFailed:
            await self._cleanup(created, working_dir)
            raise
        except BaseException as error:
            await self._cleanup(created, working_dir)
            if isinstance(error, Exception):
                log.failure("launching {filename} failed", filename=form.filename)
                raise LaunchFailed(stage, f"internal error: {error}") from None
            raise
        self.table.add(function)
        await self._remember()
        return function

    def _spec(self, filename: str, name: str, function_id: str, port: int, argv, path: str) -> FunctionSpec:
        return FunctionSpec(
            filename=filename,
            name=name,
            function_id=function_id,
            host=self._function_host,
            port=port,
            argv=tuple(argv),
            env=function_environment(self._base_environment, self._function_host, port, self._daemon_url, self._site_dir),
            path=path,
        )

    async def _start(self, form, identifier, working_dir, python, runner, port, progress) -> Function:
        spec = self._spec(
            form.filename,
            wire.function_name(identifier),
            secrets.token_hex(8),
            port,
            (python, "-m", runner.get("entrypoint") or "main"),
            working_dir,
        )
        progress(wire.starting(f"starting the function on {spec.endpoint}"))
        return await self._run(spec)

    async def _run(self, spec: FunctionSpec) -> Function:
        """Start a function and wait until it answers; LaunchFailed at the run stage otherwise."""
        options = {} if self._stop_grace_period is None else {"stop_grace_period": self._stop_grace_period}
        function = Function(
            self._reactor, spec, self._probe, self._parent_death, start_timeout=self._start_timeout, **options
        )
        self._starting.add(function)
        try:
            await function.start()
        except FunctionStartError as error:
            await function.stop()
            if self._stopping:
                raise LaunchFailed(wire.STAGE_RUN, "the connector is stopping") from None
            raise LaunchFailed(wire.STAGE_RUN, str(error)) from None
        finally:
            self._starting.discard(function)
        if self._stopping:
            await function.stop()
            raise LaunchFailed(wire.STAGE_RUN, "the connector is stopping")
        return function

    def stop(self) -> Deferred:
        """
        Refuse new launches and stop every function, those still starting
        included; fires once all have ended.
        """
        self._stopping = True
        starting = [function.stop() for function in list(self._starting)]
        return DeferredList([self.table.stop_all(), *starting], consumeErrors=True).addCallback(lambda _: None)

    async def _cleanup(self, created: bool, working_dir: str) -> None:
        if created:
            await self._run_blocking(shutil.rmtree, working_dir, True)

    def remove(self, filename: str) -> Deferred:
        """Stop a package's function and delete its working directory; Deferred[bool]: whether there was one."""
        return Deferred.fromCoroutine(self._remove(filename))

    async def _remove(self, filename: str) -> bool:
        function = self.table.get(filename)
        removed = await self.table.remove(filename)
        if function is not None:
            await self._remember()
            await self._run_blocking(shutil.rmtree, function.spec.path, True)
        return removed

    # -- across restarts ---------------------------------------------------------------

    async def _remember(self) -> None:
        """Write the table's functions to the state file, one writer at a time, the latest table last."""
        async with self._state_lock:
            records = [
                FunctionRecord(f.spec.filename, f.spec.name, f.spec.function_id, f.spec.port, f.spec.argv, f.spec.path)
                for f in self.table.functions()
            ]
            try:
                await self._run_blocking(save_records, self._working_path, records)
            except OSError as error:
                log.error("cannot remember the functions in {path}: {error}", path=self._working_path, error=str(error))

    def restore(self) -> Deferred:
        """
        Start again the functions the state file lists (connector start):
        each on its old port when that is free, so the URLs the daemon
        stored stay good.  A launch of one of them meanwhile waits for it.
        Fires (with how many came back) once all have been tried; never fails.
        """
        return Deferred.fromCoroutine(self._restore())

    async def _restore(self) -> int:
        records = await self._run_blocking(load_records, self._working_path)
        if not records:
            return 0
        self._site_dir = await self._run_blocking(install_function_site, self._working_path)
        attempts = []
        for record in records:
            result = Deferred.fromCoroutine(self._restore_one(record))
            shared = SharedResult(result)
            self._pending[record.filename] = shared
            result.addBoth(self._forget_pending, record.filename)
            attempts.append(shared.addWaiter())
        outcomes = await DeferredList(attempts, consumeErrors=True)
        restored = sum(1 for ok, _ in outcomes if ok)
        log.info("restored {restored} of {count} functions", restored=restored, count=len(records))
        await self._remember()
        return restored

    def _forget_pending(self, outcome, filename: str):
        self._pending.pop(filename, None)
        return outcome

    async def _restore_one(self, record: FunctionRecord) -> Function:
        if not await self._run_blocking(os.path.exists, record.argv[0]):
            log.warn("function {name} not restored: {python} is gone", name=record.name, python=record.argv[0])
            raise LaunchFailed(wire.STAGE_RUN, "its venv is gone")
        port = record.port
        taken = self.table.ports() | self._reserved
        if port in taken or not self._is_port_free(self._function_host, port):
            port = self._allocate_port(self._function_host, taken)
            log.warn(
                "function {name}: port {old} is taken, restored on {new}; reinstall its plugin so that the daemon learns the new URL",
                name=record.name,
                old=record.port,
                new=port,
            )
        self._reserved.add(port)
        try:
            function = await self._run(self._spec(record.filename, record.name, record.function_id, port, record.argv, record.path))
        except LaunchFailed as error:
            log.warn("function {name} not restored: {error}", name=record.name, error=error.message)
            raise
        finally:
            self._reserved.discard(port)
        self.table.add(function)
        return function

