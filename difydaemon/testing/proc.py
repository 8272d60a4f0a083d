"""
The process tree as Linux's ``/proc`` shows it, for tests and benchmarks
that check which plugin processes a daemon runs, or left behind.
"""

from __future__ import annotations

import os


def children_by_parent() -> dict[int, list[int]]:
    """Every live process id, grouped under its parent's id."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                # the command name, in parentheses, may hold spaces and ")"
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(name))
    return children


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``: children, grandchildren, ..."""
    children = children_by_parent()
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def command_line(pid: int) -> bytes:
    """The NUL-separated arguments of a live process (empty once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
