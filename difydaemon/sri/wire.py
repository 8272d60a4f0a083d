"""
The SRI wire formats our connector speaks (``serverless.md`` §2, §9.1),
as pure functions and frozen values: no I/O.

- the launch stream: one ``data: {"Stage","State","Obj","Message"}`` line
  (and a blank line) per event, ending with ``end``/``success``, or with a
  ``failed`` event whose ``Message`` says why;
- the ``instances`` answer: ``{"error": "", "Items": [...]}``;
- the launch form: the ``context`` package file, ``verified`` and
  ``metadata`` (``{"plugin_unique_identifier": ...}``);
- package file names: ``<author>@<name>@<version>@<checksum>.difypkg``.
"""

from __future__ import annotations

import json

from attrs import frozen

from difydaemon.errors import UniqueIdentifierError
from difydaemon.packaging.identifier import PluginIdentifier, compose_identifier

#: The ping answer: a JSON string, quotes included (the daemon decodes it).
PONG = b'"pong"'

PACKAGE_SUFFIX = ".difypkg"

STAGE_HEALTHZ = "healthz"
STAGE_START = "start"
STAGE_BUILD = "build"
STAGE_RUN = "run"
STAGE_END = "end"

STATE_RUNNING = "running"
STATE_SUCCESS = "success"
STATE_FAILED = "failed"


class LaunchRefused(ValueError):
    """A launch request that cannot be served; the message says why."""


@frozen
class LaunchEvent:
    """
    One line of the launch stream.

    :ivar stage: ``start``, ``build``, ``run``, ``end`` (or ``healthz``).
    :ivar state: ``running``, ``success`` or ``failed``.
    :ivar message: free text; for ``run``/``success`` the function's
        ``endpoint=...,name=...,id=...``.
    """

    stage: str
    state: str
    message: str = ""
    obj: str = ""

    def encode(self) -> bytes:
        """The bytes of this event on the stream: ``data: <json>`` and a blank line."""
        body = {"Stage": self.stage, "State": self.state, "Obj": self.obj, "Message": self.message}
        return b"data: " + json.dumps(body, separators=(",", ":")).encode("utf-8") + b"\n\n"


def building(message: str) -> LaunchEvent:
    """A progress line of the build."""
    return LaunchEvent(STAGE_BUILD, STATE_RUNNING, message)


def starting(message: str) -> LaunchEvent:
    """A progress line of starting the function (the daemon reports "Launching plugin...")."""
    return LaunchEvent(STAGE_RUN, STATE_RUNNING, message)


def launched(endpoint: str, name: str, function_id: str) -> LaunchEvent:
    """
    The event that announces a running function.

    :raises ValueError: when a value holds ``,`` or ``=``, which the daemon's
        comma-separated ``key=value`` parser cannot carry.
    """
    for key, value in (("endpoint", endpoint), ("name", name), ("id", function_id)):
        if "," in value or "=" in value or not value:
            raise ValueError(f"the function's {key} {value!r} is empty or holds ',' or '='")
    return LaunchEvent(STAGE_RUN, STATE_SUCCESS, f"endpoint={endpoint},name={name},id={function_id}")


def finished() -> LaunchEvent:
    """The last event of a successful launch."""
    return LaunchEvent(STAGE_END, STATE_SUCCESS)


def failed(stage: str, why: str) -> LaunchEvent:
    """The last event of a failed launch."""
    return LaunchEvent(stage, STATE_FAILED, why)


@frozen
class FunctionItem:
    """
    One function as ``instances`` lists it.

    :ivar function_id: ``ID``.
    :ivar name: ``Name`` (the daemon keeps it as the function name).
    :ivar endpoint: ``Endpoint`` (the function URL).
    :ivar state: ``Status.State``: ``running``, or ``restarting`` while a
        dead process is being replaced.
    """

    function_id: str
    name: str
    endpoint: str
    state: str


def instances_body(items: tuple[FunctionItem, ...] | list[FunctionItem]) -> bytes:
    """The ``instances`` answer listing ``items`` (none: not deployed)."""
    return json.dumps(
        {
            "error": "",
            "Items": [
                {
                    "ID": item.function_id,
                    "Name": item.name,
                    "Endpoint": item.endpoint,
                    "ResourceName": item.name,
                    "Status": {"State": item.state},
                }
                for item in items
            ],
        },
        separators=(",", ":"),
    ).encode("utf-8")


def error_body(message: str) -> bytes:
    """A refusal in the ``instances`` shape: the daemon reports a non-empty ``error`` as the install's failure."""
    return json.dumps({"error": message, "Items": []}, separators=(",", ":")).encode("utf-8")


def identifier_of_filename(filename: str) -> PluginIdentifier:
    """
    The identifier a package file name stands for:
    ``<author>@<name>@<version>@<checksum>.difypkg`` is
    ``<author>/<name>:<version>@<checksum>``.

    :raises LaunchRefused: when the name is not of that form.
    """
    if not filename.endswith(PACKAGE_SUFFIX):
        raise LaunchRefused(f"package file name {filename!r} does not end with {PACKAGE_SUFFIX}")
    parts = filename[: -len(PACKAGE_SUFFIX)].split("@")
    if len(parts) != 4:
        raise LaunchRefused(f"package file name {filename!r} is not <author>@<name>@<version>@<checksum>{PACKAGE_SUFFIX}")
    author, name, version, checksum = parts
    try:
        return compose_identifier(author or None, name, version, checksum)
    except UniqueIdentifierError as error:
        raise LaunchRefused(f"package file name {filename!r} names no valid plugin: {error}") from None


def filename_of(identifier: PluginIdentifier) -> str:
    """The package file name the daemon sends (and looks up) for ``identifier``."""
    return f"{identifier.author or ''}@{identifier.name}@{identifier.version}@{identifier.checksum}{PACKAGE_SUFFIX}"


def function_name(identifier: PluginIdentifier) -> str:
    """A function's name: readable, unique per package, and free of ``,`` and ``=``."""
    return f"{identifier.author or '_'}-{identifier.name}-{identifier.version}-{identifier.checksum[:12]}"


@frozen
class LaunchForm:
    """
    A launch request, decoded.

    :ivar identifier: the package's identifier, from its file name.
    :ivar filename: the file name (the key ``instances`` looks functions up by).
    :ivar package: the package's bytes.
    :ivar verified: the daemon's ``verified`` field.
    """

    identifier: PluginIdentifier
    filename: str
    package: bytes
    verified: bool


def launch_form(filename: str | None, package: bytes | None, verified: str | None, metadata: str | None) -> LaunchForm:
    """
    Decode the launch form's parts.

    ``metadata`` is optional; when it is there, its
    ``plugin_unique_identifier`` must be the file name's identifier.

    :raises LaunchRefused: naming what is missing or wrong.
    """
    if package is None or filename is None:
        raise LaunchRefused("the launch form has no 'context' file part")
    identifier = identifier_of_filename(filename)
    if metadata:
        try:
            claimed = json.loads(metadata).get("plugin_unique_identifier")
        except (ValueError, AttributeError):
            raise LaunchRefused("the launch form's 'metadata' is not a JSON object") from None
        if claimed is not None and claimed != identifier.raw:
            raise LaunchRefused(
                f"the launch form's metadata names {claimed!r}, its file name {identifier.raw!r}"
            )
    return LaunchForm(identifier=identifier, filename=filename, package=package, verified=verified == "true")
