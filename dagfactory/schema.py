"""JSON Schema (Draft 2020-12) generated from the spec dataclasses.

The generated file is checked in at `schemas/pipeline.schema.json` for editors and CI tools; a
test fails when it drifts from what this module generates.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from datetime import date
from functools import cache
from typing import Any

from dagfactory.spec import ClusterSpec, PipelineSpec, SourceSpec

SCHEMA_ID = "https://dagfactory.dev/schemas/pipeline.schema.json"
_DEFS = {SourceSpec: "source", ClusterSpec: "cluster"}


def _type_schema(hint: Any) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is str:
        return {"type": "string"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is date:
        return {"type": "string"}
    if hint is Any:
        return {}
    if hint in _DEFS:
        return {"$ref": f"#/$defs/{_DEFS[hint]}"}
    if origin is tuple:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1])}
    if origin in (typing.Union, types.UnionType):
        options = [_type_schema(a) for a in args if a is not type(None)]
        nullable = type(None) in args
        if len(options) == 1 and "type" in options[0] and len(options[0]) == 1:
            kinds = [options[0]["type"]] + (["null"] if nullable else [])
            return {"type": kinds if nullable else kinds[0]}
        return {"anyOf": options + ([{"type": "null"}] if nullable else [])}
    raise TypeError(f"no JSON Schema for {hint!r}")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return dataclasses.MISSING
    if dataclasses.is_dataclass(value):
        return dataclasses.MISSING
    return list(value) if isinstance(value, tuple) else value


def _object_schema(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        prop = {"description": f.metadata["description"], **_type_schema(hints[f.name])}
        prop.update(f.metadata.get("schema", {}))
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        elif (default := _default(f)) is not dataclasses.MISSING:
            prop["default"] = default
        properties[f.name] = prop
    schema: dict[str, Any] = {
        "type": "object",
        "description": (cls.__doc__ or "").strip(),
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = required
    return schema


@cache
def pipeline_schema() -> dict[str, Any]:
    """The JSON Schema of a pipeline file."""
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "dagfactory pipeline",
        **_object_schema(PipelineSpec),
        "$defs": {name: _object_schema(cls) for cls, name in _DEFS.items()},
    }
    return schema


def schema_text() -> str:
    """The schema exactly as checked in (stable key order, trailing newline)."""
    return json.dumps(pipeline_schema(), indent=2) + "\n"
