"""
``dify plugin run``: one plugin on this machine, driven by JSON lines.

The plugin (a source directory or a ``.difypkg``) is checked as the daemon
checks uploads, unpacked into a temporary ``plugin-run-*`` directory, given
a venv exactly as the daemon builds one, and started as a local runtime.
Each stdin line is a client request
``{"invoke_id","type","action","request":{...}}``; every session message
comes back as one stdout line (``runtimes.md`` §6).  Backwards invocations
get an error and an end: there is no Dify behind this command.

:class:`PluginRun` takes the reactor; only the CLI entry point
(:func:`run_command`) touches the global one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import uuid

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from difydaemon.cli.console import Console
from difydaemon.cli.errors import CommandError
from difydaemon.cli.packing import DEFAULT_MAX_SIZE_MB, MEGABYTE, check_package, package_directory
from difydaemon.errors import DaemonError
from difydaemon.packaging.archive import extract_package
from difydaemon.packaging.package import DecodedPackage
from difydaemon.runtimes.child_environment import passthrough_names, plugin_environment
from difydaemon.runtimes.environment import PythonEnvironmentBuilder, find_uv
from difydaemon.runtimes.local import LocalRuntime
from difydaemon.runtimes.parent_death import ParentDeathSignal, parent_death_signal

RESPONSE_FORMATS = ("json", "text")
NO_BACKWARDS_MESSAGE = "backwards invocation is not available under dify plugin run (there is no Dify)"
_SESSION_FIELDS = ("conversation_id", "message_id", "app_id", "endpoint_id", "context")
PASSTHROUGH_VARIABLE = "PLUGIN_ENV_PASSTHROUGH"


def default_uv_cache_dir(environ) -> str:
    """``$UV_CACHE_DIR``, else ``~/.cache/dify/uv``: one cache for every run."""
    return environ.get("UV_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dify", "uv")


def format_output(invoke_id: str, kind: str, response: dict, response_format: str) -> str:
    """
    One output line: ``{"invoke_id","type","response"}`` as compact JSON, or
    ``[type] <invoke_id> <response JSON>`` in text mode.
    """
    if response_format == "text":
        body = json.dumps(response, ensure_ascii=False, separators=(",", ":"))
        return f"[{kind}] {invoke_id} {body}" if invoke_id else f"[{kind}] {body}"
    return json.dumps(
        {"invoke_id": invoke_id, "type": kind, "response": response}, ensure_ascii=False, separators=(",", ":")
    )


def parse_client_request(line: str) -> tuple[str, dict]:
    """
    A client request line as ``(invoke_id, the plugin request's data)``.

    ``data`` is the request body flattened with ``type``, ``action`` and
    ``user_id`` (``runtimes.md`` §0.2).

    :raises ValueError: not JSON, not an object, or a field missing or of the
        wrong type; the message says which.
    """
    try:
        message = json.loads(line)
    except ValueError as error:
        raise ValueError(f"request is not JSON: {error}") from None
    if not isinstance(message, dict):
        raise ValueError("request must be a JSON object")
    invoke_id = message.get("invoke_id")
    if invoke_id is None:
        invoke_id = uuid.uuid4().hex
    if not isinstance(invoke_id, str):
        raise ValueError("invoke_id must be a string")
    for key in ("type", "action"):
        if not isinstance(message.get(key), str) or not message[key]:
            raise ValueError(f"request needs a string {key!r}")
    body = message.get("request", {})
    if not isinstance(body, dict):
        raise ValueError("'request' must be an object")
    data = dict(body)
    data["type"] = message["type"]
    data["action"] = message["action"]
    data.setdefault("user_id", message.get("user_id") or "plugin-run-user")
    return invoke_id, data


def session_request(session_id: str, data: dict) -> dict:
    """The daemon -> plugin ``request`` message of a session (all eight keys, in order)."""
    request = {"session_id": session_id}
    for key in _SESSION_FIELDS:
        request[key] = None
    request["event"] = "request"
    request["data"] = data
    return request


def backwards_answers(session_id: str, backwards_request_id: str, message: str) -> list[dict]:
    """The ``error`` then ``end`` backwards responses that refuse one invocation."""
    answers = []
    for event, text in (("error", message), ("end", "")):
        answer = {"session_id": session_id}
        for key in _SESSION_FIELDS:
            answer[key] = None
        answer["event"] = "backwards_response"
        answer["data"] = {"backwards_request_id": backwards_request_id, "event": event, "message": text, "data": None}
        answers.append(answer)
    return answers


def load_plugin(source: str, max_size: int) -> DecodedPackage:
    """
    A plugin directory or ``.difypkg`` file, checked as the daemon checks uploads.

    :raises CommandError: missing, unreadable or refused.
    """
    if os.path.isdir(source):
        _, decoded = package_directory(source, max_size)
        return decoded
    if not os.path.isfile(source):
        raise CommandError(f"no plugin directory or package at {source}")
    try:
        with open(source, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise CommandError(f"cannot read {source}: {error.strerror}") from None
    return check_package(data, max_size)


class _SessionPrinter:
    """The session listener of one client request: prints what the plugin sends."""

    def __init__(self, run: PluginRun, invoke_id: str, session_id: str) -> None:
        self._run = run
        self._invoke_id = invoke_id
        self._session_id = session_id

    def stream(self, chunk, raw) -> None:
        self._run.emit(self._invoke_id, "plugin_response", chunk)

    def invoke(self, request) -> None:
        kind = request.get("type") if isinstance(request, dict) else None
        backwards_id = request.get("backwards_request_id") if isinstance(request, dict) else None
        self._run.emit(self._invoke_id, "info", {
            "message": f"the plugin asked for a backwards invocation ({kind}); answered with an error",
            "request": request,
        })
        if isinstance(backwards_id, str):
            for answer in backwards_answers(self._session_id, backwards_id, NO_BACKWARDS_MESSAGE):
                self._run.send(self._session_id, answer)

    def end(self) -> None:
        self._run.emit(self._invoke_id, "plugin_invoke_end", {})
        self._run.session_closed()

    def error(self, error_type, message, args) -> None:
        self._run.emit(self._invoke_id, "error", {"error_type": error_type, "message": message, "args": args})
        # The SDK ends every session, failed ones too; so does this command.
        self._run.emit(self._invoke_id, "plugin_invoke_end", {})
        self._run.session_closed()


class PluginRun:
    """
    One ``dify plugin run``: prepare, start, serve request lines, stop.

    :param reactor: provides processes, time and a thread pool.
    :param console: where responses (stdout) and progress (stderr) go.
    :param builder: builds the venv (the daemon's builder).
    :param environ: the plugin's whole environment (``INSTALL_METHOD=local``
        is set on top), already reduced to what a plugin may see
        (:func:`~difydaemon.runtimes.child_environment.plugin_environment`).
    :param response_format: ``json`` or ``text``.
    :param parent_death: the launcher that makes the plugin die with this
        command, even when it is SIGKILLed; None starts it directly.
    """

    def __init__(
        self,
        reactor,
        console: Console,
        builder: PythonEnvironmentBuilder,
        environ,
        response_format: str = "json",
        max_size: int = DEFAULT_MAX_SIZE_MB * MEGABYTE,
        stop_grace_period: float = 2.0,
        parent_death: ParentDeathSignal | None = None,
    ) -> None:
        self._reactor = reactor
        self._console = console
        self._builder = builder
        self._environ = dict(environ)
        self._response_format = response_format
        self._max_size = max_size
        self._stop_grace_period = stop_grace_period
        self._parent_death = parent_death
        self.working_dir: str | None = None
        self.runtime: LocalRuntime | None = None
        self.identifier: str | None = None
        self._open_sessions = 0
        self._input_ended = False
        #: Fires when input has ended and every session is closed, or the plugin failed.
        self.finished: Deferred = Deferred()
        self._stopping: Deferred | None = None

    def emit(self, invoke_id: str, kind: str, response: dict) -> None:
        """Print one response line."""
        self._console.out(format_output(invoke_id, kind, response, self._response_format))

    def send(self, session_id: str, message: dict) -> None:
        """Write a message for an open session to the plugin."""
        try:
            self.runtime.send(session_id, message)
        except DaemonError as error:
            self._console.progress(f"cannot answer the plugin: {error.message}")

    async def start(self, source: str) -> None:
        """
        Check and unpack the plugin, build its venv, start it, and print
        ``plugin_ready`` on its first heartbeat.

        :raises CommandError: the plugin is refused, the venv cannot be built,
            or the plugin does not become ready.
        """
        self._console.progress(f"checking {source}")
        decoded = await self._in_thread(load_plugin, source, self._max_size)
        self.identifier = decoded.identifier.raw
        self.working_dir = tempfile.mkdtemp(prefix="plugin-run-")
        await self._in_thread(extract_package, decoded.files, self.working_dir)
        runner = decoded.declaration["meta"]["runner"]
        try:
            python = await self._builder.build(self.working_dir, runner.get("version"), self._console.progress)
        except DaemonError as error:
            raise CommandError(f"cannot build the plugin's venv: {error.message}") from None
        self._console.progress(f"starting {self.identifier}")
        self.runtime = LocalRuntime(
            self._reactor,
            self.identifier,
            decoded.identifier.plugin_id,
            self.working_dir,
            python,
            entrypoint=runner.get("entrypoint") or "main",
            env=self._environ,
            session_timeout=None,
            stop_grace_period=self._stop_grace_period,
            drain_timeout=0,
            on_failed=self._runtime_failed,
            parent_death=self._parent_death,
        )
        try:
            await self.runtime.start()
        except DaemonError as error:
            raise CommandError(error.message) from None
        self.emit("", "plugin_ready", {"plugin_unique_identifier": self.identifier, "message": "plugin is ready"})

    def request_line(self, line: str) -> None:
        """Handle one client request line (blank lines are skipped)."""
        if not line.strip():
            return
        try:
            invoke_id, data = parse_client_request(line)
        except ValueError as error:
            self.emit("", "error", {"error_type": "BadRequestError", "message": str(error)})
            return
        session_id = str(uuid.uuid4())
        try:
            self.runtime.open_session(session_id, session_request(session_id, data),
                                      _SessionPrinter(self, invoke_id, session_id))
        except DaemonError as error:
            self.emit(invoke_id, "error", {"error_type": error.error_type, "message": error.message})
            return
        self._open_sessions += 1

    def input_ended(self) -> None:
        """stdin reached EOF: finish once the open sessions are answered."""
        self._input_ended = True
        self._check_finished()

    def session_closed(self) -> None:
        """A session got its end or error."""
        self._open_sessions -= 1
        self._check_finished()

    def _check_finished(self) -> None:
        if self._input_ended and self._open_sessions <= 0 and not self.finished.called:
            self.finished.callback(None)

    def _runtime_failed(self, runtime, message: str) -> None:
        self._console.progress(message)
        if not self.finished.called:
            self.finished.errback(CommandError(message.splitlines()[0]))

    def stop(self) -> Deferred:
        """Stop the plugin (TERM, then KILL) and remove the temporary directory."""
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop())
        return self._stopping

    async def _stop(self) -> None:
        if self.runtime is not None and self.runtime.state not in ("created", "stopped"):
            await self.runtime.stop()
        if self.working_dir is not None:
            await self._in_thread(shutil.rmtree, self.working_dir, True)

    def _in_thread(self, function, *args) -> Deferred:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), function, *args)


def _read_lines(console: Console, reactor, run: PluginRun) -> None:
    # A daemon thread: a blocked readline must not keep the process alive.
    for line in iter(console.stdin.readline, ""):
        reactor.callFromThread(run.request_line, line)
    reactor.callFromThread(run.input_ended)


async def _serve(reactor, console: Console, run: PluginRun, source: str) -> None:
    await run.start(source)
    threading.Thread(target=_read_lines, args=(console, reactor, run), name="dify-run-stdin", daemon=True).start()
    await run.finished


def run_command(console: Console, source: str, response_format: str, enable_logs: bool) -> int:
    """
    The ``dify plugin run`` entry point: runs the global reactor until
    stdin ends and every request is answered, or Ctrl-C.

    :raises CommandError: the plugin could not be started.
    """
    if not os.path.exists(source):
        raise CommandError(f"no plugin directory or package at {source}")
    from twisted.internet import reactor
    from twisted.logger import formatEvent, globalLogPublisher

    environ = dict(os.environ)
    try:
        passthrough = passthrough_names(environ.get(PASSTHROUGH_VARIABLE))
    except ValueError as error:
        raise CommandError(f"{PASSTHROUGH_VARIABLE}: {error}") from None
    try:
        uv = find_uv(environ.get("UV_PATH") or None)
    except DaemonError as error:
        raise CommandError(error.message) from None
    parent_death = parent_death_signal()
    builder = PythonEnvironmentBuilder(
        reactor,
        uv,
        default_uv_cache_dir(environ),
        pip_mirror_url=environ.get("PIP_MIRROR_URL") or None,
        pip_extra_args=environ.get("PIP_EXTRA_ARGS") or None,
        python_interpreter_path=environ.get("PYTHON_INTERPRETER_PATH") or None,
        environ=environ,
        passthrough=passthrough,
        parent_death=parent_death,
    )
    run = PluginRun(
        reactor, console, builder, plugin_environment(environ, passthrough=passthrough), response_format,
        parent_death=parent_death,
    )

    def show_log(event) -> None:
        namespace = event.get("log_namespace", "")
        if namespace.startswith("difydaemon.runtimes"):
            run.emit("", "info", {"message": formatEvent(event)})

    if enable_logs:
        globalLogPublisher.addObserver(show_log)
    outcome: dict = {}

    def finish(result):
        outcome["result"] = result
        if reactor.running:
            reactor.stop()

    def begin() -> None:
        Deferred.fromCoroutine(_serve(reactor, console, run, source)).addBoth(finish)

    # Ctrl-C stops the reactor; this trigger stops the plugin and cleans up first.
    reactor.addSystemEventTrigger("before", "shutdown", run.stop)
    reactor.callWhenRunning(begin)
    try:
        reactor.run()
    finally:
        if enable_logs:
            globalLogPublisher.removeObserver(show_log)
    result = outcome.get("result")
    if result is None:
        return 0 if "result" in outcome else 130
    error = result.value
    if isinstance(error, CommandError):
        raise error
    if isinstance(error, DaemonError):
        raise CommandError(error.message)
    raise CommandError(f"plugin run failed: {error!r}")
