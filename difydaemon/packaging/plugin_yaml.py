"""
The YAML files of a plugin package, read with libyaml where it exists and
within budgets that hold whatever the package says.

One set of resolver rules (closer to Go's yaml.v3, YAML 1.2): timestamps
stay strings (the manifest formats ``created_at`` itself) and only
true/false are booleans.  The result is JSON-ready: string keys, no exotic
types, aliases expanded into copies.

A package is hostile until proven otherwise, and YAML has three classic
bombs: aliases that expand exponentially (nine aliases of nine aliases...),
an anchor that contains itself, and nesting deep enough to exhaust the
stack.  The document is therefore read as a stream of parser events and
built here, without recursion, while a :class:`YamlBudget` counts every
node (an alias counts all the nodes it expands to), the nesting depth (an
alias counts its own height) and the bytes read.  Going over a limit, a
document made mostly of alias expansions (Go's yaml.v3 rule), or an alias
into an anchor that is still open, stops the reading at once with
:class:`YamlRefused`; nothing is expanded before it has been paid for.

Documents using explicit tags or merge keys (``<<``) are rare in plugins;
for them the stream is still checked in full first, then PyYAML's own
constructor builds the value (within the limits just checked), so that
their meaning stays PyYAML's.
"""

from __future__ import annotations

import base64
import datetime
import re
from collections.abc import Mapping

import yaml
from yaml.events import (
    AliasEvent,
    DocumentEndEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
    StreamStartEvent,
)
from yaml.nodes import ScalarNode

from difydaemon.errors import InvalidManifestError, MalformedPackageError
from difydaemon.packaging.yaml_limits import YamlLimits

STR_TAG = "tag:yaml.org,2002:str"
#: Scalar tags this module constructs itself (through PyYAML's constructors).
_SIMPLE_TAGS = frozenset(
    ("tag:yaml.org,2002:null", "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
)


def _with_plugin_resolvers(base: type) -> type:
    """A subclass of ``base`` whose implicit scalar rules are the plugin rules."""

    class PluginLoader(base):
        """``base`` resolving plain scalars as plugin YAML is read."""

    PluginLoader.yaml_implicit_resolvers = {
        first: [
            (tag, regexp)
            for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:bool")
        ]
        for first, resolvers in base.yaml_implicit_resolvers.items()
    }
    PluginLoader.add_implicit_resolver(
        "tag:yaml.org,2002:bool",
        re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"),
    )
    return PluginLoader


#: The pure-Python loader with the plugin rules (and the reference in tests).
PythonLoader = _with_plugin_resolvers(yaml.SafeLoader)
#: The loader in use: libyaml's parser when PyYAML was built with it.
Loader = _with_plugin_resolvers(yaml.CSafeLoader) if yaml.__with_libyaml__ else PythonLoader


class YamlRefused(Exception):
    """A YAML document is over a limit or cannot be built; the text says why."""


class YamlBudget:
    """
    The running cost of the YAML read for one package.

    :param limits: the :class:`YamlLimits` to hold.
    """

    def __init__(self, limits: YamlLimits = YamlLimits()) -> None:
        self.limits = limits
        self.nodes = 0
        self.bytes = 0

    def spend_bytes(self, count: int) -> None:
        """Account for ``count`` more bytes of YAML text."""
        self.bytes += count
        if self.bytes > self.limits.max_bytes:
            raise YamlRefused(
                f"the package's YAML files are over {self.limits.max_bytes} bytes together"
            )

    def spend_nodes(self, count: int, event) -> None:
        """Account for ``count`` more nodes, built at ``event``."""
        self.nodes += count
        if self.nodes > self.limits.max_nodes:
            raise YamlRefused(
                f"the package's YAML is over {self.limits.max_nodes} nodes, aliases expanded{_where(event)}"
            )


def allowed_alias_ratio(nodes: int) -> float:
    """
    The share of a document's nodes that may come from aliases once it has
    ``nodes`` nodes: Go's yaml.v3 rule (99% up to 400,000 nodes, falling
    linearly to 10% at 4,000,000), so that what Go reads in full we read too,
    and an alias bomb is refused after a few thousand nodes.
    """
    low, high = 400_000, 4_000_000
    if nodes <= low:
        return 0.99
    if nodes >= high:
        return 0.10
    return 0.99 - 0.89 * (nodes - low) / (high - low)


def _where(event) -> str:
    mark = getattr(event, "start_mark", None)
    if mark is None:
        return ""
    return f" (line {mark.line + 1}, column {mark.column + 1})"


def _clone(value):
    """A fresh copy of a built value (depth already bounded by the budget)."""
    if isinstance(value, dict):
        return {key: _clone(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clone(item) for item in value]
    return value


def _plain_key(key) -> str:
    return str(key).lower() if isinstance(key, bool) else str(key)


#: What a 64-bit integer (signed or not) holds; JSON encoders stop there.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1


def _json_scalar(value, event):
    """A scalar value as JSON can carry it: finite floats, 64-bit integers."""
    kind = value.__class__
    if kind is float:
        if value != value or value in (float("inf"), float("-inf")):
            raise YamlRefused(f"non-finite number{_where(event)}")
    elif kind is int and not _INT_MIN <= value <= _INT_MAX:
        # yaml.v3 reads an integer that fits no 64-bit type as a float.
        try:
            return _json_scalar(float(value), event)
        except OverflowError:
            raise YamlRefused(f"non-finite number{_where(event)}") from None
    return value


def plain(value):
    """
    Make a value built by PyYAML JSON-ready, as this module builds values:
    string keys (booleans lowercased), lists for sequences and sets, ISO
    text for dates, base64 for binary, no NaN or infinity, integers beyond
    64 bits as floats.
    """
    if isinstance(value, dict):
        return {_plain_key(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain(item) for item in value]
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        return _json_scalar(value, None)
    return value


class _Collection:
    """A sequence or mapping being built: its items, anchor and cost so far."""

    __slots__ = ("items", "is_mapping", "anchor", "nodes_before", "height", "key", "has_key", "event")

    def __init__(self, is_mapping: bool, anchor, nodes_before: int, event) -> None:
        self.items: list = []
        self.is_mapping = is_mapping
        self.anchor = anchor
        self.nodes_before = nodes_before
        self.height = 0
        self.key = None
        self.has_key = False
        self.event = event


class _Builder:
    """
    Builds one document from parser events; see the module docstring.

    After :meth:`run`, ``value`` is the document and ``needs_constructor``
    says whether it must be built again by PyYAML's constructor instead.
    """

    def __init__(self, loader, budget: YamlBudget) -> None:
        self._loader = loader
        self._budget = budget
        self._stack: list[_Collection] = []
        # anchor -> (value, node count, height); None while the anchor is open.
        self._anchors: dict = {}
        self._constructors = loader.yaml_constructors
        self._tags: dict = {}
        self._nodes_before = budget.nodes
        self._aliased = 0
        self.value = None
        self.needs_constructor = False

    def run(self) -> None:
        """Read every event of the stream, building or only counting."""
        loader = self._loader
        get_event = loader.get_event
        budget = self._budget
        max_nodes = budget.limits.max_nodes
        stack = self._stack
        tags = self._tags
        documents = 0
        while True:
            event = get_event()
            kind = event.__class__
            if kind is ScalarEvent:
                # The common case, inlined: a plain or quoted string inside a
                # collection, without anchor or tag.
                value = event.value
                if (
                    stack
                    and event.tag is None
                    and event.anchor is None
                    and not self.needs_constructor
                    and (not event.implicit[0] or tags.get(value) == STR_TAG)
                    and budget.nodes < max_nodes
                ):
                    budget.nodes += 1
                    parent = stack[-1]
                    if not parent.is_mapping:
                        parent.items.append(value)
                    elif parent.has_key:
                        parent.items.append((parent.key, value))
                        parent.has_key = False
                    else:
                        parent.key = value
                        parent.has_key = True
                else:
                    self._scalar(event)
            elif kind is MappingStartEvent or kind is SequenceStartEvent:
                self._start(event, kind is MappingStartEvent)
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                self._end()
            elif kind is AliasEvent:
                self._alias(event)
            elif kind is DocumentStartEvent:
                documents += 1
                if documents > 1:
                    raise YamlRefused(f"expected a single document in the stream{_where(event)}")
            elif kind is StreamEndEvent:
                return
            elif kind is not DocumentEndEvent and kind is not StreamStartEvent:
                raise YamlRefused(f"unexpected YAML event {kind.__name__}{_where(event)}")

    def _depth_check(self, height: int, event) -> None:
        if len(self._stack) + height > self._budget.limits.max_depth:
            raise YamlRefused(
                f"YAML nested deeper than {self._budget.limits.max_depth} levels{_where(event)}"
            )

    def _open_anchor(self, anchor, event) -> None:
        if anchor in self._anchors:
            raise YamlRefused(f"found duplicate anchor {anchor!r}{_where(event)}")
        self._anchors[anchor] = None

    def _scalar(self, event) -> None:
        self._budget.spend_nodes(1, event)
        anchor = event.anchor
        if anchor is not None:
            self._open_anchor(anchor, event)
        value = None
        if not self.needs_constructor:
            value = self._construct_scalar(event)
        if anchor is not None:
            self._anchors[anchor] = (value, 1, 0)
        self._add(value, 0, event)

    def _construct_scalar(self, event):
        tag = event.tag
        if tag is not None:
            self.needs_constructor = True
            return None
        value = event.value
        if not event.implicit[0]:
            return value
        # Most plain scalars repeat ("type", "string", ...): resolve each once.
        tag = self._tags.get(value)
        if tag is None:
            tag = self._tags[value] = self._loader.resolve(ScalarNode, value, event.implicit)
        if tag == STR_TAG:
            return value
        if tag not in _SIMPLE_TAGS:
            # merge keys, "=" and the like: PyYAML's meaning, PyYAML's code.
            self.needs_constructor = True
            return None
        try:
            return self._constructors[tag](self._loader, ScalarNode(tag, event.value))
        except (ValueError, KeyError, OverflowError) as error:
            raise YamlRefused(f"cannot read {event.value[:40]!r} as {tag.rsplit(':', 1)[-1]}: {error}"
                              f"{_where(event)}") from None

    def _start(self, event, is_mapping: bool) -> None:
        self._depth_check(1, event)
        self._budget.spend_nodes(1, event)
        if event.anchor is not None:
            self._open_anchor(event.anchor, event)
        if event.tag is not None:
            self.needs_constructor = True
        self._stack.append(_Collection(is_mapping, event.anchor, self._budget.nodes - 1, event))

    def _end(self) -> None:
        collection = self._stack.pop()
        value = None
        if not self.needs_constructor:
            value = self._finish(collection) if collection.is_mapping else collection.items
        height = collection.height + 1
        if collection.anchor is not None:
            self._anchors[collection.anchor] = (value, self._budget.nodes - collection.nodes_before, height)
        self._add(value, height, collection.event)

    def _finish(self, collection: _Collection) -> dict:
        built: dict = {}
        plain_keys = True
        for key, value in collection.items:
            if key.__class__ is not str:
                plain_keys = False
            built[key] = value
        if plain_keys:
            return built
        return {_plain_key(key): value for key, value in built.items()}

    def _alias(self, event) -> None:
        anchor = event.anchor
        if anchor not in self._anchors:
            raise YamlRefused(f"found undefined alias {anchor!r}{_where(event)}")
        entry = self._anchors[anchor]
        if entry is None:
            raise YamlRefused(f"anchor {anchor!r} contains an alias to itself{_where(event)}")
        value, nodes, height = entry
        self._depth_check(height, event)
        self._budget.spend_nodes(nodes, event)
        self._aliased += nodes
        built = self._budget.nodes - self._nodes_before
        if self._aliased > 100 and built > 1000 and self._aliased / built > allowed_alias_ratio(built):
            raise YamlRefused(
                f"document contains excessive aliasing ({self._aliased} of {built} nodes come from aliases)"
                f"{_where(event)}"
            )
        if not self.needs_constructor and height:
            value = _clone(value)
        self._add(value, height, event)

    def _add(self, value, height: int, event) -> None:
        stack = self._stack
        if not stack:
            self.value = _json_scalar(value, event)
            return
        parent = stack[-1]
        if height >= parent.height:
            parent.height = height
        if not parent.is_mapping:
            parent.items.append(_json_scalar(value, event))
        elif parent.has_key:
            parent.items.append((parent.key, _json_scalar(value, event)))
            parent.has_key = False
        else:
            if isinstance(value, (dict, list)):
                raise YamlRefused(f"found unhashable key{_where(event)}")
            parent.key = value
            parent.has_key = True


def parse_yaml(text: str, budget: YamlBudget, loader: type = Loader):
    """
    Build one YAML document within ``budget`` (its bytes are the caller's to count).

    :param loader: :data:`Loader` (libyaml when available) or :data:`PythonLoader`.
    :raises YamlRefused: a limit is exceeded or the document cannot be built.
    :raises yaml.YAMLError: the text is not YAML.
    """
    parser = loader(text)
    try:
        builder = _Builder(parser, budget)
        builder.run()
    finally:
        parser.dispose()
    if not builder.needs_constructor:
        return builder.value
    try:
        return plain(yaml.load(text, Loader=loader))  # noqa: S506 - a SafeLoader subclass
    except (ValueError, KeyError, TypeError, OverflowError) as error:
        raise YamlRefused(f"cannot build the document: {error}") from None


class PackageYaml:
    """
    The YAML files of one package, all read under one :class:`YamlBudget`.

    :param files: the package's files (name -> bytes).
    :param limits: what the package's YAML may cost.
    :ivar files: the same files, for lookups that are not YAML.
    """

    def __init__(self, files: Mapping[str, bytes], limits: YamlLimits = YamlLimits(), loader: type = Loader) -> None:
        self.files = files
        self._budget = YamlBudget(limits)
        self._loader = loader

    def load(self, filename: str, kind: str = "file"):
        """
        Parse one YAML file of the package.

        :param kind: what the file is, for the error message ("tool file", ...).
        :raises InvalidManifestError: the file is missing.
        :raises MalformedPackageError: the file is not valid YAML or is over a limit.
        """
        if not isinstance(filename, str) or filename not in self.files:
            raise InvalidManifestError(f"failed to read {kind}: {filename} (not found in the package)")
        content = self.files[filename]
        try:
            self._budget.spend_bytes(len(content))
            return parse_yaml(content.decode("utf-8"), self._budget, self._loader)
        except (UnicodeDecodeError, yaml.YAMLError, YamlRefused) as error:
            # PyYAML's messages span lines (context, mark, snippet): keep one.
            text = " ".join(str(error).split())
            raise MalformedPackageError(f"failed to unmarshal {kind} {filename}: {text}") from None

    def mapping(self, filename: str, kind: str = "file") -> dict:
        """:meth:`load` for files whose top level must be a mapping."""
        value = self.load(filename, kind)
        if not isinstance(value, dict):
            raise MalformedPackageError(f"failed to unmarshal {kind} {filename}: expected a mapping")
        return value
