"""
gitignore-syntax rules, as ``dify plugin package`` reads ``.difyignore``
(or ``.gitignore``): comments, blank lines, negation with ``!``,
directory-only patterns ending in ``/``, anchored patterns (a ``/`` at the
start or in the middle), ``*``, ``?``, ``[...]`` and ``**``.

Pure: :func:`parse_ignore` turns the file's text into :class:`IgnoreRules`,
which answer for ``/``-separated paths relative to the plugin directory.
"""

from __future__ import annotations

import re

from attrs import frozen


@frozen
class IgnoreRule:
    """
    One pattern line.

    :ivar pattern: the line as written (for messages).
    :ivar regex: matches a whole relative path.
    :ivar negated: a ``!`` line: re-includes what earlier lines excluded.
    :ivar directory_only: the pattern ended with ``/``.
    """

    pattern: str
    regex: re.Pattern
    negated: bool
    directory_only: bool


@frozen
class IgnoreRules:
    """An ordered list of rules; the last rule that matches a path decides."""

    rules: tuple[IgnoreRule, ...] = ()

    def is_ignored(self, path: str, is_dir: bool) -> bool:
        """
        Whether ``path`` (relative, ``/``-separated) is excluded by the rules
        themselves; callers also skip everything under an excluded directory,
        as git does, so a file cannot be re-included inside one.
        """
        ignored = False
        for rule in self.rules:
            if rule.directory_only and not is_dir:
                continue
            if rule.regex.fullmatch(path):
                ignored = not rule.negated
        return ignored


def _translate_glob(pattern: str) -> str:
    """The regex of a glob where ``*`` and ``?`` stay inside one path part."""
    out = []
    index = 0
    length = len(pattern)
    while index < length:
        char = pattern[index]
        if char == "*":
            if pattern.startswith("**", index):
                before_ok = index == 0 or pattern[index - 1] == "/"
                after = index + 2
                if before_ok and after == length:
                    # A trailing "/**": everything inside.
                    out.append(".*")
                    index = after
                    continue
                if before_ok and pattern.startswith("/", after):
                    # "**/" : zero or more whole directories.
                    out.append("(?:.*/)?")
                    index = after + 1
                    continue
            out.append("[^/]*")
            index += 1
        elif char == "?":
            out.append("[^/]")
            index += 1
        elif char == "[":
            end = pattern.find("]", index + 2 if pattern.startswith(("[!", "[^"), index) else index + 1)
            if end < 0:
                out.append(re.escape(char))
                index += 1
                continue
            body = pattern[index + 1 : end]
            if body[:1] in ("!", "^"):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            index = end + 1
        elif char == "\\" and index + 1 < length:
            out.append(re.escape(pattern[index + 1]))
            index += 2
        else:
            out.append(re.escape(char))
            index += 1
    return "".join(out)


def parse_rule(line: str) -> IgnoreRule | None:
    """One line of an ignore file as a rule; None for blank and comment lines."""
    text = line.rstrip("\n").rstrip("\r")
    # Trailing spaces are dropped unless escaped with a backslash.
    stripped = text.rstrip(" ")
    if stripped.endswith("\\") and len(stripped) < len(text):
        stripped += " "
    text = stripped
    if not text or text.startswith("#"):
        return None
    negated = False
    if text.startswith("!"):
        negated = True
        text = text[1:]
    elif text.startswith("\\#") or text.startswith("\\!"):
        text = text[1:]
    directory_only = text.endswith("/")
    body = text.rstrip("/")
    if not body:
        return None
    anchored = "/" in body
    body = body.lstrip("/")
    regex = _translate_glob(body)
    if not anchored:
        # A pattern without a slash matches at any depth.
        regex = "(?:.*/)?" + regex
    return IgnoreRule(pattern=line.strip(), regex=re.compile(regex, re.DOTALL), negated=negated,
                      directory_only=directory_only)


def parse_ignore(text: str) -> IgnoreRules:
    """All the rules of an ignore file's text."""
    rules = [parse_rule(line) for line in text.splitlines()]
    return IgnoreRules(tuple(rule for rule in rules if rule is not None))
