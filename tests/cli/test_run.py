"""
Tests for ``dify plugin run``: its pure parts, and the real command in a
subprocess driving a scaffolded plugin on the real SDK.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

from difydaemon.cli.run import (
    backwards_answers,
    default_uv_cache_dir,
    format_output,
    parse_client_request,
    session_request,
)
from difydaemon.testing import sdk
from difydaemon.testing.cases import AsyncTestCase, SynchronousTestCase
from difydaemon.testing.subreaper import children_of, is_running, parent_pid, subreaper_argv
from tests.cli.helpers import REPOSITORY, dify, write
from tests.cli.test_commands import OneLineErrorMixin

TOOL_WITH_STORAGE = '''\
from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


class EchoerTool(Tool):
    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        query = str(tool_parameters.get("query", ""))
        if query == "store":
            self.session.storage.set("key", b"value")
        yield self.create_text_message(query)
        yield self.create_json_message({"query": query, "length": len(query)})
'''


TOOL_WITH_ENVIRON = '''\
import os
from collections.abc import Generator
from typing import Any

from dify_plugin import Tool
from dify_plugin.entities.tool import ToolInvokeMessage


class EchoerTool(Tool):
    def _invoke(self, tool_parameters: dict[str, Any]) -> Generator[ToolInvokeMessage, None, None]:
        yield self.create_json_message({"pid": os.getpid(), "environ": dict(os.environ)})
'''

#: Secrets in the environment of ``dify plugin run`` that its plugin must not see.
SECRETS = {"DB_PASSWORD": "db-password-value", "OPENAI_API_KEY": "openai-key-value", "FOO_SECRET": "foo-value"}

#: Seconds a process gets to end; the kernel needs far less.
GRACE = 10.0

ENVIRON_REQUEST = json.dumps({
    "invoke_id": "env", "type": "tool", "action": "invoke_tool",
    "request": {"provider": "echoer", "tool": "echoer", "credentials": {}, "tool_parameters": {}},
}) + "\n"


class ClientRequestTests(SynchronousTestCase):
    """Parsing client request lines."""

    def test_flattened(self):
        """The request body is flattened with type, action and a user id."""
        invoke_id, data = parse_client_request(
            '{"invoke_id":"i1","type":"tool","action":"invoke_tool","request":{"provider":"p","tool":"t"}}'
        )
        self.assertEqual(invoke_id, "i1")
        self.assertEqual(data, {"provider": "p", "tool": "t", "type": "tool", "action": "invoke_tool",
                                "user_id": "plugin-run-user"})

    def test_user_id_kept(self):
        """A user_id in the request body is kept."""
        _, data = parse_client_request('{"invoke_id":"i","type":"tool","action":"a","request":{"user_id":"u9"}}')
        self.assertEqual(data["user_id"], "u9")

    def test_invoke_id_generated(self):
        """A request without invoke_id gets one."""
        invoke_id, _ = parse_client_request('{"type":"tool","action":"invoke_tool"}')
        self.assertEqual(len(invoke_id), 32)

    def test_refused(self):
        """Bad lines are refused with a message saying why."""
        for line, fragment in (("nope", "not JSON"), ("[1]", "object"), ('{"type":"tool"}', "action"),
                               ('{"type":"tool","action":"a","request":[]}', "request"),
                               ('{"invoke_id":3,"type":"tool","action":"a"}', "invoke_id")):
            with self.assertRaises(ValueError) as raised:
                parse_client_request(line)
            self.assertIn(fragment, str(raised.exception))


class WireShapeTests(SynchronousTestCase):
    """What goes to the plugin and what comes out of the command."""

    def test_session_request(self):
        """A session request has the daemon's eight keys in order."""
        message = session_request("s", {"a": 1})
        self.assertEqual(list(message), ["session_id", "conversation_id", "message_id", "app_id", "endpoint_id",
                                         "context", "event", "data"])
        self.assertEqual((message["event"], message["data"]), ("request", {"a": 1}))

    def test_backwards_refusal(self):
        """A backwards invocation is answered with error, then end."""
        error, end = backwards_answers("s", "b1", "no")
        self.assertEqual(error["event"], "backwards_response")
        self.assertEqual(error["data"], {"backwards_request_id": "b1", "event": "error", "message": "no", "data": None})
        self.assertEqual(end["data"]["event"], "end")

    def test_json_output(self):
        """JSON mode wraps the response with invoke_id and type."""
        line = format_output("i", "plugin_response", {"type": "text"}, "json")
        self.assertEqual(json.loads(line), {"invoke_id": "i", "type": "plugin_response", "response": {"type": "text"}})

    def test_text_output(self):
        """Text mode starts with [type]."""
        self.assertEqual(format_output("i", "plugin_invoke_end", {}, "text"), "[plugin_invoke_end] i {}")

    def test_uv_cache(self):
        """UV_CACHE_DIR wins; otherwise the cache is ~/.cache/dify/uv."""
        self.assertEqual(default_uv_cache_dir({"UV_CACHE_DIR": "/c"}), "/c")
        self.assertTrue(default_uv_cache_dir({}).endswith(os.path.join(".cache", "dify", "uv")))


class RunErrorTests(OneLineErrorMixin, SynchronousTestCase):
    """Errors of dify plugin run that come before any process starts."""

    def test_missing_source(self):
        """A path that does not exist is one error line."""
        self.assertOneLineError(dify("plugin", "run", os.path.join(self.mktemp(), "nope")), "no plugin")

    def test_bad_passthrough(self):
        """A PLUGIN_ENV_PASSTHROUGH that is not a list of names is one error line naming it."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        result = console_script("plugin", "run", directory, extra_env={"PLUGIN_ENV_PASSTHROUGH": "OK,AWS_*"})
        self.assertEqual(result.returncode, 1)
        self.assertEqual(
            result.stderr.decode().splitlines(),
            ["dify: error: PLUGIN_ENV_PASSTHROUGH: 'AWS_*' is not a variable name (list exact names, separated by commas)"],
        )


def console_script(*argv: str, stdin: str = "", extra_env: dict | None = None, timeout: float = 600):
    """Run ``python -m difydaemon.cli.main`` as the console script runs, in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (REPOSITORY, env.get("PYTHONPATH"))))
    env.update(extra_env or {})
    # Blocking is fine here: the test does nothing else meanwhile.
    return subprocess.run(
        [sys.executable, "-m", "difydaemon.cli.main", *argv],
        input=stdin.encode("utf-8"), capture_output=True, env=env, timeout=timeout, check=False,
    )


class ConsoleScriptTests(SynchronousTestCase):
    """The real console script in a subprocess."""

    def test_version(self):
        """python -m difydaemon.cli.main version prints the version and exits 0."""
        result = console_script("version")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout.decode().strip(), r"^\d+\.\d+\.\d+")

    def test_error_exit(self):
        """A user error in the real script is one stderr line and exit 1, no traceback."""
        result = console_script("plugin", "checksum", os.path.join(os.path.abspath(self.mktemp()), "none"))
        self.assertEqual(result.returncode, 1)
        self.assertEqual(len(result.stderr.decode().splitlines()), 1)

    def test_run_scaffolded_tool(self):
        """plugin run answers invoke_tool on the scaffolded plugin, refuses backwards calls, and cleans up."""
        python312 = sdk.python312()
        parent = os.path.abspath(self.mktemp())
        os.makedirs(parent)
        created = dify("plugin", "init", "--quick", "--author", "acme", "--name", "echoer", "--allow-storage",
                       "-o", parent)
        self.assertEqual(created.status, 0, created.stderr)
        directory = os.path.join(parent, "echoer")
        write(os.path.join(directory, "tools", "echoer.py"), TOOL_WITH_STORAGE)
        tool_request = {"provider": "echoer", "tool": "echoer", "credentials": {}, "credential_type": "api-key"}
        lines = [
            {"invoke_id": "one", "type": "tool", "action": "invoke_tool",
             "request": {**tool_request, "tool_parameters": {"query": "hi"}}},
            {"invoke_id": "two", "type": "tool", "action": "invoke_tool",
             "request": {**tool_request, "tool_parameters": {"query": "store"}}},
        ]
        stdin = "".join(json.dumps(line) + "\n" for line in lines) + "not json\n"
        temp = os.path.abspath(self.mktemp())
        os.makedirs(temp)
        result = console_script(
            "plugin", "run", directory, stdin=stdin,
            extra_env={"UV_CACHE_DIR": sdk.test_uv_cache_dir(), "PYTHON_INTERPRETER_PATH": python312,
                       "TMPDIR": temp},
        )
        stderr = result.stderr.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, stderr)
        outputs = [json.loads(line) for line in result.stdout.decode().splitlines()]
        self.assertEqual(outputs[0]["type"], "plugin_ready")
        self.assertTrue(outputs[0]["response"]["plugin_unique_identifier"].startswith("acme/echoer:0.0.1@"))
        by_id: dict = {}
        for output in outputs[1:]:
            by_id.setdefault(output["invoke_id"], []).append(output)
        one = by_id["one"]
        self.assertEqual([o["type"] for o in one], ["plugin_response", "plugin_response", "plugin_invoke_end"])
        self.assertEqual(one[0]["response"]["message"], {"text": "hi"})
        self.assertEqual(one[1]["response"]["message"]["json_object"], {"query": "hi", "length": 2})
        two = by_id["two"]
        self.assertEqual([o["type"] for o in two], ["info", "error", "plugin_invoke_end"])
        self.assertIn("backwards invocation is not available", two[1]["response"]["message"])
        [bad] = by_id[""]
        self.assertEqual(bad["type"], "error")
        self.assertIn("creating venv", stderr)
        self.assertEqual(os.listdir(temp), [], "the plugin-run-* directory must be removed")


def environ_plugin(test) -> str:
    """A scaffolded tool plugin whose tool answers its pid and whole environment."""
    parent = os.path.abspath(test.mktemp())
    os.makedirs(parent)
    created = dify("plugin", "init", "--quick", "--author", "acme", "--name", "echoer", "-o", parent)
    test.assertEqual(created.status, 0, created.stderr)
    directory = os.path.join(parent, "echoer")
    write(os.path.join(directory, "tools", "echoer.py"), TOOL_WITH_ENVIRON)
    return directory


def run_environment(test) -> dict:
    """The variables ``dify plugin run`` needs here, with a private TMPDIR."""
    temp = os.path.abspath(test.mktemp())
    os.makedirs(temp)
    return {"UV_CACHE_DIR": sdk.test_uv_cache_dir(), "PYTHON_INTERPRETER_PATH": sdk.python312(), "TMPDIR": temp}


class RunIsolationTests(SynchronousTestCase):
    """What a plugin under ``dify plugin run`` inherits, and that it dies with the command."""

    def test_plugin_environment(self):
        """The plugin sees PATH, HOME and the listed variable, none of the caller's secrets nor PYTHONPATH."""
        directory = environ_plugin(self)
        extra = {**run_environment(self), **SECRETS, "PLUGIN_ENV_PASSTHROUGH": "ACME_SETTING", "ACME_SETTING": "on"}
        result = console_script("plugin", "run", directory, stdin=ENVIRON_REQUEST, extra_env=extra)
        self.assertEqual(result.returncode, 0, result.stderr.decode("utf-8", "replace"))
        [dump] = [json.loads(line)["response"]["message"]["json_object"] for line in result.stdout.decode().splitlines()
                  if json.loads(line)["type"] == "plugin_response"]
        environ = dump["environ"]
        self.assertEqual([name for name in [*SECRETS, "PYTHONPATH", "UV_CACHE_DIR"] if name in environ], [])
        self.assertEqual(
            (environ.get("PATH"), environ.get("HOME"), environ.get("ACME_SETTING"), environ.get("INSTALL_METHOD")),
            (os.environ.get("PATH"), os.environ.get("HOME"), "on", "local"),
        )

    def test_plugin_dies_with_command(self):
        """SIGKILL of dify plugin run ends its plugin, and nothing is left (under a subreaper)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = REPOSITORY
        env.update(run_environment(self))
        command = [sys.executable, "-m", "difydaemon.cli.main", "plugin", "run", environ_plugin(self)]
        # unbuffered, so that select() sees every line not yet read
        reaper = subprocess.Popen(subreaper_argv(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, env=env, bufsize=0)
        self.addCleanup(self.end_tree, reaper)
        self.watched = []
        reaper.stdin.write(ENVIRON_REQUEST.encode())
        reaper.stdin.flush()
        answer = None
        while answer is None:
            line = read_line(reaper.stdout, 120)
            self.assertTrue(line, "dify plugin run ended or said nothing")
            output = json.loads(line)
            if output["type"] == "plugin_response":
                answer = output["response"]["message"]["json_object"]
        [cli] = children_of(reaper.pid)
        plugin = answer["pid"]
        self.watched += [cli, plugin]
        self.assertEqual(parent_pid(plugin), cli)
        os.kill(cli, signal.SIGKILL)
        deadline = time.monotonic() + GRACE
        while is_running(plugin) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(is_running(plugin), f"plugin {plugin} outlived dify plugin run")
        self.assertEqual(reaper.wait(timeout=GRACE), 0)

    def end_tree(self, reaper) -> None:
        for pid in self.watched:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
        reaper.stdin.close()
        reaper.wait(timeout=GRACE)
        reaper.stdout.close()


def read_line(stream, timeout: float) -> bytes:
    """One line of ``stream``, or b"" at its end or after ``timeout`` seconds without one."""
    if not select.select([stream], [], [], timeout)[0]:
        return b""
    return stream.readline()


class ScaffoldsOnSdkTests(AsyncTestCase):
    """Every category's scaffold loads in the real SDK."""

    timeout = 900

    async def test_every_category_starts(self):
        """Each scaffold, run by the SDK in local mode, reaches its first heartbeat."""
        from twisted.internet import reactor

        from difydaemon.cli.scaffold import CATEGORIES

        parent = os.path.abspath(self.mktemp())
        os.makedirs(parent)
        for category in CATEGORIES:
            outcome = dify("plugin", "init", "--quick", "--author", "acme", "--name", f"p-{category}",
                           "--category", category, "-o", parent)
            self.assertEqual(outcome.status, 0, outcome.stderr)
        # One venv serves them all: they share the requirements.
        venv_home = os.path.join(parent, "venv-home")
        os.makedirs(venv_home)
        write(os.path.join(venv_home, "requirements.txt"), "dify_plugin>=0.10.0,<0.11.0\n")
        python = await sdk.environment_builder(reactor).build(venv_home, "3.12", lambda line: None)
        for category in CATEGORIES:
            try:
                seconds = await sdk.seconds_to_first_heartbeat(reactor, python, os.path.join(parent, f"p-{category}"))
            except RuntimeError as error:
                self.fail(f"{category}: {error}")
            self.assertGreater(seconds, 0)
