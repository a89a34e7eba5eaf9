"""Pipeline files in, typed specs and located errors out.

One bad file never hides another: `load_folder` returns every valid spec *and* every problem,
and no mistake in a file (nor a bug in a check) escapes as an exception, because in Airflow's
DAG processor an exception would hide every pipeline of the folder at once.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import dacite
import jsonschema

from dagfactory.checks import FieldPath, check_data, check_spec
from dagfactory.errors import SpecError, SpecProblem
from dagfactory.schema import pipeline_schema
from dagfactory.spec import PipelineSpec
from dagfactory.yamlfile import YamlFile, read_yaml

DEFAULTS_FILE = "defaults.yml"
SUFFIXES = (".yml", ".yaml")

# What a pattern-checked field must look like, in words.
_PATTERN_HINTS = {
    "entrypoint": "must be module:function, e.g. wordcount.job:main",
    "timeout": "must be a duration such as 90s, 30m, 1.5h or 2d (a number, then a unit)",
    "idle_timeout": "must be a duration such as 90s, 30m, 1.5h or 2d (a number, then a unit)",
    "retry_delay": "must be a duration such as 90s, 30m, 1.5h or 2d (a number, then a unit)",
    "dagrun_timeout": "must be a duration such as 90s, 30m, 1.5h or 2d (a number, then a unit)",
    "memory": "must be a size such as 512MiB or 2GiB",
    "dag_id": "may only hold letters, digits, '_', '.' and '-'",
}
_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}
# Names people bring from other tools, and the key that means the same here.
_KNOWN_ALIASES = {
    "branch": "ref",
    "tag": "ref",
    "commit": "ref",
    "sha": "ref",
    "revision": "ref",
    "url": "git",
    "repo": "git",
    "repository": "git",
    "path": "subdir",
    "directory": "subdir",
    "schedule_interval": "schedule",
    "cron": "schedule",
    "entry_point": "entrypoint",
    "function": "entrypoint",
    "callable": "entrypoint",
    "n_workers": "workers",
    "threads": "cpu",
    "threads_per_worker": "cpu",
    "memory_limit": "memory",
    "scheduler": "address",
    "scheduler_address": "address",
    "execution_timeout": "timeout",
    "arguments": "params",
    "kwargs": "params",
    "args": "params",
}
_EXAMPLE_VALUES = {"source": "{git: https://github.com/acme/pipelines.git}"}
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n"}


_DACITE = dacite.Config(strict=True, cast=[tuple], type_hooks={date: date.fromisoformat})


@dataclass(frozen=True)
class LoadResult:
    specs: tuple[PipelineSpec, ...]
    problems: tuple[SpecProblem, ...]


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = pipeline_schema()
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def pipeline_files(folder: Path) -> list[Path]:
    """The pipeline files of a folder, sorted, without the defaults file and hidden files."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix in SUFFIXES
        and p.name != DEFAULTS_FILE
        and not p.name.startswith((".", "_"))
        and p.is_file()
    )


def read_defaults(folder: Path, shown_as: str | None = None) -> dict[str, Any]:
    """`defaults.yml` of a pipelines folder, merged under every spec in it (empty if absent).

    It is checked on its own (every key it sets must be valid; none is required), so that a
    mistake in it is reported at its line in it, not in every pipeline file.
    """
    path = folder / DEFAULTS_FILE
    if not path.is_file():
        return {}
    doc = read_yaml(path, shown_as)
    data = _jsonable(doc.data)
    problems = [_problem(doc, f) for f in _schema_findings(data) if not f.missing]
    if "dag_id" in data:
        problems.append(
            _locate(
                doc,
                ("dag_id",),
                "a default dag_id would give every pipeline the same DAG id; set dag_id in "
                "each pipeline file instead",
                key=True,
            )
        )
    if problems:
        raise SpecError(sorted(problems, key=lambda p: (p.line, p.column)))
    return doc.data


def load_folder(folder: str | Path, shown_as: str | None = None) -> LoadResult:
    """Load every pipeline file of a folder; never raises for a user's mistake."""
    folder = Path(folder)
    shown = Path(shown_as) if shown_as is not None else folder
    files = [(p, str(shown / p.name)) for p in pipeline_files(folder)]
    try:
        defaults = read_defaults(folder, str(shown / DEFAULTS_FILE))
    except SpecError as exc:
        return LoadResult((), exc.problems + blocked_by_defaults(files, exc.problems))
    return load_files(files, defaults)


def blocked_by_defaults(
    files: Iterable[tuple[Path, str]], problems: tuple[SpecProblem, ...]
) -> tuple[SpecProblem, ...]:
    """One problem per pipeline file that cannot be loaded because its defaults file is broken.

    Each file gets its own problem so that Airflow shows every affected pipeline as broken,
    instead of the pipelines silently disappearing.
    """
    first = problems[0]
    return tuple(
        SpecProblem(
            shown,
            f"not loaded because {first.file} is invalid (line {first.line}: {first.message}); "
            "fix that file first",
            1,
            1,
        )
        for _, shown in files
    )


def load_files(files: Iterable[tuple[Path, str]], defaults: dict[str, Any]) -> LoadResult:
    """Load (path, name shown in messages) pairs, then check DAG ids are unique across them."""
    loaded: list[tuple[PipelineSpec, str]] = []
    problems: list[SpecProblem] = []
    for path, shown in files:
        try:
            loaded.append((load_file(path, defaults, shown_as=shown), shown))
        except SpecError as exc:
            problems.extend(exc.problems)
        except Exception as exc:  # a bug in a check must not take the other pipelines down
            problems.append(
                SpecProblem(
                    shown,
                    f"dagfactory could not check this file ({type(exc).__name__}: {exc}); "
                    "this is a bug in dagfactory, please report it",
                    1,
                    1,
                )
            )
    specs, duplicates = unique_dag_ids(loaded)
    return LoadResult(tuple(specs), tuple(problems + duplicates))


def unique_dag_ids(
    loaded: Iterable[tuple[PipelineSpec, str]], taken: dict[str, str] | None = None
) -> tuple[list[PipelineSpec], list[SpecProblem]]:
    """Keep the first spec of each DAG id; every later one is a problem of its own file.

    taken: DAG ids already claimed by files that are not being loaded (name shown by id).
    """
    first_seen: dict[str, str] = dict(taken or {})
    specs: list[PipelineSpec] = []
    problems: list[SpecProblem] = []
    for spec, shown in loaded:
        if spec.dag_id not in first_seen:
            first_seen[spec.dag_id] = shown
            specs.append(spec)
            continue
        line, column, given = _dag_id_position(spec, shown)
        problems.append(
            SpecProblem(
                shown,
                f"DAG id {spec.dag_id!r} (from {given}) is already used by "
                f"{first_seen[spec.dag_id]}; set a different dag_id or rename the file",
                line,
                column,
                "dag_id",
            )
        )
    return specs, problems


def declared_dag_id(path: Path) -> str | None:
    """The DAG id a pipeline file claims, read cheaply (None if the file cannot be read)."""
    try:
        dag_id = read_yaml(path).data.get("dag_id", path.name.rsplit(".", 1)[0])
    except SpecError:
        return None
    return dag_id if isinstance(dag_id, str) else None


def _dag_id_position(spec: PipelineSpec, shown: str) -> tuple[int, int, str]:
    """(line, column, where the id comes from) of a file's DAG id, read again on this error path."""
    try:
        doc = read_yaml(spec.origin, shown)
    except SpecError:
        return 1, 1, "its file name"
    if "dag_id" not in doc.data:
        return 1, 1, "its file name"
    return (*doc.locate(("dag_id",)), "its dag_id")


def load_file(
    path: str | Path, defaults: dict[str, Any] | None = None, shown_as: str | None = None
) -> PipelineSpec:
    """Read, validate and type one pipeline file. Raises SpecError with every problem found."""
    path = Path(path)
    doc = read_yaml(path, shown_as)
    data = _merge(defaults or {}, doc.data)
    from_file_name = "dag_id" not in data
    data.setdefault("dag_id", path.name.rsplit(".", 1)[0])
    data = _jsonable(data)
    findings = list(_schema_findings(data))
    problems = [_problem(doc, f) for f in findings]
    # The rules beyond the schema run even when the schema found problems, on the document
    # without the fields it refused, so that one pass reports every problem of the file.
    flagged = [f.field for f in findings]

    def unflagged(field: FieldPath) -> bool:
        return not any(field[: len(bad)] == bad or bad[: len(field)] == field for bad in flagged)

    problems += [_locate(doc, f, m, key=True) for f, m in check_data(data) if unflagged(f)]
    try:
        spec = dacite.from_dict(PipelineSpec, _without(data, flagged), config=_DACITE)
    except (dacite.DaciteError, ValueError) as exc:
        if not problems:  # the schema should have caught it
            field = tuple((getattr(exc, "field_path", None) or "").split("."))
            raise SpecError([_locate(doc, field, f"invalid value: {exc}")]) from None
    else:
        spec = dataclasses.replace(spec, origin=str(path.resolve()))
        problems += [_locate(doc, f, m) for f, m in check_spec(spec) if unflagged(f)]
    if from_file_name:
        problems = [_file_name_problem(p, path) if p.field == "dag_id" else p for p in problems]
    if problems:
        raise SpecError(sorted(problems, key=lambda p: (p.line, p.column)))
    return spec


# Stand-ins for required values the schema found missing or wrong, so that the other rules can
# still look at the rest of the file; nothing is reported about them.
_STAND_INS = {"source": {"git": "."}, "git": ".", "entrypoint": "module:function"}


def _without(data: dict[str, Any], fields: list[FieldPath]) -> dict[str, Any]:
    """data without the values at `fields` (defaults take their place; stand-ins if required).

    A field inside a list takes the whole list with it.
    """
    data = copy.deepcopy(data)
    for field in fields:
        node: Any = data
        holder: tuple[dict[str, Any], Any] | None = None
        for part in field:
            if not isinstance(node, dict):
                break
            if part not in node:
                if part in _STAND_INS:
                    node[part] = copy.deepcopy(_STAND_INS[part])
                holder = None
                break
            holder, node = (node, part), node[part]
        if holder is not None:
            parent, key = holder
            parent.pop(key)
            if key in _STAND_INS:
                parent[key] = copy.deepcopy(_STAND_INS[key])
    return data


def _file_name_problem(problem: SpecProblem, path: Path) -> SpecProblem:
    return dataclasses.replace(
        problem,
        message=f"the DAG id comes from the file name {path.name!r}, and a DAG id may only hold "
        "letters, digits, '_', '.' and '-'; rename the file or set dag_id",
    )


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of mappings; the override wins, lists are replaced, not concatenated."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _jsonable(value: Any) -> Any:
    """YAML dates become ISO strings, so the schema (and JSON) sees what the user wrote."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


class _Finding(NamedTuple):
    """One schema violation: the field, where to point, and what to say."""

    field: FieldPath
    message: str
    at_key: bool = False
    missing: bool = False
    """A required key is absent; it is located at the mapping that lacks it."""


def _schema_findings(data: dict[str, Any]) -> Iterator[_Finding]:
    """Every schema violation of data, in words a person can act on."""
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    for error in errors:
        path = tuple(error.absolute_path)
        name = str(path[-1]) if path else ""
        if error.validator == "additionalProperties":
            allowed = list(error.schema.get("properties", {}))
            for key in sorted(set(error.instance) - set(allowed), key=str):
                message = f"unknown key {key!r}; {_suggest(key, allowed)}"
                yield _Finding((*path, key), message, at_key=True)
        elif error.validator == "required":
            missing = error.message.split("'")[1]
            hint = _add_hint(missing, error.schema["properties"].get(missing, {}))
            message = f"missing required key {missing!r}; {hint}"
            yield _Finding((*path, missing), message, at_key=True, missing=True)
        elif error.validator == "type":
            expected = error.validator_value
            kinds = [expected] if isinstance(expected, str) else expected
            wanted = " or ".join(_TYPE_NAMES.get(k, k) for k in kinds)
            yield _Finding(path, _type_message(name, kinds, wanted, error.instance))
        elif error.validator == "pattern" and "propertyNames" in error.schema_path:
            message = (
                f"{error.instance!r} is not a param name: params are keyword arguments of the "
                "entry point; use letters, digits and '_', not starting with a digit"
            )
            yield _Finding((*path, error.instance), message, at_key=True)
        elif error.validator == "pattern":
            hint = _PATTERN_HINTS.get(name, f"must match {error.validator_value}")
            yield _Finding(path, f"{error.instance!r} {hint}")
        elif error.validator in ("minimum", "maximum"):
            word = "at least" if error.validator == "minimum" else "at most"
            yield _Finding(path, f"must be {word} {error.validator_value}, not {error.instance}")
        elif error.validator == "format" and error.validator_value == "date":
            message = f"{error.instance!r} is not a date; write YYYY-MM-DD, e.g. 2026-01-31"
            yield _Finding(path, message)
        elif error.validator == "minLength":
            example = (error.schema.get("examples") or [None])[0]
            hint = f"; write e.g. {name}: {example}" if example else ""
            yield _Finding(path, f"must not be empty{hint}")
        elif error.validator == "anyOf":
            words = next((o["enum"] for o in error.validator_value if "enum" in o), None)
            wanted = (
                f"one of {', '.join(words)} (or a list of them)"
                if words
                else "a string or a list of strings"
            )
            yield _Finding(path, f"must be {wanted}, not {_describe(error.instance)}")
        else:
            yield _Finding(path, error.message)


def _suggest(key: Any, allowed: list[str]) -> str:
    alias = _KNOWN_ALIASES.get(str(key).lower())
    if alias in allowed:
        return f"did you mean {alias!r}?"
    close = difflib.get_close_matches(str(key).lower().replace("-", "_"), allowed, n=1)
    return f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"


def _add_hint(missing: str, prop: dict[str, Any]) -> str:
    if missing in _EXAMPLE_VALUES:
        return f"add e.g. {missing}: {_EXAMPLE_VALUES[missing]}"
    if prop.get("examples"):
        return f"add e.g. {missing}: {prop['examples'][0]}"
    return f"add {missing}: ..."


def _type_message(name: str, kinds: list[str], wanted: str, value: Any) -> str:
    """'must be X, not Y' plus what to write, for the mistakes YAML makes easy."""
    message = f"must be {wanted}, not {_describe(value)}"
    if "string" in kinds and isinstance(value, (int, float, bool)):
        if name in _PATTERN_HINTS:
            return f"{message}; it {_PATTERN_HINTS[name]}"
        return f"{message}; put the value in quotes so YAML keeps it as text"
    if "integer" in kinds and isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return f"{message}; write the number without quotes"
    if "integer" in kinds and isinstance(value, float):
        return f"{message}; write a whole number"
    if "boolean" in kinds and isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return f"{message}; write true or false without quotes"
    if "array" in kinds and isinstance(value, (str, int, float)):
        return f"{message}; write a list, e.g. [{value}]"
    if value is None:
        return f"{message}; write a value after the ':' or remove the key"
    if "object" in kinds and name in _EXAMPLE_VALUES:
        return f"{message}; write e.g. {name}: {_EXAMPLE_VALUES[name]}"
    if "object" in kinds and name == "params":
        return f"{message}; write name: value pairs, e.g. params: {{chunks: 64}}"
    return message


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null (an empty value)"
    return f"{kind.get(type(value), type(value).__name__)} ({value!r})"


def _problem(doc: YamlFile, finding: _Finding) -> SpecProblem:
    """The finding located in the file; a missing key at the mapping that should hold it."""
    at = finding.field[:-1] if finding.missing else finding.field
    line, column = doc.locate(at, key=finding.at_key and bool(at))
    return SpecProblem(doc.path, finding.message, line, column, ".".join(map(str, finding.field)))


def _locate(doc: YamlFile, path: FieldPath, message: str, key: bool = False) -> SpecProblem:
    line, column = doc.locate(path, key=key)
    return SpecProblem(doc.path, message, line, column, ".".join(map(str, path)))
