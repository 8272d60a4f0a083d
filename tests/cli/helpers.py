"""
Running ``dify`` commands in-process with captured streams, and the shared
fixture packages.
"""

from __future__ import annotations

import io
import os

from attrs import frozen

from difydaemon.cli.main import main

FIXTURES = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "fixtures")
)
AGENT = os.path.join(FIXTURES, "langgenius-agent_0.0.14.difypkg")
OPENAI = os.path.join(FIXTURES, "langgenius-openai_0.0.19.difypkg")
UNSIGNED = os.path.join(FIXTURES, "unsigned-test_0.0.1.difypkg")
ALL_FIXTURES = (AGENT, OPENAI, UNSIGNED)
REPOSITORY = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


class TerminalInput(io.StringIO):
    """Prepared answers that claim to come from a terminal."""

    def isatty(self) -> bool:
        return True


@frozen
class Outcome:
    """What one command did: exit status and the text of its streams."""

    status: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        """The stdout lines."""
        return self.stdout.splitlines()


def dify(*argv: str, stdin: io.StringIO | None = None) -> Outcome:
    """Run ``dify <argv>`` in this process."""
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), stdin=stdin or io.StringIO(""), stdout=out, stderr=err)
    return Outcome(status, out.getvalue(), err.getvalue())


def read(path: str) -> bytes:
    """A file's bytes."""
    with open(path, "rb") as handle:
        return handle.read()


def write(path: str, content: bytes | str) -> None:
    """Create a file (and its directories)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(content.encode("utf-8") if isinstance(content, str) else content)
