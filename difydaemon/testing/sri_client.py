"""
Helpers for talking to an SRI connector as the daemon does, in tests and
benchmarks: the launch form, the launch stream read back, and a direct
``/invoke`` of a function.
"""

from __future__ import annotations

import io
import json

from difydaemon.packaging.archive import read_package
from difydaemon.packaging.checksum import package_checksum

BOUNDARY = "sri-test-boundary-5c1e"


def package_filename(package: bytes, author: str = "acme", name: str = "echo", version: str = "0.0.1") -> str:
    """The file name the daemon gives ``package``: ``<author>@<name>@<version>@<checksum>.difypkg``."""
    checksum = package_checksum(read_package(package, len(package) * 64 + 10**6))
    return f"{author}@{name}@{version}@{checksum}.difypkg"


def launch_form(package: bytes, filename: str, verified: bool = False) -> tuple[str, bytes]:
    """
    ``(content type, body)`` of a launch: the ``context`` file first, then
    ``verified`` and ``metadata``, as the daemon sends them (no metadata
    when ``filename`` is not of the daemon's form).
    """
    parts = filename.split("@")
    fields = [("verified", "true" if verified else "false")]
    if len(parts) == 4:
        author, name, version, rest = parts
        identifier = f"{author}/{name}:{version}@{rest[: -len('.difypkg')]}"
        fields.append(("metadata", json.dumps({"plugin_unique_identifier": identifier})))
    out = io.BytesIO()
    out.write(
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="context"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
    )
    out.write(package)
    out.write(b"\r\n")
    for field, value in fields:
        out.write(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode())
    out.write(f"--{BOUNDARY}--\r\n".encode())
    return f"multipart/form-data; boundary={BOUNDARY}", out.getvalue()


def launch_events(body: bytes) -> list[dict]:
    """The JSON objects of a launch stream, read as the daemon reads it (``data:`` cut, ``event:`` lines skipped)."""
    events = []
    for line in body.split(b"\n"):
        line = line.strip()
        if line.startswith(b"data:"):
            line = line[len(b"data:"):].strip()
        if not line or line.startswith(b"event:"):
            continue
        events.append(json.loads(line))
    return events


def announced(events: list[dict]) -> dict[str, str]:
    """The ``endpoint``, ``name`` and ``id`` of a launch stream's run/success event (empty if none)."""
    for event in events:
        if event["Stage"] == "run" and event["State"] == "success":
            return dict(piece.split("=", 1) for piece in event["Message"].split(","))
    return {}


def tool_invoke(session_id: str, text: str, tool: str = "echo", provider: str = "echo") -> bytes:
    """The JSON body of a direct ``/invoke`` of an echo-like tool."""
    return json.dumps(
        {
            "event": "request",
            "session_id": session_id,
            "conversation_id": None,
            "message_id": None,
            "app_id": None,
            "endpoint_id": None,
            "context": None,
            "data": {
                "user_id": "u1",
                "type": "tool",
                "action": "invoke_tool",
                "provider": provider,
                "tool": tool,
                "tool_parameters": {"text": text},
                "credentials": {},
            },
        }
    ).encode("utf-8")


def invoke_events(body: bytes) -> list[dict]:
    """The stream messages of an ``/invoke`` response: JSON objects separated by blank lines."""
    return [json.loads(block) for block in body.split(b"\n\n") if block.strip()]
