"""Read one pipeline YAML file safely, and say where a field is in it.

Loading uses libyaml's safe loader when present (it is much faster than the pure-Python one).
Line/column marks are only needed to report errors, so they are computed on demand by
composing the document again instead of on every parse.

Everything a hostile or careless file can do is bounded before it costs much: the file size,
the nesting depth (libyaml's composer recurses in C and would crash the whole DAG processor on
a deeply nested file), and the size of the document after alias expansion ("billion laughs").
Every failure is a SpecError with a line a person can go to, never a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from dagfactory.errors import SpecError, SpecProblem

MAX_FILE_BYTES = 1024 * 1024
MAX_NODES = 100_000
"""Bound on the size of the document after alias expansion ("billion laughs")."""
MAX_DEPTH = 100
"""Bound on nesting; a pipeline needs 3 levels plus whatever its params hold."""
_SCAN_DEPTH_ABOVE = 1000
"""Text with fewer structure characters than this cannot nest deep enough to hurt libyaml."""

_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_STANDARD_TAG = "tag:yaml.org,2002:"


class _OwnProblem(yaml.MarkedYAMLError):
    """A problem our loader words itself (duplicate key, unreadable scalar)."""


class _Loader(_SafeLoader):  # type: ignore[misc, valid-type]
    """Safe loader that refuses duplicate keys and reports bad scalars with their position."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as exc:
            # e.g. `start_date: 2026-02-30` or `!!int abc`: PyYAML raises a bare ValueError.
            tag = node.tag.replace(_STANDARD_TAG, "!!")
            what = repr(node.value) if isinstance(node, yaml.ScalarNode) else "this value"
            message = f"cannot read {what} as {tag}: {exc}"
            if tag == "!!timestamp":
                message = f"{what} is not a real date ({exc}); write YYYY-MM-DD"
            raise _OwnProblem(
                problem=message,
                problem_mark=node.start_mark,
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == f"{_STANDARD_TAG}merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # unhashable key: the base constructor reports it
            if first is not key_node:
                raise _OwnProblem(
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

    @cached_property
    def root(self) -> yaml.Node | None:
        """The composed document; only built when a problem needs a position."""
        return yaml.compose(self.text, Loader=_SafeLoader)

    def locate(self, field_path: Sequence[str | int], key: bool = False) -> tuple[int, int]:
        """1-based (line, column) of the value at field_path (of its key if key=True).

        Falls back to the deepest existing parent when the path is not in the document.
        """
        node = self.root
        line, column = (1, 1) if node is None else _mark(node)
        for depth, part in enumerate(field_path):
            child = None
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if _is_key(key_node, part):
                        child = key_node if key and depth == len(field_path) - 1 else value_node
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


def _is_key(key_node: yaml.Node, part: str | int) -> bool:
    if not isinstance(key_node, yaml.ScalarNode):
        return False
    if isinstance(part, str) and not isinstance(part, bool):
        return key_node.value == part
    # A non-string key (`1:`, `on:`): compare what YAML makes of the key text.
    try:
        return yaml.safe_load(key_node.value) == part
    except yaml.YAMLError:
        return False


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _problem(path: str, message: str, mark: Any = None) -> SpecError:
    line, column = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    return SpecError([SpecProblem(path, message, line, column)])


def _position(text: str, index: int) -> tuple[int, int]:
    """1-based (line, column) of a character offset."""
    line = text.count("\n", 0, index) + 1
    return line, index - (text.rfind("\n", 0, index) + 1) + 1


# --- bounds ------------------------------------------------------------------------------------


def _too_deep(text: str) -> yaml.Mark | None:
    """Where the text nests deeper than MAX_DEPTH, found without libyaml's recursive composer.

    Every level of nesting needs its own '[', '{', '-', ':' or '?', so a file with few of them
    is shallow and needs no scan; the scan itself streams parser events, which does not recurse.
    """
    if sum(text.count(c) for c in "[{-:?") < _SCAN_DEPTH_ABOVE:
        return None
    depth = 0
    starts = (yaml.SequenceStartEvent, yaml.MappingStartEvent)
    ends = (yaml.SequenceEndEvent, yaml.MappingEndEvent)
    try:
        for event in yaml.parse(text, Loader=_SafeLoader):
            if isinstance(event, starts):
                depth += 1
                if depth > MAX_DEPTH:
                    return event.start_mark
            elif isinstance(event, ends):
                depth -= 1
    except yaml.YAMLError:
        return None  # the full load reports syntax errors with better messages
    return None


def _within_bounds(data: Any) -> bool:
    """Walk the expanded document, giving up as soon as it is too big or too deep."""
    budget = MAX_NODES
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        budget -= 1
        if budget < 0 or depth > MAX_DEPTH:
            return False
        if isinstance(item, dict):
            stack.extend((k, depth + 1) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


def _expansion_problem(text: str) -> tuple[str, yaml.Mark]:
    """Explain why the document is too big or too deep, at the node a person should look at.

    Aliases make the composed graph a DAG whose nodes are shared, so the expanded size and
    height of every node are computed once per node; then we descend from the root into the
    child that is too big (or too deep) until no child is, and point at that node.
    """
    root = yaml.compose(text, Loader=_SafeLoader)
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in size:
            continue
        kids = _children(node)
        if children_done:
            size[id(node)] = min(1 + sum(size[id(k)] for k in kids), MAX_NODES + 1)
            height[id(node)] = 1 + max((height[id(k)] for k in kids), default=0)
            continue
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)
    if height[id(root)] > MAX_DEPTH:
        node, depth = root, 1
        while depth < MAX_DEPTH:
            node = max(_children(node), key=lambda k: height[id(k)])
            depth += 1
        return f"values are nested more than {MAX_DEPTH} levels deep; flatten them", node.start_mark
    node = root
    while True:
        big = [k for k in _children(node) if size[id(k)] > MAX_NODES]
        if not big:
            break
        node = big[0]
    return (
        f"aliases here expand the document to more than {MAX_NODES} values "
        "(a 'billion laughs' file?); write the values out instead of nesting aliases",
        node.start_mark,
    )


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


# --- syntax errors in words ----------------------------------------------------------------------


def _explain(exc: yaml.MarkedYAMLError, text: str) -> tuple[str, Any]:
    """(message, mark) for a YAML error: what is wrong in plain words and what to write."""
    problem = exc.problem or ""
    context = exc.context or ""
    mark = exc.problem_mark
    if isinstance(exc, _OwnProblem) or mark is None or (exc.context_mark is None and context):
        return " ".join(filter(None, [context, problem])) or "invalid YAML", mark
    at = text[mark.index] if mark.index < len(text) else ""
    rest = text[mark.index :].split("\n", 1)[0].strip()

    if "could not determine a constructor" in problem:
        tag = problem.split("'")[1].replace(_STANDARD_TAG, "!!") if "'" in problem else "?"
        return (
            f"tag {tag!r} is not allowed: pipeline files are plain YAML (no !!python or custom "
            "tags); write the value itself",
            mark,
        )
    if "cannot start any token" in problem:
        if at == "\t":
            return "a tab character; YAML indents with spaces only", mark
        return f"a value cannot start with {at!r}; put it in quotes: {_quoted(rest)}", mark
    if context in ("while scanning an alias", "while scanning an anchor"):
        start = exc.context_mark
        rest = text[start.index :].split("\n", 1)[0].strip()
        return (
            f"a value cannot start with {rest[:1]!r}; put it in quotes: {_quoted(rest)}",
            start,
        )
    run_on = (
        _run_on_quote(text, mark) if "expected key" in problem or "mapping" in problem else None
    )
    if run_on is not None:
        return (
            f"the quote here is not closed on line {run_on.line + 1}, so the value runs on to "
            f"line {mark.line + 1}; close the quote",
            run_on,
        )
    if "mapping values are not allowed" in problem:
        line_start = text.rfind("\n", 0, mark.index) + 1
        if ": " in text[line_start : mark.index]:
            value = text[line_start : mark.index].split(": ", 1)[1] + rest
            return f"the value contains ': '; put it in quotes: {_quoted(value.strip())}", mark
        return (
            "a key is indented differently from the keys above it; keys of one mapping must "
            "line up",
            mark,
        )
    if "did not find expected key" in problem and "block mapping" in context:
        start = exc.context_mark.line + 1
        return (
            f"this line does not line up with the mapping that starts on line {start}; check "
            "its indentation (or a '- ' item where a 'key: value' belongs)",
            mark,
        )
    if "quoted scalar" in context:
        return "the quote that starts here is never closed; close it", exc.context_mark
    if "flow sequence" in context:
        return "the '[' that starts here is not closed with ']' (or an item lacks a ',')", (
            exc.context_mark
        )
    if "flow mapping" in context:
        return "the '{' that starts here is not closed with '}' (or an item lacks a ',')", (
            exc.context_mark
        )
    if "found unhashable key" in problem:
        if text.startswith("{{", exc.context_mark.index):
            return (
                "a value starting with '{' is read as a mapping; put Jinja templates in quotes: "
                f"{_quoted(text[exc.context_mark.index :].split(chr(10), 1)[0].strip())}",
                exc.context_mark,
            )
        return "a key must be a plain value, not a list or a mapping", mark
    if "found undefined alias" in problem:
        name = re.match(r"\*?([^\s,\]}]*)", rest)
        alias = name.group(1) if name else ""
        return f"alias *{alias} has no anchor &{alias} above it; define it or quote the value", mark
    if "expected a single document" in f"{context} {problem}":
        return (
            "a second document ('---') in the file; one pipeline per file: move it to its own file",
            mark,
        )
    message = " ".join(filter(None, [context, problem])) or "invalid YAML"
    return message, mark


def _run_on_quote(text: str, error: Any) -> Any:
    """Start of a quoted value that spans lines and ends just before the error, if any.

    An unclosed quote usually closes at the next line's quote, and YAML then complains about
    that next line; the mistake a person must fix is where the quote started.
    """
    last = None
    try:
        for token in yaml.scan(text, Loader=_SafeLoader):
            if token.start_mark.index >= error.index:
                break
            last = token
    except yaml.YAMLError:
        pass
    if (
        isinstance(last, yaml.ScalarToken)
        and last.style in ("'", '"')
        and last.start_mark.line < last.end_mark.line
    ):
        return last.start_mark
    return None


def _quoted(value: str) -> str:
    value = value.split(" #", 1)[0].strip()
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- reading -------------------------------------------------------------------------------------


def read_yaml(path: str | Path, shown_as: str | None = None) -> YamlFile:
    """Read and safely parse one YAML file whose top level must be a mapping.

    Raises SpecError (with line and column) for anything a person must fix.
    """
    shown = shown_as or str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise _problem(shown, f"cannot read the file: {exc.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise _problem(
            shown,
            f"file is {len(raw) // 1024} KiB, more than the {MAX_FILE_BYTES // 1024} KiB a "
            "pipeline file may have; move large data into the repository the pipeline runs",
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        hint = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        problem = SpecProblem(
            shown,
            f"byte 0x{raw[exc.start]:02x} is not UTF-8{hint}; save the file as UTF-8",
            line,
            column,
        )
        raise SpecError([problem]) from None
    deep = _too_deep(text)
    if deep is not None:
        raise _problem(
            shown, f"values are nested more than {MAX_DEPTH} levels deep; flatten them", deep
        )
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        raise _problem(shown, *_explain(exc, text)) from None
    except yaml.reader.ReaderError as exc:
        line, column = _position(text, exc.position)
        problem = SpecProblem(
            shown,
            f"the file contains the control character U+{exc.character:04X}; remove it",
            line,
            column,
        )
        raise SpecError([problem]) from None
    except yaml.YAMLError as exc:
        raise _problem(shown, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise _problem(
            shown, f"values are nested more than {MAX_DEPTH} levels deep; flatten them"
        ) from None
    if data is None:
        raise _problem(
            shown,
            "file is empty; a pipeline needs at least 'source' (with 'git') and 'entrypoint'",
        )
    if not isinstance(data, dict):
        kind = {list: "list", str: "string"}.get(type(data), type(data).__name__)
        raise _problem(
            shown,
            f"the top level must be a mapping of keys to values (source:, entrypoint:, ...), "
            f"not a {kind}",
            yaml.compose(text, Loader=_SafeLoader).start_mark,
        )
    if not _within_bounds(data):
        raise _problem(shown, *_expansion_problem(text))
    return YamlFile(shown, text, data)
