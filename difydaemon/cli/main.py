"""The ``dify`` console script (plugin author tools)."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    """Entry point of ``dify``; the commands arrive with the CLI issue."""
    print("dify: no commands yet", file=sys.stderr)
    return 2
