"""YAML loading that remembers where every value came from, so errors can name file and line.

PyYAML's plain loaders drop positions and silently keep the last of duplicate keys; here the
document is composed into nodes and converted by hand: every value's path (a tuple of keys and
list indices) maps to its 1-based line, and a duplicate key is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.errors import Problem, ScenarioError

PathKey = tuple[str | int, ...]


@dataclass
class Source:
    """A parsed YAML document: plain Python data plus the line of each value."""

    file: str
    data: Any
    lines: dict[PathKey, int] = field(default_factory=dict)

    def line(self, path: PathKey) -> int:
        """Line of the value at path, or of its nearest ancestor that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), 1)


def format_path(path: PathKey) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += ("." if text else "") + part
    return text or "(document)"


def load_source(text: str, file: str) -> Source:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ScenarioError([Problem(file, line, "(yaml)", f"invalid YAML: {problem}")]) from None
    source = Source(file=file, data=None)
    if node is None:
        source.lines[()] = 1
        return source
    problems: list[Problem] = []
    source.data = _convert(node, (), source, problems)
    if problems:
        raise ScenarioError(problems)
    return source


def load_file(path: Path) -> Source:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError([Problem(str(path), 0, "(file)", f"cannot read: {exc}")]) from None
    return load_source(text, str(path))


_constructor = yaml.SafeLoader(stream="")


def _convert(node: yaml.Node, path: PathKey, source: Source, problems: list[Problem]) -> Any:
    source.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(key_node)
            if not isinstance(key, (str, int, float, bool)) or isinstance(key_node, yaml.CollectionNode):
                problems.append(Problem(source.file, key_node.start_mark.line + 1, format_path(path),
                                        "mapping keys must be plain words"))
                continue
            key = str(key)
            if key in result:
                problems.append(Problem(source.file, key_node.start_mark.line + 1, format_path(path + (key,)),
                                        "duplicate key"))
                continue
            result[key] = _convert(value_node, path + (key,), source, problems)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, path + (index,), source, problems) for index, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    if isinstance(node, yaml.ScalarNode):
        return _constructor.construct_object(node, deep=True)
    return None
