"""Read one pipeline YAML file safely, and say where a field is in it.

Loading uses libyaml's safe loader when present (it is much faster than the pure-Python one).
Line/column marks are only needed to report errors, so they are computed on demand by
composing the document again instead of on every parse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dagfactory.errors import SpecError, SpecProblem

MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 100_000
"""Bound on the size of the document after alias expansion ("billion laughs")."""

_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _Loader(_SafeLoader):  # type: ignore[misc, valid-type]
    """Safe loader that refuses duplicate keys in one mapping instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # unhashable key: the base constructor reports it
            if first is not key_node:
                raise _DuplicateKey(
                    problem=f"duplicate key {key!r} (first defined on line "
                    f"{first.start_mark.line + 1}); remove one of them",
                    problem_mark=key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


@dataclass(frozen=True)
class YamlFile:
    """A parsed YAML document and the text it came from (for error positions)."""

    path: str
    text: str
    data: dict[str, Any]

    def locate(self, field_path: Sequence[str | int], key: bool = False) -> tuple[int, int]:
        """1-based (line, column) of the value at field_path (of its key if key=True).

        Falls back to the deepest existing parent when the path is not in the document.
        """
        node = yaml.compose(self.text, Loader=_SafeLoader)
        line, column = (1, 1) if node is None else _mark(node)
        for part in field_path:
            child = None
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if key_node.value == str(part):
                        child = key_node if key and part == field_path[-1] else value_node
                        break
            elif (
                isinstance(node, yaml.SequenceNode)
                and isinstance(part, int)
                and 0 <= part < len(node.value)
            ):
                child = node.value[part]
            if child is None:
                break
            node = child
            line, column = _mark(node)
        return line, column


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _problem(path: str, message: str, mark: Any = None) -> SpecError:
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
    return SpecError([SpecProblem(path, message, line, column)])


def _count_nodes(data: Any, budget: int) -> int:
    """Walk the expanded document, giving up as soon as it is bigger than the budget."""
    stack = [data]
    while stack:
        item = stack.pop()
        budget -= 1
        if budget < 0:
            return budget
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return budget


def read_yaml(path: str | Path, shown_as: str | None = None) -> YamlFile:
    """Read and safely parse one YAML file whose top level must be a mapping.

    Raises SpecError (with line and column where YAML gives one) for anything a person must fix.
    """
    shown = shown_as or str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise _problem(shown, f"cannot read the file: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise _problem(shown, f"file is larger than {MAX_FILE_BYTES // 1024} KiB; split it up")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _problem(
            shown, f"file is not UTF-8 text (byte {exc.start}); save it as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        message = " ".join(filter(None, [exc.context, exc.problem])) or "invalid YAML"
        if exc.problem and "could not determine a constructor" in exc.problem:
            message = f"{exc.problem.split(chr(10))[0]}: only plain YAML is allowed, no tags"
        raise _problem(shown, message, exc.problem_mark) from None
    except yaml.YAMLError as exc:
        raise _problem(shown, f"invalid YAML: {exc}") from None
    if data is None:
        raise _problem(shown, "file is empty; a pipeline needs at least 'source' and 'entrypoint'")
    if not isinstance(data, dict):
        raise _problem(
            shown,
            f"the top level must be a mapping of keys to values, not a {type(data).__name__}",
            yaml.compose(text, Loader=_SafeLoader).start_mark,
        )
    if _count_nodes(data, MAX_NODES) < 0:
        raise _problem(
            shown, f"document expands to more than {MAX_NODES} values (aliases nested too deep)"
        )
    return YamlFile(shown, text, data)
