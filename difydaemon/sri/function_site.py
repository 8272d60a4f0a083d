"""
A ``sitecustomize`` module put on every function's ``PYTHONPATH``: it gives
the connections the SDK's gevent server accepts ``TCP_NODELAY``.

The SDK (``INSTALL_METHOD=serverless``) writes each response in several
small chunks (every message, then its ``\\n\\n``).  Without ``TCP_NODELAY``
Nagle's algorithm holds each chunk until the previous one is acknowledged,
and a client on a reused (keep-alive) connection delays its ACKs by up to
40 ms: ``bench/sri_launch.py`` measured an echo ``/invoke`` at 44 ms p50 on
a keep-alive connection against 1.5 ms on a fresh one.  The daemon's
sockets already run with ``TCP_NODELAY`` for the same reason.

The hook only acts when ``gevent.pywsgi`` is imported (it patches
``WSGIServer.handle`` then); it changes nothing else, and a function
served by Flask's own server instead is left as it is.
"""

from __future__ import annotations

import os
import secrets

#: the directory under ``SRI_WORKING_PATH`` that holds the module
FUNCTION_SITE_DIR = ".function-site"

SITECUSTOMIZE = '''\
"""Written by dify-sri: connections a function accepts get TCP_NODELAY (see difydaemon/sri/function_site.py)."""
import sys


def _with_no_delay(module):
    server = module.WSGIServer
    handle = server.handle

    def handle_with_no_delay(self, sock, address):
        try:
            import socket

            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except Exception:
            pass
        return handle(self, sock, address)

    server.handle = handle_with_no_delay


class _PatchOnImport:
    def find_spec(self, name, path=None, target=None):
        if name != "gevent.pywsgi":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _with_no_delay(module)

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _PatchOnImport())
'''


def install_function_site(working_path: str) -> str:
    """
    Write the ``sitecustomize`` module under ``working_path`` (blocking),
    replacing any older one whole; return its directory.
    """
    directory = os.path.join(working_path, FUNCTION_SITE_DIR)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, "sitecustomize.py")
    temporary = f"{target}.{secrets.token_hex(4)}.tmp"
    with open(temporary, "w") as f:
        f.write(SITECUSTOMIZE)
    os.replace(temporary, target)
    return directory
