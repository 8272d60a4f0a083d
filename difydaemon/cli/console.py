"""Where a ``dify`` command reads and writes: passed in, so tests capture it."""

from __future__ import annotations

import sys
from typing import TextIO

from attrs import define


@define
class Console:
    """
    The streams of one command run.

    :ivar stdin: requests for ``plugin run``, answers to ``init`` prompts.
    :ivar stdout: results (identifiers, paths, checksums, responses).
    :ivar stderr: errors and progress.
    """

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO

    @classmethod
    def standard(cls) -> Console:
        """The process's own streams."""
        return cls(sys.stdin, sys.stdout, sys.stderr)

    def out(self, line: str) -> None:
        """One result line on stdout."""
        self.stdout.write(line + "\n")
        self.stdout.flush()

    def progress(self, line: str) -> None:
        """One progress line on stderr."""
        self.stderr.write(line + "\n")
        self.stderr.flush()

    def error(self, message: str) -> None:
        """The one error line of a failed command."""
        self.stderr.write(f"dify: error: {message}\n")
        self.stderr.flush()

    def is_interactive(self) -> bool:
        """Whether stdin is a terminal a person can answer prompts on."""
        isatty = getattr(self.stdin, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:
            return False

    def ask(self, prompt: str, default: str | None = None) -> str:
        """Ask one question on stderr and read the answer from stdin."""
        suffix = f" [{default}]" if default else ""
        self.stderr.write(f"{prompt}{suffix}: ")
        self.stderr.flush()
        answer = self.stdin.readline()
        if not answer:
            return default or ""
        answer = answer.strip()
        return answer or (default or "")
