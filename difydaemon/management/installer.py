"""
Installing, upgrading and uninstalling plugins for tenants, with install
tasks (``http-api.md`` §2.4, §5.4–§5.6).

An install runs in the background: the package is copied to the installed
bucket, the runtime launcher brings the plugin up (the seam the local
runtime plugs into), and only then are the installation rows written.  A
failure at any step leaves no row, no installed copy and no runtime behind,
and the task says why.
"""

from __future__ import annotations

from attrs import evolve
from twisted.internet.defer import CancelledError, Deferred, DeferredLock, DeferredSemaphore
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from difydaemon.background import start_tracked

from difydaemon.errors import (
    AlreadyInstalledError,
    BadRequestError,
    CoordinationUnavailableError,
    DaemonError,
    InternalServerError,
    NotFoundError,
    RecordNotFoundError,
)
from difydaemon.ids import new_id, utc_from_timestamp
from difydaemon.observability.otel import INTERNAL
from difydaemon.observability.trace import TracedProgress
from difydaemon.packaging.declaration import providers_of
from difydaemon.packaging.identifier import parse_identifier
from difydaemon.persistence.records import (
    TASK_FAILED,
    TASK_PENDING,
    TASK_RUNNING,
    TASK_SUCCESS,
    InstallTask,
    InstallTaskPlugin,
)

log = Logger()

#: what a task interrupted by a daemon stop (or crash) says
SHUTDOWN_MESSAGE = "An unexpected daemon shutdown occurred"

#: seconds after which a fully successful task deletes itself
SUCCESS_TASK_TTL = 120.0

#: fenced tasks remembered (so that none of their late updates is written)
MAX_FENCED_TASKS = 1000

#: what a task says when the replica running it died (its lease expired)
ORPHANED_MESSAGE = "The plugin daemon replica running this task stopped answering"


def truncate_message(message: str) -> str:
    """Task messages over 1024 characters keep their first and last 512."""
    if len(message) > 1024:
        return message[:512] + "..." + message[-512:]
    return message


class Installer:
    """
    Installs plugins for tenants and keeps their install tasks.

    :param reactor: for time and delayed calls.
    :param persistence: an IPersistence.
    :param storage: an IObjectStorage.
    :param packages: the :class:`PackageRegistry`.
    :param launcher: the IRuntimeLauncher that makes an identifier runnable.
    :param install_timeout: seconds one plugin's install may take.
    :param concurrency: installs running at once.
    :param installations: the InstallationCache to invalidate, if any.
    :param task_leases: the :class:`~difydaemon.coordination.tasks.TaskLeases`
        each running task is held under (None: tasks belong to this process
        alone, and a start fails every unfinished one).
    :param cluster: told ``plugin_installed(identifier)`` and
        ``plugin_retired(identifier)`` (the other replicas start and stop
        local plugins), or None.
    :param metrics: the :class:`~difydaemon.observability.metrics.DaemonMetrics`
        counting install jobs, or None.
    :param tracing: the :class:`~difydaemon.observability.otel.Tracing`
        giving each plugin of a task an install span (``ENABLE_OTEL``), or
        None.
    """

    def __init__(
        self,
        reactor,
        persistence,
        storage,
        packages,
        launcher,
        install_timeout: float = 900.0,
        concurrency: int = 4,
        installations=None,
        task_leases=None,
        cluster=None,
        metrics=None,
        tracing=None,
    ) -> None:
        self._reactor = reactor
        self.metrics = metrics
        self._tracing = tracing
        self._persistence = persistence
        self._storage = storage
        self._packages = packages
        self._launcher = launcher
        self._install_timeout = install_timeout
        self._semaphore = DeferredSemaphore(concurrency)
        # one lock per task: its plugins finish concurrently
        self._task_locks: dict[str, DeferredLock] = {}
        self._running: dict[str, Deferred] = {}
        self._timers: dict[str, object] = {}
        self._stopping = False
        self._installations = installations
        self._task_leases = task_leases
        #: task id -> its HeldLease, while this process runs the task
        self._leases: dict = {}
        #: task id -> why its lease was lost
        self._lost: dict[str, str] = {}
        self.cluster = cluster
        self._sweeper = None
        # old versions draining after an upgrade, until they are stopped
        self._retiring: set[Deferred] = set()

    @property
    def runtime_type(self) -> str:
        """What installations made here record as their runtime_type."""
        return self._launcher.runtime_type

    # -- install ----------------------------------------------------------

    async def install_from_identifiers(
        self, tenant_id: str, identifiers: list, source: str, metas: list
    ) -> dict:
        """
        Start installing ``identifiers`` for a tenant.  Returns
        ``{all_installed, task_id}``.
        """
        if len(metas) != len(identifiers):
            raise BadRequestError("the number of metas must be equal to the number of plugin unique identifiers")
        parsed = [parse_identifier(text) for text in identifiers]
        plugin_ids = [p.plugin_id for p in parsed]
        existing = await self._persistence.list_installations_by_plugin_ids(tenant_id, plugin_ids)
        installed_ids = {inst.plugin_id for inst in existing}
        todo = []
        for ident, meta in zip(parsed, metas):
            if ident.plugin_id in installed_ids:
                continue
            declaration = await self._packages.declaration(ident.raw)
            if declaration is None:
                raise InternalServerError(f"plugin declaration of {ident.raw} not found, please upload it firstly")
            todo.append((ident, meta or {}, declaration))
        if not todo:
            return {"all_installed": True, "task_id": ""}
        task = self._new_task(tenant_id, [(ident, declaration) for ident, _, declaration in todo], source)
        await self._create_task(task)
        for ident, meta, declaration in todo:
            self._start_job(
                task.id,
                tenant_id,
                ident.raw,
                lambda progress, ident=ident, meta=meta, declaration=declaration: self._install_one(
                    tenant_id, ident, declaration, source, meta, progress
                ),
            )
        return {"all_installed": False, "task_id": task.id}

    async def _create_task(self, task: InstallTask) -> None:
        """Write a new task's row, under its lease when tasks have leases."""
        if self._task_leases is not None:
            # before the row: a running row without a held lease is an orphan
            self._leases[task.id] = await self._task_leases.hold(
                task.id, lambda reason: self._lease_lost(task.id, reason)
            )
        try:
            await self._persistence.create_task(task)
        except BaseException:
            self._release_lease(task.id)
            raise

    def _lease_lost(self, task_id: str, reason: str) -> None:
        """Another replica may fail this task now: stop its jobs."""
        self._leases.pop(task_id, None)
        self._lost[task_id] = reason
        if len(self._lost) > MAX_FENCED_TASKS:
            # the oldest: its late progress lines, if any, are long over
            del self._lost[next(iter(self._lost))]
        log.warn("install task {task_id} lost its lease ({reason}); stopping its jobs", task_id=task_id, reason=reason)
        for key, job in list(self._running.items()):
            if key.startswith(f"{task_id}:"):
                job.cancel()

    def _release_lease(self, task_id: str) -> None:
        lease = self._leases.pop(task_id, None)
        self._lost.pop(task_id, None)
        if lease is not None:
            lease.release().addErrback(lambda f: log.failure("releasing the lease of task {task_id} failed", f,
                                                             task_id=task_id))

    def _new_task(self, tenant_id: str, plugins: list, source: str) -> InstallTask:
        """A running task whose plugins (identifier, declaration) are pending."""
        now = self._reactor.seconds()
        return InstallTask(
            id=new_id(now),
            created_at=utc_from_timestamp(now),
            updated_at=utc_from_timestamp(now),
            status=TASK_RUNNING,
            tenant_id=tenant_id,
            total_plugins=len(plugins),
            completed_plugins=0,
            plugins=[
                InstallTaskPlugin(
                    plugin_unique_identifier=ident.raw,
                    plugin_id=ident.plugin_id,
                    status=TASK_PENDING,
                    message="",
                    icon=declaration.get("icon", ""),
                    icon_dark=declaration.get("icon_dark", "") or "",
                    labels=declaration.get("label", {}),
                    source=source,
                )
                for ident, declaration in plugins
            ],
        )

    def _with_plugins(self, task: InstallTask, plugins: list, status: str) -> InstallTask:
        """``task`` with new plugin entries, overall status and counts."""
        return evolve(
            task,
            updated_at=utc_from_timestamp(self._reactor.seconds()),
            status=status,
            total_plugins=len(plugins),
            completed_plugins=[p.status for p in plugins].count(TASK_SUCCESS),
            plugins=plugins,
        )

    def _start_job(self, task_id: str, tenant_id: str, identifier: str, make_coroutine) -> None:
        def progress(message: str) -> None:
            # the log keeps each step's time (the task keeps only the last):
            # where an install spends its seconds
            log.info("install of {identifier}: {step}", identifier=identifier, step=message)
            d = Deferred.fromCoroutine(
                self._update_plugin(task_id, tenant_id, identifier, TASK_RUNNING, message)
            )
            d.addErrback(lambda f: log.failure("task progress update failed", f))

        span = None
        if self._tracing is not None:
            # a root span: the task outlives the request that made it, and
            # Dify polls the task rather than waiting on that request
            span = self._tracing.start(
                "plugin install", INTERNAL, None,
                {"plugin.unique_identifier": identifier, "install.task_id": task_id, "tenant.id": tenant_id},
            )
            progress = TracedProgress(progress, span.traceparent)
        coroutine = make_coroutine(progress)
        job = Deferred.fromCoroutine(self._run_job(task_id, tenant_id, identifier, coroutine, span))
        key = f"{task_id}:{identifier}"
        self._running[key] = job
        job.addBoth(self._job_done, key)

    def _job_done(self, result, key):
        self._running.pop(key, None)
        return None

    async def _run_job(self, task_id, tenant_id, identifier, coroutine, span=None) -> None:
        started = self._reactor.seconds()
        try:
            await self._semaphore.run(self._with_timeout, coroutine, task_id, tenant_id, identifier)
        except Exception as exc:
            message = exc.message if isinstance(exc, DaemonError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, DaemonError):
                log.failure("install of {identifier} failed", identifier=identifier)
            if span is not None:
                span.end(message)
            self._count(identifier, TASK_FAILED, started)
            await self._update_plugin(task_id, tenant_id, identifier, TASK_FAILED, message)
        except BaseException:
            if span is not None:
                span.end("cancelled")
            raise
        else:
            if span is not None:
                span.end()
            self._count(identifier, TASK_SUCCESS, started)
            await self._update_plugin(task_id, tenant_id, identifier, TASK_SUCCESS, "installed")

    def _count(self, identifier: str, status: str, started: float) -> None:
        """Count one ended install job in the metrics, if any."""
        if self.metrics is not None:
            self.metrics.installation(identifier.split(":", 1)[0], status, self._reactor.seconds() - started)

    def _with_timeout(self, coroutine, task_id, tenant_id, identifier) -> Deferred:
        async def progress_started():
            await self._update_plugin(task_id, tenant_id, identifier, TASK_RUNNING, "starting")
            return await coroutine

        d = Deferred.fromCoroutine(progress_started())
        expired = []

        def expire():
            expired.append(True)
            d.cancel()

        timer = self._reactor.callLater(self._install_timeout, expire)

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        def timed_out(failure):
            if failure.check(CancelledError):
                if expired:
                    raise InternalServerError(
                        f"install timed out after {int(self._install_timeout)} seconds"
                    )
                if task_id in self._lost:
                    raise InternalServerError(f"the install task lost its lease: {self._lost[task_id]}")
                raise InternalServerError(SHUTDOWN_MESSAGE)
            return failure

        d.addBoth(done)
        d.addErrback(timed_out)
        return d

    async def _install_one(self, tenant_id, ident, declaration, source, meta, progress) -> None:
        identifier = ident.raw
        data = await self._packages.package_bytes(identifier)
        installed_key = self._packages.paths.installed_package(identifier)
        copied = False
        if not await self._storage.exists(installed_key):
            await self._storage.save(installed_key, data)
            copied = True
        plugin_was_there = await self._persistence.get_plugin(identifier) is not None
        try:
            await self._launcher.launch(identifier, declaration, data, progress)
        except BaseException:
            if copied:
                await self._storage.delete(installed_key)
            raise
        try:
            await self._persistence.install_plugin(
                tenant_id=tenant_id,
                plugin_unique_identifier=identifier,
                plugin_id=ident.plugin_id,
                runtime_type=self.runtime_type,
                source=source,
                meta=meta,
                providers=providers_of(declaration),
            )
            self._invalidate(tenant_id, ident.plugin_id)
            self._announce_installed(identifier)
        except AlreadyInstalledError:
            # another task installed it meanwhile; the runtime is shared
            raise
        except BaseException:
            if not plugin_was_there and await self._persistence.get_plugin(identifier) is None:
                await self._launcher.stop(identifier)
                if copied:
                    await self._storage.delete(installed_key)
            raise

    def _announce_installed(self, identifier: str) -> None:
        if self.cluster is not None and self.runtime_type == "local":
            self.cluster.plugin_installed(identifier)

    async def _update_plugin(self, task_id, tenant_id, identifier, status, message) -> None:
        if task_id in self._lost:
            # fenced: another replica may have failed the task already
            return
        lock = self._task_locks.setdefault(task_id, DeferredLock())
        await lock.acquire()
        try:
            task = await self._persistence.get_task(tenant_id, task_id)
            if task is None:
                return
            if status == TASK_RUNNING and any(
                p.plugin_unique_identifier == identifier and p.status in (TASK_SUCCESS, TASK_FAILED)
                for p in task.plugins
            ):
                return  # a late progress line must not undo the outcome
            plugins = [
                p
                if p.plugin_unique_identifier != identifier
                else evolve(p, status=status, message=truncate_message(message))
                for p in task.plugins
            ]
            statuses = [p.status for p in plugins]
            if TASK_FAILED in statuses and all(s in (TASK_SUCCESS, TASK_FAILED) for s in statuses):
                overall = TASK_FAILED
            elif all(s == TASK_SUCCESS for s in statuses):
                overall = TASK_SUCCESS
            else:
                overall = TASK_RUNNING
            updated = self._with_plugins(task, plugins, overall)
            await self._persistence.update_task(updated)
            if overall in (TASK_SUCCESS, TASK_FAILED):
                self._task_locks.pop(task_id, None)
                self._release_lease(task_id)
            if overall == TASK_SUCCESS and not self._stopping:
                self._schedule_cleanup(tenant_id, task_id)
        finally:
            lock.release()

    def _schedule_cleanup(self, tenant_id: str, task_id: str) -> None:
        def cleanup():
            self._timers.pop(task_id, None)
            d = self._persistence.delete_task(tenant_id, task_id)
            d.addErrback(lambda f: log.failure("deleting task {task_id} failed", f, task_id=task_id))

        self._timers[task_id] = self._reactor.callLater(SUCCESS_TASK_TTL, cleanup)

    def _invalidate(self, tenant_id: str, plugin_id: str) -> None:
        if self._installations is not None:
            self._installations.invalidate(tenant_id, plugin_id)

    # -- upgrade ----------------------------------------------------------

    async def upgrade(
        self, tenant_id: str, original: str, new: str, source: str, meta: dict
    ) -> dict:
        """Move a tenant's installation to another package version."""
        if original == new:
            raise BadRequestError("original and new plugin unique identifier are the same")
        original_id = parse_identifier(original)
        new_id_ = parse_identifier(new)
        if original_id.plugin_id != new_id_.plugin_id:
            raise BadRequestError("original and new plugin id are different")
        installation = await self._persistence.get_installation(tenant_id, original_id.plugin_id)
        if installation is None or installation.plugin_unique_identifier != original:
            raise NotFoundError("plugin installation not found for this tenant")
        declaration = await self._packages.declaration(new)
        if declaration is None:
            raise InternalServerError(f"plugin declaration of {new} not found, please upload it firstly")
        if await self._persistence.get_plugin(new) is not None:
            await self._upgrade_rows(tenant_id, original, new, declaration, source, meta)
            return {"all_installed": True, "task_id": ""}
        task = self._new_task(tenant_id, [(new_id_, declaration)], source)
        await self._create_task(task)
        self._start_job(
            task.id,
            tenant_id,
            new,
            lambda progress: self._upgrade_one(
                tenant_id, original, new_id_, declaration, source, meta, progress
            ),
        )
        return {"all_installed": False, "task_id": task.id}

    async def _upgrade_one(self, tenant_id, original, ident, declaration, source, meta, progress) -> None:
        identifier = ident.raw
        data = await self._packages.package_bytes(identifier)
        installed_key = self._packages.paths.installed_package(identifier)
        copied = False
        if not await self._storage.exists(installed_key):
            await self._storage.save(installed_key, data)
            copied = True
        try:
            await self._launcher.launch(identifier, declaration, data, progress)
        except BaseException:
            if copied:
                await self._storage.delete(installed_key)
            raise
        try:
            await self._upgrade_rows(tenant_id, original, identifier, declaration, source, meta)
            self._announce_installed(identifier)
        except BaseException:
            if await self._persistence.get_plugin(identifier) is None:
                await self._launcher.stop(identifier)
                if copied:
                    await self._storage.delete(installed_key)
            raise

    async def _upgrade_rows(self, tenant_id, original, new, declaration, source, meta) -> None:
        result = await self._persistence.upgrade_plugin(
            tenant_id=tenant_id,
            original_identifier=original,
            new_identifier=new,
            providers=providers_of(declaration),
            source=source,
            meta=meta or {},
        )
        self._invalidate(tenant_id, result.installation.plugin_id)
        if result.original_plugin_removed:
            self._retire_in_background(original)

    def _retire_in_background(self, identifier: str) -> None:
        """
        Retire an upgraded-away identifier without making the upgrade wait:
        new sessions already go to the new version, and the old one drains
        its open sessions (a long LLM stream may take minutes) before it stops.
        """
        start_tracked(self._retire(identifier), self._retiring, "retiring {identifier} failed", identifier=identifier)

    async def _retire(self, identifier: str) -> None:
        """Stop and delete what a no longer referenced identifier had."""
        # its plugins and declaration rows went with the last installation
        self._packages.forget_declaration(identifier)
        await self._launcher.stop(identifier)
        await self._storage.delete(self._packages.paths.installed_package(identifier))
        if self.cluster is not None and self.runtime_type == "local":
            self.cluster.plugin_retired(identifier)

    # -- uninstall --------------------------------------------------------

    async def uninstall(self, tenant_id: str, installation_id: str) -> bool:
        """Uninstall one installation; true even when it did not exist."""
        result = await self._persistence.uninstall_plugin(tenant_id, installation_id)
        if result is not None:
            self._invalidate(tenant_id, result.installation.plugin_id)
        if result is not None and result.plugin_removed:
            await self._retire(result.installation.plugin_unique_identifier)
        return True

    # -- tasks --------------------------------------------------------------

    async def get_task(self, tenant_id: str, task_id: str) -> InstallTask:
        """One task of the tenant; RecordNotFoundError (-500) when absent."""
        task = await self._persistence.get_task(tenant_id, task_id)
        if task is None:
            raise RecordNotFoundError()
        return task

    async def delete_task_item(self, tenant_id: str, task_id: str, identifier: str) -> bool:
        """
        Remove one plugin from a task; the task goes when every remaining
        plugin succeeded.
        """
        parse_identifier(identifier)
        lock = self._task_locks.setdefault(task_id, DeferredLock())
        await lock.acquire()
        try:
            task = await self._persistence.get_task(tenant_id, task_id)
            if task is None:
                return True
            plugins = [p for p in task.plugins if p.plugin_unique_identifier != identifier]
            if all(p.status == TASK_SUCCESS for p in plugins):
                await self._persistence.delete_task(tenant_id, task_id)
                return True
            await self._persistence.update_task(self._with_plugins(task, plugins, task.status))
            return True
        finally:
            lock.release()

    async def fail_unfinished_tasks(self, message: str, only=None) -> int:
        """
        Mark pending or running tasks failed with ``message``: those in
        ``only`` (task ids), or every one nobody runs any more (with task
        leases: those whose lease is free; without: all).  Daemon start
        after a crash, shutdown, and the sweeps of orphaned tasks.  Returns
        how many changed.

        :raises CoordinationUnavailableError: Redis is down (nothing is
            failed: no task can be told from an orphan).
        """
        tasks = await self._persistence.list_tasks_by_status([TASK_PENDING, TASK_RUNNING])
        if only is not None:
            tasks = [task for task in tasks if task.id in only]
        elif self._task_leases is not None:
            tasks = [
                task for task in tasks
                if task.id not in self._leases and await self._task_leases.is_orphaned(task.id)
            ]
        for task in tasks:
            plugins = [
                p if p.status in (TASK_SUCCESS, TASK_FAILED) else evolve(p, status=TASK_FAILED, message=message)
                for p in task.plugins
            ]
            updated = self._with_plugins(task, plugins, TASK_FAILED)
            await self._persistence.update_task(evolve(updated, total_plugins=task.total_plugins))
        return len(tasks)

    async def stop(self) -> None:
        """
        Daemon shutdown: cancel running jobs, mark their tasks failed and
        drop pending clean-up timers.
        """
        self._stopping = True
        for timer in list(self._timers.values()):
            if timer.active():
                timer.cancel()
        self._timers.clear()
        self.stop_sweeping()
        for job in list(self._running.values()):
            job.cancel()
        if self._task_leases is None:
            await self.fail_unfinished_tasks(SHUTDOWN_MESSAGE)
            return
        # only ours: the other replicas' tasks go on
        mine = set(self._leases)
        await self.fail_unfinished_tasks(SHUTDOWN_MESSAGE, only=mine)
        for task_id in mine:
            self._release_lease(task_id)

    # -- orphans --------------------------------------------------------------

    def start_sweeping(self, interval: float) -> None:
        """Fail, every ``interval`` seconds, the tasks whose replica died (their lease expired)."""
        if self._task_leases is None or self._sweeper is not None:
            return
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = self._reactor
        self._sweeper.start(interval, now=False).addErrback(lambda f: log.failure("task sweeper failed", f))

    def stop_sweeping(self) -> None:
        """Stop the sweeps."""
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        self._sweeper = None

    async def _sweep(self) -> None:
        try:
            failed = await self.fail_unfinished_tasks(ORPHANED_MESSAGE)
        except CoordinationUnavailableError as e:
            log.warn("cannot look for orphaned install tasks: {reason}", reason=e.reason)
            return
        except DaemonError as e:
            log.warn("cannot look for orphaned install tasks: {reason}", reason=e.message)
            return
        if failed:
            log.warn("failed {count} install tasks whose replica stopped answering", count=failed)

    def wait_idle(self) -> Deferred:
        """A Deferred that fires when no install job is running and no upgraded-away version is draining (tests)."""
        from twisted.internet.defer import DeferredList

        return DeferredList(list(self._running.values()) + list(self._retiring), consumeErrors=True)
