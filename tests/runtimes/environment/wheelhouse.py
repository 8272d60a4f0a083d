"""
Wheels made from an installed venv, for offline-install tests: the tests may
not reach an index, so the SDK's wheels are rebuilt from a venv uv already
installed from its cache.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile

# What an installer adds to dist-info; not part of a wheel.
_INSTALLER_FILES = {"INSTALLER", "REQUESTED", "direct_url.json", "RECORD"}


def _record_line(name: str, content: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(content)}"


def wheels_from_site_packages(site_packages: str, destination: str) -> list[str]:
    """
    One wheel per ``*.dist-info`` of ``site_packages`` in ``destination``,
    with the files its RECORD lists inside site-packages (no scripts, no
    bytecode) and the first tag of its WHEEL file.

    :return: the wheels' paths.
    """
    os.makedirs(destination, exist_ok=True)
    made = []
    for info in sorted(name for name in os.listdir(site_packages) if name.endswith(".dist-info")):
        info_dir = os.path.join(site_packages, info)
        with open(os.path.join(info_dir, "WHEEL")) as f:
            tag = next(line.split(":", 1)[1].strip() for line in f if line.startswith("Tag:"))
        with open(os.path.join(info_dir, "RECORD")) as f:
            listed = [line.rsplit(",", 2)[0] for line in f.read().splitlines() if line.strip()]
        names = [
            name for name in listed
            if not name.startswith("..") and "__pycache__" not in name and not name.endswith(".pyc")
            and not (name.startswith(info + "/") and name.split("/", 1)[1] in _INSTALLER_FILES)
        ]
        path = os.path.join(destination, f"{info[: -len('.dist-info')]}-{tag}.whl")
        record = []
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name in names:
                with open(os.path.join(site_packages, name), "rb") as f:
                    content = f.read()
                archive.writestr(name, content)
                record.append(_record_line(name, content))
            record.append(f"{info}/RECORD,,")
            archive.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
        made.append(path)
    return made
