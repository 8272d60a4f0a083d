"""
Random mutations of plugin packages, to fuzz the package decoder.

Two kinds: a *structure* mutation parses one YAML file of the package,
changes one place in it (a value of another type, a deletion, a new key, a
wrapping list or mapping) and writes it back; a *text* mutation changes the
file's bytes (flips, YAML punctuation, cut or repeated ranges).  Both give
the decoder documents that are well-formed in the first case and merely
plausible in the second; everything it raises must be a
:class:`~difydaemon.errors.DaemonError`.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

import yaml
from attrs import frozen

_WORDS = (
    "", "amd64", "arm64", "python", "plugin", "tool", "llm", "en_US", "icon.svg", "0.0.1", "1.0", "main",
    "true", "null", "~", "<<", "=", "-1", "1e999", ".nan", "2025-01-01T00:00:00Z", "x" * 300, "ü", "../x",
    "provider/echo.yaml", "models/llm/*.yaml", "[", "{", "*", "&",
)
_PUNCTUATION = (b":", b"-", b"[", b"]", b"{", b"}", b",", b"&a ", b"*a", b"!!str ", b"!!int ", b"<<: ", b"? ",
                b"|", b">", b"'", b'"', b"#", b"\t", b"\n", b"  ", b"\x00", b"\xff", b"%YAML 1.1\n", b"---\n")


@frozen
class Mutation:
    """
    One mutated package.

    :ivar description: what was changed, to reproduce a failure.
    :ivar files: the package's files after the change.
    """

    description: str
    files: dict


def random_value(rng: random.Random, depth: int = 0):
    """A random YAML-representable value, nested at most three levels."""
    choice = rng.randrange(10 if depth < 3 else 7)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice((True, False))
    if choice == 2:
        return rng.choice((0, -1, 1, 1023, 1024, 268435456, 2**70))
    if choice == 3:
        return rng.choice((0.5, -1.5, 1e300))
    if choice in (4, 5, 6):
        return rng.choice(_WORDS)
    if choice in (7, 8):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {_key(rng): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _key(rng: random.Random):
    # Mostly words; now and then the keys YAML allows and JSON does not.
    return rng.choice(_WORDS) or rng.choice(("k", 1, True, None, 1.5))


def _places(document, path=()):
    yield path
    if isinstance(document, dict):
        for key, value in document.items():
            yield from _places(value, path + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from _places(value, path + (index,))


def mutate_structure(rng: random.Random, document):
    """
    A copy of a parsed document with one place changed.

    :returns: ``(description, new document)``.
    """
    places = list(_places(document))
    path = rng.choice(places)
    operation = rng.choice(("replace", "replace", "delete", "add", "wrap-list", "wrap-map"))
    if not path and operation in ("delete", "replace"):
        operation = "add"
    document = yaml.safe_load(yaml.safe_dump(document))
    parent = document
    for part in path[:-1]:
        parent = parent[part]
    target = parent[path[-1]] if path else document
    if operation == "replace":
        parent[path[-1]] = random_value(rng)
    elif operation == "delete":
        del parent[path[-1]]
    elif operation == "add":
        if isinstance(target, dict):
            target[_key(rng)] = random_value(rng)
        elif isinstance(target, list):
            target.insert(rng.randrange(len(target) + 1), random_value(rng))
        else:
            operation = "noop"
    elif path:
        parent[path[-1]] = [target] if operation == "wrap-list" else {_key(rng): target}
    return f"{operation} at {list(path)!r}", document


def mutate_text(rng: random.Random, text: bytes) -> tuple[str, bytes]:
    """
    The bytes of a YAML file with one random change.

    :returns: ``(description, new bytes)``.
    """
    if not text:
        return "insert into empty", rng.choice(_PUNCTUATION)
    start = rng.randrange(len(text))
    end = min(len(text), start + rng.randrange(1, 64))
    operation = rng.choice(("flip", "insert", "insert", "delete", "repeat", "truncate"))
    if operation == "flip":
        return f"flip at {start}", text[:start] + bytes([text[start] ^ (1 << rng.randrange(8))]) + text[start + 1:]
    if operation == "insert":
        piece = rng.choice(_PUNCTUATION)
        return f"insert {piece!r} at {start}", text[:start] + piece + text[start:]
    if operation == "delete":
        return f"delete {start}:{end}", text[:start] + text[end:]
    if operation == "repeat":
        return f"repeat {start}:{end}", text[:end] + text[start:end] + text[end:]
    return f"truncate at {start}", text[:start]


def mutations(rng: random.Random, files: Mapping[str, bytes], count: int):
    """
    ``count`` mutated copies of a package's files, each changing one YAML
    file (the manifest half of the time) by structure or by text.
    """
    yaml_names = sorted(name for name in files if name.endswith((".yaml", ".yml")))
    for _ in range(count):
        name = "manifest.yaml" if rng.random() < 0.5 or not yaml_names else rng.choice(yaml_names)
        original = files[name]
        changed = dict(files)
        if rng.random() < 0.6:
            try:
                document = yaml.safe_load(original)
            except yaml.YAMLError:
                document = None
            description, document = mutate_structure(rng, document)
            changed[name] = yaml.safe_dump(document, allow_unicode=True).encode("utf-8")
        else:
            description, changed[name] = mutate_text(rng, original)
        yield Mutation(f"{name}: {description}", changed)
