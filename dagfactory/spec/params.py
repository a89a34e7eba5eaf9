"""Params: one meaning, typed, everywhere.

A param is declared in the pipeline file, as a plain value or in its long form (a default and JSON
Schema keywords). Its schema is what Airflow's trigger form shows and checks, what the REST API
checks, and what `check_values` checks before anything starts, on the command line and in the
bootstrap task alike, with the same words. A value typed on the command line is read by the
param's type, never by a YAML or Python parser, so `-p label=no` stays the text "no".
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from dagfactory.errors import ParamError
from dagfactory.spec.pipeline import ParamSpec

_TYPE_OF = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"))
_TYPE_WORDS = {
    "string": "text",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}
_SCHEMA_KEYS = tuple(f.name for f in dataclasses.fields(ParamSpec) if f.name != "default")


def type_of(value: Any) -> str | None:
    """The JSON type of a plain value; None for null (a null default says nothing of its type)."""
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    for kind, name in _TYPE_OF:
        if isinstance(value, kind):
            return name
    return None


def is_long_form(value: Any) -> bool:
    """A mapping with a 'default' key is a param's long form (a mapping value goes under it)."""
    return isinstance(value, dict) and "default" in value


def param_spec(value: Any) -> ParamSpec:
    """The long form of a param as written in the file (plain value or long form)."""
    if not is_long_form(value):
        return ParamSpec(default=value, type=type_of(value))
    # Lists of keywords (type, enum, examples) freeze; a default stays the value it is.
    fields = {
        k: tuple(v) if isinstance(v, list) and k != "default" else v for k, v in value.items()
    }
    if fields.get("type") is None:
        fields["type"] = type_of(fields["default"])
    return ParamSpec(**fields)


def json_schema(spec: ParamSpec) -> dict[str, Any]:
    """The JSON Schema of the param's values (Airflow's Param keywords, without the default)."""
    schema: dict[str, Any] = {}
    for key in _SCHEMA_KEYS:
        value = getattr(spec, key)
        if value is None or value == "":
            continue
        schema[key] = list(value) if isinstance(value, tuple) else value
    return schema


def _types(schema: Mapping[str, Any]) -> list[str]:
    kinds = schema.get("type")
    if kinds is None:
        return []
    return [kinds] if isinstance(kinds, str) else list(kinds)


def parse_text(name: str, text: str, spec: ParamSpec) -> Any:
    """A value typed on the command line, read by the param's type.

    Text params take the text as it is; numbers and booleans are read as JSON writes them; lists
    and mappings are JSON; an untyped param takes JSON when the text is JSON, else the text.
    """
    kinds = _types(json_schema(spec))
    if "null" in kinds and text == "null":
        return None
    for kind in [k for k in kinds if k not in ("null", "string")]:
        try:
            return _read(kind, text)
        except ValueError:
            continue
    if "string" in kinds or not kinds:
        if not kinds:
            try:
                return _read("json", text)
            except ValueError:
                pass
        return text
    wanted = " or ".join(_TYPE_WORDS[k] for k in kinds)
    raise ParamError(f"param {name!r}: {text!r} is not {wanted}{_example(kinds)}")


def _read(kind: str, text: str) -> Any:
    stripped = text.strip()
    if kind == "integer":
        if not re.fullmatch(r"[+-]?[0-9]+", stripped):
            raise ValueError(text)
        return int(stripped)
    if kind == "number":
        value = float(stripped)  # raises ValueError itself
        if not math.isfinite(value) or not re.fullmatch(r"[0-9eE+.-]+", stripped):
            raise ValueError(text)
        return int(value) if re.fullmatch(r"[+-]?[0-9]+", stripped) else value
    if kind == "boolean":
        if stripped not in ("true", "false"):
            raise ValueError(text)
        return stripped == "true"
    value = json.loads(text, parse_constant=_no_constant)
    expected = {"array": list, "object": dict}.get(kind)
    if expected is not None and not isinstance(value, expected):
        raise ValueError(text)
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _example(kinds: list[str]) -> str:
    examples = {"integer": "64", "number": "0.5", "boolean": "true", "array": "'[1, 2]'"}
    first = next((examples[k] for k in kinds if k in examples), None)
    return f"; write e.g. -p NAME={first}" if first else ""


def check_values(
    specs: Mapping[str, ParamSpec], values: Mapping[str, Any], origin: str
) -> dict[str, Any]:
    """The params of a run: defaults, then `values`; raises ParamError naming every bad one.

    Undeclared names are refused, not dropped: a typo in a trigger-time conf would otherwise
    run the pipeline with the default without a word.
    """
    import jsonschema

    problems = []
    unknown = sorted(set(values) - set(specs))
    if unknown:
        declared = ", ".join(specs) or "none"
        problems.append(
            f"{', '.join(map(repr, unknown))}: not a param of {origin}; declared params: {declared}"
        )
    merged = {name: values.get(name, spec.default) for name, spec in specs.items()}
    for name, spec in specs.items():
        if name not in values:
            continue  # the default was checked when the file was validated
        validator = jsonschema.Draft202012Validator(json_schema(spec))
        for error in validator.iter_errors(values[name]):
            problems.append(f"param {name!r}: {_describe_error(error)}")
            break
    if problems:
        raise ParamError("; ".join(problems))
    return merged


def _describe_error(error: Any) -> str:
    value = error.instance
    shown = json.dumps(value) if _is_json(value) else repr(value)
    if error.validator == "type":
        wanted = " or ".join(_TYPE_WORDS.get(k, k) for k in _types(error.schema))
        return f"must be {wanted}, not {shown}"
    if error.validator == "enum":
        return (
            f"must be one of {', '.join(json.dumps(v) for v in error.validator_value)}, not {shown}"
        )
    if error.validator in ("minimum", "maximum"):
        word = "at least" if error.validator == "minimum" else "at most"
        return f"must be {word} {error.validator_value}, not {shown}"
    return f"{shown}: {error.message}"


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def schema_problems(name: str, spec: ParamSpec) -> list[tuple[str, str]]:
    """(field, message) for a param whose long form cannot work: a bad schema or default."""
    import jsonschema

    schema = json_schema(spec)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        return [("", f"is not a valid param schema: {exc.message}")]
    problems = []
    if spec.pattern is not None:
        try:
            re.compile(spec.pattern)
        except re.error as exc:
            problems.append(("pattern", f"{spec.pattern!r} is not a regular expression ({exc})"))
    if not problems and isinstance(spec.default, str) and "{{" in spec.default:
        return []  # rendered at run time: only the rendered text could be checked
    if not problems:
        error = next(jsonschema.Draft202012Validator(schema).iter_errors(spec.default), None)
        if error is not None:
            hint = " (add 'null' to type to allow no value)" if spec.default is None else ""
            problems.append(("default", f"the default {_describe_error(error)}{hint}"))
    return problems


_ONE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expression>(?:(?!\{\{|\}\}).)*)\}\}\s*$", re.DOTALL)


def render_step_params(params: dict[str, Any], context: Mapping[str, Any], env: Any) -> Any:
    """A step's params rendered with Jinja `env` over `context` (which holds `steps`).

    A string that is exactly one {{ expression }} becomes the expression's value when that is
    JSON (`{{ steps.count.rows }}` stays a number, a list stays a list); any other string
    is rendered as text, as Airflow renders templates.
    """

    def one(name: str, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: one(name, v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [one(name, v) for v in value]
        if not isinstance(value, str) or "{" not in value:
            return value
        try:
            whole = _ONE_EXPRESSION.match(value)
            if whole:
                result = env.compile_expression(whole["expression"], undefined_to_none=False)(
                    **context
                )
                if _is_json(result) and not _is_undefined(result):
                    return result
            return env.from_string(value).render(**context)
        except Exception as exc:  # Jinja's errors, and what the expression itself raises
            raise ParamError(
                f"param {name!r}: cannot render {value!r}: {type(exc).__name__}: {exc}"
            ) from None

    return {name: one(name, value) for name, value in params.items()}


def _is_undefined(value: Any) -> bool:
    import jinja2

    return isinstance(value, jinja2.Undefined)
