"""
Keeping plugins away from the daemon's secrets and from each other's host.

A plugin is third-party code running on the daemon's machine.  Besides the
allow-listed environment (:mod:`difydaemon.runtimes.child_environment`) and
the launcher (:mod:`difydaemon.runtimes.parent_death`), the daemon:

- makes itself non-dumpable at start (:func:`hide_process_memory`): a
  process of the same user (a plugin) can then no longer read
  ``/proc/<daemon pid>/environ`` or ``/proc/<daemon pid>/mem``, where
  ``DB_PASSWORD``, ``SERVER_KEY`` and ``DIFY_INNER_API_KEY`` are (root
  still can);
- gives plugins and their builds a ``HOME`` of their own,
  ``$PLUGIN_WORKING_PATH/.plugin-home`` (0700), instead of the operator's,
  where ``.pgpass``, ``.env`` files and cloud credentials live;
- with ``PLUGIN_RUN_AS_USER``, hands the directories plugins and their
  builds write to over to that user (:func:`give_to`);
- warns when the ``.env`` file, which holds those secrets, is readable by
  group or others (:func:`warn_if_exposed`).

Everything that touches the file system is blocking and small; the
directory preparations run in the launch's thread pool.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Mapping

from twisted.logger import Logger

log = Logger()

#: The plugins' ``HOME``, under ``PLUGIN_WORKING_PATH``.
PLUGIN_HOME_DIR = ".plugin-home"

#: ``prctl`` option numbers (``linux/prctl.h``).
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def plugin_home(working_path: str) -> str:
    """The ``HOME`` of plugins and their builds: ``<working path>/.plugin-home``."""
    return os.path.join(os.path.abspath(working_path), PLUGIN_HOME_DIR)


def with_plugin_home(environ: Mapping[str, str], home: str) -> dict[str, str]:
    """
    ``environ`` with ``HOME`` replaced by the plugins' ``home``, for the
    environments children are made from.  ``PYENV_ROOT`` is pinned to
    where the daemon's own ``HOME`` has it first: the builder looks for
    Python interpreters there, and the new ``HOME`` has none.
    """
    result = dict(environ)
    daemon_home = environ.get("HOME") or os.path.expanduser("~")
    result.setdefault("PYENV_ROOT", os.path.join(daemon_home, ".pyenv"))
    result["HOME"] = home
    return result


def prepare_private_directory(path: str, run_as=None) -> None:
    """
    Create ``path`` (and its parents) if missing and make it 0700, owned by
    ``run_as`` (a :class:`~difydaemon.runtimes.parent_death.RunAs`) when
    given.  Blocking.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    if run_as is not None:
        os.chown(path, run_as.uid, run_as.gid)


def give_to(path: str, run_as, recursive: bool = True) -> None:
    """
    Make ``path`` (and, when ``recursive``, everything below it) belong to
    ``run_as``, so that a plugin running as that user can read its package
    and write its venv.  Symbolic links are changed themselves, never what
    they point at (a package may hold a link to ``/etc``).  Blocking.
    """
    if run_as is None:
        return
    os.chown(path, run_as.uid, run_as.gid, follow_symlinks=False)
    if not recursive:
        return
    for root, directories, files in os.walk(path):
        for name in directories + files:
            os.chown(os.path.join(root, name), run_as.uid, run_as.gid, follow_symlinks=False)


def hide_process_memory(platform: str = sys.platform, prctl=None) -> bool:
    """
    ``prctl(PR_SET_DUMPABLE, 0)``: the daemon's ``/proc/<pid>/environ``,
    ``mem``, ``maps``... become readable by root only, and no core dump is
    written.  True when set; False (and logged) where it cannot be.

    :param prctl: the C ``prctl`` (tests pass a fake).
    """
    if not platform.startswith("linux"):
        log.info(
            "cannot hide the daemon's memory from plugins on {platform}: run plugins as another user",
            platform=platform,
        )
        return False
    try:
        if prctl is None:
            import ctypes

            prctl = ctypes.CDLL(None, use_errno=True).prctl
        result = prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError) as exc:
        result, reason = -1, str(exc)
    else:
        reason = "prctl refused"
    if result != 0:
        log.warn(
            "cannot make the daemon non-dumpable ({reason}): plugins of the same user may read its environment",
            reason=reason,
        )
        return False
    return True


def exposed_mode(path: str) -> int | None:
    """The permission bits of ``path`` when group or others may read it; None otherwise or when it is missing."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    return mode if mode & 0o044 else None


def warn_if_exposed(path: str) -> bool:
    """Log a warning, naming the file and its mode, when ``path`` (the ``.env`` file) is readable by group or others."""
    mode = exposed_mode(path)
    if mode is None:
        return False
    log.warn(
        "{path} is readable by {who} (mode {mode}): it holds the daemon's secrets; chmod 600 it",
        path=os.path.abspath(path),
        who="group and others" if mode & 0o044 == 0o044 else ("others" if mode & 0o004 else "its group"),
        mode=f"{mode:04o}",
    )
    return True


def run_as_user(text: str, geteuid=os.geteuid, resolve=None):
    """
    The :class:`~difydaemon.runtimes.parent_death.RunAs` of
    ``PLUGIN_RUN_AS_USER``, or None when children keep the daemon's user
    (unset, or naming the daemon's own non-root user).

    :raises difydaemon.errors.ConfigError: when the user does not exist, or
        the daemon is not root and so cannot switch to it.
    """
    from difydaemon.errors import ConfigError
    from difydaemon.runtimes.parent_death import resolve_user

    if not text:
        return None
    try:
        run_as = (resolve or resolve_user)(text)
    except ValueError as exc:
        raise ConfigError("PLUGIN_RUN_AS_USER", f"{exc}: create it, or leave PLUGIN_RUN_AS_USER empty")
    euid = geteuid()
    if euid != 0:
        if run_as.uid == euid:
            return None
        raise ConfigError(
            "PLUGIN_RUN_AS_USER",
            f"only a daemon running as root can run plugins as {run_as.name!r} (this one runs as uid {euid})",
        )
    return run_as
