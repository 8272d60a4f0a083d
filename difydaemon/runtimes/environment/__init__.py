"""
The Python environment of a plugin (``runtimes.md`` §1.2–§1.3).

A plugin's working directory gets a ``.venv`` built with uv: ``uv venv``, then
``uv pip install -r requirements.txt`` or ``uv sync``, then byte-compilation,
then the marker ``.venv/dify/plugin.json`` that says the venv is complete.
The local runtime and the SRI connector (:mod:`difydaemon.sri`) build venvs
through the same :class:`PythonEnvironmentBuilder`.

- :mod:`.layout`: where things live and the pure decisions about them;
- :mod:`.steps`: the build's child processes, their command lines, running one;
- :mod:`.bytecode`: the cache of installed distributions' ``.pyc`` files;
- :mod:`.import_order`: what the background compilation of a fresh venv takes first;
- :mod:`.interpreters`: finding uv and a Python interpreter;
- :mod:`.builder`: the builder, with its prepared venvs.

Callers import from this package; the modules are how it is kept readable.
"""

from difydaemon.runtimes.environment.builder import BackgroundBuildsService, PythonEnvironmentBuilder, configured_builder
from difydaemon.runtimes.environment.bytecode import (
    BYTECODE_DIR,
    BYTECODE_FORMAT,
    DEFAULT_BYTECODE_ENTRIES,
    STALE_STAGING_SECONDS,
    UNLISTED_LABEL,
    BytecodeCache,
    BytecodeLinks,
    SourceGroup,
    bytecode_salt,
    group_key,
    pyc_index,
    pyc_matches_source,
    record_sources,
)
from difydaemon.runtimes.environment.interpreters import find_interpreter, find_uv, interpreter_candidates
from difydaemon.runtimes.environment.layout import (
    DEFAULT_RUNNER_VERSION,
    MARKER_PATH,
    PYPROJECT_TOML,
    REQUIREMENTS_TXT,
    UV_LOCK,
    VENV_DIR,
    VENV_PYTHON,
    choose_dependency_file,
    marker_content,
    runner_version,
    venv_is_valid,
    working_dir_for,
)
from difydaemon.runtimes.environment.steps import (
    SEQUENTIAL_COMPILE_LIMIT,
    TAIL_BYTES,
    OutputTail,
    StepCommand,
    StepOutcome,
    compile_commands,
    failure_message,
    install_command,
    install_environment,
    plugin_compile_command,
    run_step,
    site_packages_compile_command,
    split_extra_args,
    venv_command,
)

__all__ = [
    "BYTECODE_DIR",
    "BYTECODE_FORMAT",
    "DEFAULT_BYTECODE_ENTRIES",
    "DEFAULT_RUNNER_VERSION",
    "MARKER_PATH",
    "PYPROJECT_TOML",
    "REQUIREMENTS_TXT",
    "SEQUENTIAL_COMPILE_LIMIT",
    "STALE_STAGING_SECONDS",
    "TAIL_BYTES",
    "UNLISTED_LABEL",
    "UV_LOCK",
    "VENV_DIR",
    "VENV_PYTHON",
    "BytecodeCache",
    "BytecodeLinks",
    "OutputTail",
    "PythonEnvironmentBuilder",
    "SourceGroup",
    "StepCommand",
    "StepOutcome",
    "bytecode_salt",
    "choose_dependency_file",
    "compile_commands",
    "configured_builder",
    "BackgroundBuildsService",
    "failure_message",
    "find_interpreter",
    "find_uv",
    "group_key",
    "install_command",
    "install_environment",
    "interpreter_candidates",
    "marker_content",
    "plugin_compile_command",
    "pyc_index",
    "pyc_matches_source",
    "record_sources",
    "run_step",
    "runner_version",
    "site_packages_compile_command",
    "split_extra_args",
    "venv_command",
    "venv_is_valid",
    "working_dir_for",
]
