"""
What the connector remembers of its functions across restarts: one JSON
file, ``SRI_WORKING_PATH/functions.json``, listing each deployed package's
function (file name, name, id, port, command line, directory).

The daemon stores each function's URL when it installs a package and never
asks again, so a connector that came back without its functions would
leave every installed plugin failing until it is reinstalled.  At start the
connector starts them again, on the same ports.

:func:`encode_records` and :func:`decode_records` are pure; the file is
written whole through a temporary name (:func:`save_records`, blocking).
"""

from __future__ import annotations

import json
import os
import secrets

from attrs import frozen

STATE_FILE = "functions.json"
FORMAT = 1


@frozen
class FunctionRecord:
    """
    One deployed function, as remembered.

    :ivar filename: the package file name (the key ``instances`` uses).
    :ivar name: the function's name.
    :ivar function_id: its ``ID``.
    :ivar port: its port (kept, so its URL stays the same).
    :ivar argv: its command line.
    :ivar path: its working directory.
    """

    filename: str
    name: str
    function_id: str
    port: int
    argv: tuple[str, ...]
    path: str


def encode_records(records) -> bytes:
    """The file's content for ``records``."""
    return json.dumps(
        {
            "format": FORMAT,
            "functions": [
                {
                    "filename": record.filename,
                    "name": record.name,
                    "id": record.function_id,
                    "port": record.port,
                    "argv": list(record.argv),
                    "path": record.path,
                }
                for record in records
            ],
        },
        indent=1,
    ).encode("utf-8")


def decode_records(data: bytes) -> list[FunctionRecord]:
    """
    The records of a file's content; entries that are not well-formed are
    left out (a hand-edited or truncated file costs those functions, not the start).

    :raises ValueError: when the content is not such a file at all.
    """
    document = json.loads(data)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError("not a dify-sri functions file of format 1")
    records = []
    for entry in document.get("functions") or ():
        try:
            record = FunctionRecord(
                filename=_text(entry["filename"]),
                name=_text(entry["name"]),
                function_id=_text(entry["id"]),
                port=int(entry["port"]),
                argv=tuple(_text(part) for part in entry["argv"]),
                path=_text(entry["path"]),
            )
        except (KeyError, TypeError, ValueError):
            continue
        if 0 < record.port < 65536 and record.argv:
            records.append(record)
    return records


def _text(value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("not a non-empty string")
    return value


def load_records(working_path: str) -> list[FunctionRecord]:
    """The remembered functions (blocking); none when there is no file or it cannot be read."""
    try:
        with open(os.path.join(working_path, STATE_FILE), "rb") as f:
            return decode_records(f.read())
    except (OSError, ValueError):
        return []


def save_records(working_path: str, records) -> None:
    """Replace the file with ``records`` (blocking), whole or not at all."""
    os.makedirs(working_path, exist_ok=True)
    target = os.path.join(working_path, STATE_FILE)
    temporary = f"{target}.{secrets.token_hex(4)}.tmp"
    try:
        with open(temporary, "wb") as f:
            f.write(encode_records(records))
        os.replace(temporary, target)
    finally:
        if os.path.lexists(temporary):
            os.unlink(temporary)
