"""The one error a ``dify`` command reports to its user."""

from __future__ import annotations


class CommandError(Exception):
    """
    A user error: printed as one line on stderr, then exit ``exit_code``.

    :param message: one line saying what went wrong (newlines are folded).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.message = " ".join(message.split("\n")) if "\n" in message else message
        self.exit_code = exit_code
