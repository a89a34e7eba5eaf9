"""JSON Schema (Draft 2020-12) generated from the spec dataclasses.

Two readers use it. `dagfactory validate` and the Airflow loader check files against
`pipeline_schema()`. Editors read the file `editor_schema()` writes: the same rules plus what the
YAML language server shows a person typing (words instead of regexes, markdown help, choices to
complete). The file is checked in at `schemas/pipeline.schema.json` and shipped inside the package
(`dagfactory/pipeline.schema.json`, `dagfactory schema --path`) so that `dagfactory new` can give
any pipelines repository a copy; tests fail when either drifts from what this module generates.

Everything here is generic: a field's JSON Schema keywords live in its metadata in `spec.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import types
import typing
from datetime import date
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from dagfactory.spec.pipeline import (
    ASSET_URI_PATTERN,
    DAG_ID_PATTERN,
    DURATION_PATTERN,
    ENTRYPOINT_PATTERN,
    IDENTIFIER_PATTERN,
    SIZE_PATTERN,
    AdaptiveSpec,
    AssetCondition,
    ClusterSpec,
    Keywords,
    ParamSpec,
    PipelineSpec,
    ScheduleSpec,
    SourceSpec,
    StageSpec,
    StepSpec,
)

SCHEMA_ID = "https://dagfactory.dev/schemas/pipeline.schema.json"
SCHEMA_FILE = "pipeline.schema.json"
_DEFS = {
    SourceSpec: "source",
    StageSpec: "stage",
    StepSpec: "step",
    ClusterSpec: "cluster",
    AdaptiveSpec: "adaptive",
    ParamSpec: "param",
    ScheduleSpec: "schedule",
    AssetCondition: "asset_condition",
}

EDITOR_KEY = "editor"
"""Field metadata `schema` key whose keywords go into the editor's file only.

For rules `dagfactory validate` checks more loosely than an editor can, e.g. a closed list of
built-in choices where validation also accepts what plugins add.
"""

# What the editor says when a value does not match a pattern (the YAML language server would
# otherwise show the regex). Keyed by pattern, so a new field reusing a pattern gets its words.
PATTERN_MESSAGES = {
    DURATION_PATTERN: "Write a duration with its unit, e.g. 90s, 30m, 1.5h or 2d.",
    SIZE_PATTERN: "Write a size, e.g. 512MiB or 2GiB.",
    ENTRYPOINT_PATTERN: (
        "Write the function to call as module:function, e.g. wordcount.job:main "
        "(dots between packages, no .py, a colon before the function)."
    ),
    DAG_ID_PATTERN: "Use letters, digits, '_', '.' and '-' only, e.g. sales_rollup.",
    IDENTIFIER_PATTERN: (
        "Use a Python name: letters, digits and '_', not starting with a digit, e.g. chunks."
    ),
    ASSET_URI_PATTERN: (
        "Write an asset URI without spaces, e.g. s3://bucket/sales or file:///data/sales "
        "(the airflow:// scheme is reserved)."
    ),
}


def _type_schema(hint: Any, editor: bool) -> dict[str, Any]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Annotated:
        # A type that carries its own keywords (spec.AssetUri) has them wherever it is used.
        keywords = [_keywords(k.schema, editor) for k in args[1:] if isinstance(k, Keywords)]
        return {**_type_schema(args[0], editor), **{k: v for d in keywords for k, v in d.items()}}
    if hint is str:
        return {"type": "string"}
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer"}
    if hint is float:
        return {"type": "number"}
    if hint is date:
        return {"type": "string"}
    if hint is Any:
        return {}
    if isinstance(hint, type) and hint in _DEFS:
        return {"$ref": f"#/$defs/{_DEFS[hint]}"}
    if origin is tuple:
        return {"type": "array", "items": _type_schema(args[0], editor)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1], editor)}
    if origin in (typing.Union, types.UnionType):
        options = [_type_schema(a, editor) for a in args if a is not type(None)]
        nullable = type(None) in args
        if merged := _with_one_object(options, nullable):
            return merged
        if len(options) == 1 and "type" in options[0] and len(options[0]) == 1:
            kinds = [options[0]["type"]] + (["null"] if nullable else [])
            return {"type": kinds if nullable else kinds[0]}
        return {"anyOf": options + ([{"type": "null"}] if nullable else [])}
    raise TypeError(f"no JSON Schema for {hint!r}")


def _with_one_object(options: list[dict[str, Any]], nullable: bool) -> dict[str, Any] | None:
    """A union of plain types and one spec class, as one schema: `{type: [...], if: object,
    then: class}`.

    With anyOf instead, a mistake inside the mapping fails every option and a validator can
    only say "not any of these"; here it is reported where it is, as the class's own error (an
    unknown key, with a "did you mean"). The keywords of the plain options apply to their own
    type only (items to arrays, pattern to strings), so they merge without conflict.
    """
    refs = [o for o in options if "$ref" in o]
    plain = [o for o in options if "$ref" not in o]
    if len(refs) != 1 or not all(isinstance(o.get("type"), str) for o in plain):
        return None
    kinds = [o["type"] for o in plain]
    if "object" in kinds or len(set(kinds)) != len(kinds):
        return None
    merged: dict[str, Any] = {"type": [*kinds, "object"] + (["null"] if nullable else [])}
    for option in plain:
        merged.update({k: v for k, v in option.items() if k != "type"})
    merged.update({"if": {"type": "object"}, "then": refs[0]})
    return merged


def _keywords(schema: dict[str, Any], editor: bool) -> dict[str, Any]:
    """JSON Schema keywords from spec metadata; those under EDITOR_KEY in the editor's file only."""
    keywords = dict(schema)
    editor_only = keywords.pop(EDITOR_KEY, {})
    return {**keywords, **editor_only} if editor else keywords


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return dataclasses.MISSING
    # A null default is left out: it says nothing a missing default does not, and
    # yaml-language-server 1.25 offers no completion at all in a schema with one.
    if dataclasses.is_dataclass(value) or value is None:
        return dataclasses.MISSING
    return list(value) if isinstance(value, tuple) else value


def _object_schema(cls: type, editor: bool) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    properties: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        prop = {"description": f.metadata["description"], **_type_schema(hints[f.name], editor)}
        prop.update(_keywords(f.metadata.get("schema", {}), editor))
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
        elif (default := _default(f)) is not dataclasses.MISSING:
            prop["default"] = default
        if editor:
            prop.setdefault("markdownDescription", _markdown(f.name, prop))
        properties[f.name] = prop
    schema: dict[str, Any] = {
        "type": "object",
        "description": (cls.__doc__ or "").strip(),
        "properties": properties,
        "additionalProperties": False,
        **_keywords(getattr(cls, "SCHEMA", {}), editor),
    }
    if required:
        schema["required"] = required
    return schema


def _yaml_value(value: Any) -> str:
    # JSON is YAML; flow style keeps each example on the key's line, as people write them.
    return json.dumps(value) if not isinstance(value, str) or _needs_quotes(value) else value


def _needs_quotes(text: str) -> bool:
    import yaml

    try:
        return yaml.safe_load(f"k: {text}") != {"k": text}
    except yaml.YAMLError:
        return True


def _markdown(name: str, prop: dict[str, Any]) -> str:
    """Hover text: the description, the default and examples written as YAML lines."""
    parts = [prop["description"]]
    if "default" in prop:
        parts.append(f"Default: `{_yaml_value(prop['default'])}`")
    if "enum" in prop:
        parts.append("One of: " + ", ".join(f"`{_yaml_value(v)}`" for v in prop["enum"]))
    elif examples := prop.get("examples"):
        lines = "\n".join(f"{name}: {_yaml_value(e)}" for e in examples)
        parts.append(f"Example{'s' if len(examples) > 1 else ''}:\n```yaml\n{lines}\n```")
    return "\n\n".join(parts)


_SUBSCHEMA_KEYS = ("additionalProperties", "items", "propertyNames", "if", "then", "else", "not")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "patternProperties")


def _add_pattern_messages(schema: Any) -> None:
    """Put words next to every pattern, in every subschema (not in property names)."""
    if not isinstance(schema, dict):
        return
    if isinstance(schema.get("pattern"), str):
        schema.setdefault(
            "patternErrorMessage",
            PATTERN_MESSAGES.get(schema["pattern"], _pattern_fallback(schema)),
        )
    for key in _SUBSCHEMA_KEYS:
        _add_pattern_messages(schema.get(key))
    for key in _SUBSCHEMA_LISTS:
        for sub in schema.get(key, ()):
            _add_pattern_messages(sub)
    for key in _SUBSCHEMA_MAPS:
        for sub in schema.get(key, {}).values():
            _add_pattern_messages(sub)


def _pattern_fallback(schema: dict[str, Any]) -> str:
    examples = [str(e) for e in schema.get("examples", ()) if isinstance(e, str) and e]
    if examples:
        return "Not in the expected form; write e.g. " + " or ".join(examples[:3]) + "."
    return "Not in the expected form; see the field's description."


def _schema(editor: bool) -> dict[str, Any]:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "dagfactory pipeline",
        **_object_schema(PipelineSpec, editor),
        "$defs": {name: _object_schema(cls, editor) for cls, name in _DEFS.items()},
    }
    if editor:
        _add_pattern_messages(schema)
    return schema


@cache
def pipeline_schema() -> dict[str, Any]:
    """The JSON Schema `dagfactory validate` and the loader check a pipeline file against."""
    return _schema(editor=False)


@cache
def _editor_schema() -> dict[str, Any]:
    return _schema(editor=True)


def editor_schema() -> dict[str, Any]:
    """The schema file for editors and check-jsonschema: pipeline_schema() and editor help."""
    return copy.deepcopy(_editor_schema())


def schema_text() -> str:
    """The schema file exactly as checked in (stable key order, trailing newline)."""
    return json.dumps(_editor_schema(), indent=2) + "\n"


def installed_schema_path() -> Path:
    """The schema file shipped inside the installed package (identical to schema_text())."""
    return Path(str(files("dagfactory").joinpath(SCHEMA_FILE)))


@dataclasses.dataclass(frozen=True)
class SchemaPlacement:
    """Where a pipelines folder's files find the schema file, for their modeline."""

    path: Path
    reference: str
    """The path relative to the pipelines folder, with '/' (what the modeline says)."""
    exists: bool
    """The repository has the file; if not, `write_schema(path)` gives it one."""
    stale: bool = False
    """The repository's file differs from this dagfactory's schema."""


def locate_schema(folder: Path) -> SchemaPlacement:
    """The repository's `schemas/pipeline.schema.json` for `folder`'s files, or where to put one.

    Looks in `folder` and each parent up to the git root (outside git: only `folder` and its
    parent). When there is none, the place is `schemas/` beside the pipelines folder, the
    layout of this repository, so that every file's modeline reads
    `../schemas/pipeline.schema.json` and the folder holds only pipeline files; if the
    pipelines folder is the root of its repository, `schemas/` inside it. The reference is
    always relative: it works in every clone and for everyone, unlike a path to where
    dagfactory happens to be installed.
    """
    folder = folder.resolve()
    root = next((d for d in (folder, *folder.parents) if (d / ".git").exists()), None)
    levels = [folder, folder.parent] if root is None else [folder, *folder.parents]
    if root is not None:
        levels = levels[: levels.index(root) + 1]
    for level in levels:
        found = level / "schemas" / SCHEMA_FILE
        if found.is_file():
            stale = found.read_text() != schema_text()
            return SchemaPlacement(found, _relative(found, folder), True, stale)
    home = folder if folder == root else folder.parent
    target = home / "schemas" / SCHEMA_FILE
    return SchemaPlacement(target, _relative(target, folder), False)


def write_schema(path: Path) -> None:
    """Write the schema file (and its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(schema_text())


def _relative(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()
