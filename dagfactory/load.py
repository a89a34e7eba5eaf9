"""Pipeline files in, typed specs and located errors out.

One bad file never hides another: `load_folder` returns every valid spec *and* every problem.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import Any

import dacite
import jsonschema

from dagfactory.checks import FieldPath, check_spec
from dagfactory.errors import SpecError, SpecProblem
from dagfactory.schema import pipeline_schema
from dagfactory.spec import PipelineSpec
from dagfactory.yamlfile import YamlFile, read_yaml

DEFAULTS_FILE = "defaults.yml"
SUFFIXES = (".yml", ".yaml")

# What a pattern-checked field must look like, in words.
_PATTERN_HINTS = {
    "entrypoint": "must be module:function, e.g. wordcount.job:main",
    "timeout": "must be a duration such as 90s, 30m, 1h or 1h30m",
    "idle_timeout": "must be a duration such as 90s, 30m, 1h or 1h30m",
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


def read_defaults(folder: Path) -> dict[str, Any]:
    """`defaults.yml` of a pipelines folder, merged under every spec in it (empty if absent)."""
    path = folder / DEFAULTS_FILE
    return read_yaml(path).data if path.is_file() else {}


def load_folder(folder: str | Path, shown_as: str | None = None) -> LoadResult:
    """Load every pipeline file of a folder; never raises for a user's mistake."""
    folder = Path(folder)
    shown = Path(shown_as) if shown_as is not None else folder
    try:
        defaults = read_defaults(folder)
    except SpecError as exc:
        return LoadResult((), exc.problems)
    return load_files(((p, str(shown / p.name)) for p in pipeline_files(folder)), defaults)


def load_files(files: Iterable[tuple[Path, str]], defaults: dict[str, Any]) -> LoadResult:
    """Load (path, name shown in messages) pairs, then check DAG ids are unique across them."""
    specs: list[PipelineSpec] = []
    problems: list[SpecProblem] = []
    first_seen: dict[str, str] = {}
    for path, shown in files:
        try:
            spec = load_file(path, defaults, shown_as=shown)
        except SpecError as exc:
            problems.extend(exc.problems)
            continue
        if spec.dag_id in first_seen:
            problems.append(
                SpecProblem(
                    shown,
                    f"DAG id {spec.dag_id!r} is already used by {first_seen[spec.dag_id]}; "
                    "rename the file or set a different dag_id",
                    1,
                    1,
                    "dag_id",
                )
            )
            continue
        first_seen[spec.dag_id] = shown
        specs.append(spec)
    return LoadResult(tuple(specs), tuple(problems))


def load_file(
    path: str | Path, defaults: dict[str, Any] | None = None, shown_as: str | None = None
) -> PipelineSpec:
    """Read, validate and type one pipeline file. Raises SpecError with every problem found."""
    path = Path(path)
    doc = read_yaml(path, shown_as)
    data = _merge(defaults or {}, doc.data)
    data.setdefault("dag_id", path.name.rsplit(".", 1)[0])
    data = _jsonable(data)
    problems = [_locate(doc, f, m, key) for f, key, m in _schema_findings(data)]
    if problems:
        raise SpecError(sorted(problems, key=lambda p: (p.line, p.column)))
    spec = dacite.from_dict(
        PipelineSpec,
        data,
        config=dacite.Config(
            strict=True,
            cast=[tuple],
            type_hooks={date: date.fromisoformat},
        ),
    )
    spec = dataclasses.replace(spec, origin=str(path.resolve()))
    problems = [_locate(doc, f, m) for f, m in check_spec(spec)]
    if problems:
        raise SpecError(problems)
    return spec


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


def _schema_findings(data: dict[str, Any]) -> Iterator[tuple[FieldPath, bool, str]]:
    """(field path, whether to point at its key, message) for each schema violation."""
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    for error in errors:
        path = tuple(error.absolute_path)
        name = str(path[-1]) if path else ""
        if error.validator == "additionalProperties":
            allowed = list(error.schema.get("properties", {}))
            for key in sorted(set(error.instance) - set(allowed), key=str):
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
                yield (*path, key), True, f"unknown key {key!r}; {hint}"
        elif error.validator == "required":
            missing = error.message.split("'")[1]
            yield path, True, f"missing required key {missing!r}"
        elif error.validator == "type":
            expected = error.validator_value
            kinds = [expected] if isinstance(expected, str) else expected
            wanted = " or ".join(_TYPE_NAMES.get(k, k) for k in kinds)
            yield path, False, f"must be {wanted}, not {_describe(error.instance)}"
        elif error.validator == "pattern":
            hint = _PATTERN_HINTS.get(name, f"must match {error.validator_value}")
            yield path, False, f"{error.instance!r} {hint}"
        elif error.validator in ("minimum", "maximum"):
            word = "at least" if error.validator == "minimum" else "at most"
            yield path, False, f"must be {word} {error.validator_value}, not {error.instance}"
        elif error.validator == "format" and error.validator_value == "date":
            yield path, False, f"{error.instance!r} is not a date; write YYYY-MM-DD"
        elif error.validator == "minLength":
            yield path, False, "must not be empty"
        elif error.validator == "anyOf":
            yield (
                path,
                False,
                f"must be a string or a list of strings, not {_describe(error.instance)}",
            )
        else:
            yield path, False, error.message


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return f"{kind.get(type(value), type(value).__name__)} ({value!r})"


def _locate(doc: YamlFile, path: FieldPath, message: str, key: bool = False) -> SpecProblem:
    line, column = doc.locate(path, key=key)
    return SpecProblem(doc.path, message, line, column, ".".join(map(str, path)))
