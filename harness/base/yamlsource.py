"""YAML loading that remembers where every value came from, so errors can name file and line.

PyYAML's plain loaders drop positions and silently keep the last of duplicate keys; here the
document is composed into nodes and converted by hand: every value's path (a tuple of keys and
list indices) maps to its 1-based line, and a duplicate key is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.base.errors import Problem, ScenarioError

PathKey = tuple[str | int, ...]


@dataclass
class Source:
    """A parsed YAML document: plain Python data plus the line of each value.

    The line of a mapping entry is the line of its key (for a block mapping or list under a key,
    that is where the field is named, not the line below); of a list item, where the item starts.
    `problems` holds mistakes found while reading that do not stop validation (a duplicate key,
    a value of an unknown tag): the loader reports them together with everything else.
    """

    file: str
    data: Any
    lines: dict[PathKey, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    text: str = ""

    def line(self, path: PathKey) -> int:
        """Line of the value at path, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)


_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """Escape line breaks, so that every problem prints as exactly one line."""
    return _LINE_BREAKS.sub(lambda m: repr(m.group())[1:-1], text)


def problem(file: str, line: int, path: PathKey | str, message: str) -> Problem:
    field_text = path if isinstance(path, str) else format_path(path)
    return Problem(file, line, one_line(field_text), one_line(message))


def format_path(path: PathKey) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + part
    return one_line(text) or "(document)"


class _Unreadable:
    """Stands for a value that could not be read (its problem is already recorded): checks skip it."""

    def __repr__(self) -> str:
        return "UNREADABLE"


UNREADABLE: Any = _Unreadable()

MAX_VALUES = 100_000     # values after alias expansion ("billion laughs" guard)
MAX_DEPTH = 64           # nesting of mappings and lists

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Core12Loader(yaml.SafeLoader):
    """YAML 1.2 core schema for plain scalars: only true/false are booleans (so `yes`, `no`, `on`, `off`
    in args, env and templates stay the words written), no sexagesimal numbers (1:30 is text), and a
    leading zero does not make an octal (010 is ten; write 0o10)."""


_REPLACED = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
_Core12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Core12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Core12Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"),
                                    list("-+0123456789"))
_Core12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


class _Core12Constructor(yaml.constructor.SafeConstructor):
    def construct_yaml_int(self, node: yaml.Node) -> int:
        text = str(self.construct_scalar(node))   # type: ignore[arg-type]
        if text.startswith(("0o", "0x")):
            return int(text, 0)
        return int(text, 10)


_Core12Constructor.add_constructor("tag:yaml.org,2002:int", _Core12Constructor.construct_yaml_int)


def parse_source(text: str, file: str) -> Source:
    """Parse YAML, keeping lines. Raises ScenarioError only when the text is not YAML at all;
    other reading problems are left in `Source.problems`."""
    try:
        node = yaml.compose(text, Loader=_Core12Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        reason = getattr(exc, "problem", None) or (str(exc).splitlines() or ["unreadable"])[0]
        raise ScenarioError([problem(file, line, "(yaml)", f"invalid YAML: {reason}")]) from None
    except RecursionError:
        raise ScenarioError([Problem(file, 1, "(yaml)", "invalid YAML: nested too deeply")]) from None
    source = Source(file=file, data=None, text=text)
    source.lines[()] = node.start_mark.line + 1 if node is not None else 1
    if node is not None:
        source.data = _Converter(source).convert(node, (), 0)
    return source


def load_source(text: str, file: str) -> Source:
    """parse_source, raising ScenarioError for any problem found while reading."""
    source = parse_source(text, file)
    if source.problems:
        raise ScenarioError(source.problems)
    return source


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError([Problem(str(path), 0, "(file)", f"cannot read: {exc}")]) from None


def load_file(path: Path) -> Source:
    return load_source(read_text(path), str(path))


class _Converter:
    """Nodes -> plain data, recording lines; tolerant: a problem is recorded and conversion goes on."""

    def __init__(self, source: Source):
        self.source = source
        self.constructor = _Core12Constructor()
        self.count = 0
        self.active: set[int] = set()     # ids of the collections being converted (recursive aliases)
        self.too_big = False

    def problem(self, node: yaml.Node, path: PathKey, message: str) -> None:
        self.source.problems.append(problem(self.source.file, node.start_mark.line + 1, path, message))

    def convert(self, node: yaml.Node, path: PathKey, depth: int) -> Any:
        self.source.lines.setdefault(path, node.start_mark.line + 1)
        self.count += 1
        if self.count > MAX_VALUES:
            if not self.too_big:
                self.too_big = True
                self.problem(node, path, f"the document expands to more than {MAX_VALUES} values (aliases?)")
            return UNREADABLE
        if isinstance(node, yaml.CollectionNode):
            if id(node) in self.active:
                self.problem(node, path, "an alias refers to the collection it is part of")
                return UNREADABLE
            if depth >= MAX_DEPTH:
                self.problem(node, path, f"nested more than {MAX_DEPTH} levels deep")
                return UNREADABLE
            self.active.add(id(node))
            try:
                if isinstance(node, yaml.MappingNode):
                    return self.mapping(node, path, depth)
                return [self.convert(item, path + (index,), depth + 1) for index, item in enumerate(node.value)]
            finally:
                self.active.discard(id(node))
        return self.scalar(node, path)

    def mapping(self, node: yaml.MappingNode, path: PathKey, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merges: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append((key_node, value_node))
                continue
            key = self.scalar(key_node, path) if isinstance(key_node, yaml.ScalarNode) else None
            if key is UNREADABLE:
                continue
            if not isinstance(key, (str, int, float, bool)):
                self.problem(key_node, path, "mapping keys must be plain words")
                continue
            key = str(key)
            child = path + (key,)
            if key in result:
                self.problem(key_node, child, "duplicate key")
                continue
            self.source.lines[child] = key_node.start_mark.line + 1
            result[key] = self.convert(value_node, child, depth + 1)
        # `<<: *base` (or a list of them): keys not written here come from the merged mappings.
        for key_node, value_node in merges:
            merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for item in merged:
                if not isinstance(item, yaml.MappingNode):
                    self.problem(key_node, path, "'<<' merges mappings only (like <<: *defaults)")
                    continue
                values = self.convert(item, path + ("<<",), depth + 1)
                for key, value in (values if isinstance(values, dict) else {}).items():
                    if key not in result:
                        result[key] = value
                        self.source.lines.setdefault(path + (key,), key_node.start_mark.line + 1)
        return result

    def scalar(self, node: yaml.Node, path: PathKey) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except Exception as exc:  # unknown tags (!foo), impossible dates, bad !!int ...: the user's mistake
            message = getattr(exc, "problem", None) or str(exc)
            self.problem(node, path, f"cannot read this value: {message.splitlines()[0] if message else exc}")
            return UNREADABLE
