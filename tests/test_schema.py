import json
import re
import subprocess
from typing import Any

import jsonschema

from dagfactory.backends import BUILTIN
from dagfactory.cli import main
from dagfactory.spec.schema import (
    editor_schema,
    installed_schema_path,
    locate_schema,
    pipeline_schema,
    schema_text,
)
from tests.conftest import ROOT

REGENERATE = (
    "run: .venv/bin/dagfactory schema --write schemas/pipeline.schema.json && "
    ".venv/bin/dagfactory schema --write dagfactory/pipeline.schema.json"
)


def test_checked_in_schema_matches_the_dataclasses():
    checked_in = (ROOT / "schemas" / "pipeline.schema.json").read_text()
    assert checked_in == schema_text(), REGENERATE


def test_the_package_ships_the_same_schema():
    """`dagfactory new` copies the installed file into repositories that have none."""
    assert installed_schema_path() == ROOT / "dagfactory" / "pipeline.schema.json"
    assert installed_schema_path().read_text() == schema_text(), REGENERATE


def _subschemas(schema: Any, path: str = "$"):
    """Every schema object inside schema, with where it is (property names are not schemas)."""
    if not isinstance(schema, dict):
        return
    yield path, schema
    for key in ("additionalProperties", "items", "propertyNames", "if", "then", "else"):
        yield from _subschemas(schema.get(key), f"{path}.{key}")
    for key in ("anyOf", "oneOf", "allOf"):
        for i, sub in enumerate(schema.get(key, ())):
            yield from _subschemas(sub, f"{path}.{key}[{i}]")
    for key in ("properties", "$defs"):
        for name, sub in schema.get(key, {}).items():
            yield from _subschemas(sub, f"{path}.{name}")


def test_no_null_defaults_they_break_editor_completion():
    """yaml-language-server 1.25 completes nothing at all in a schema with a null default."""
    nulls = [p for p, s in _subschemas(editor_schema()) if "default" in s and s["default"] is None]
    assert nulls == []


def test_every_pattern_has_words_for_the_editor():
    """The YAML language server shows patternErrorMessage instead of the regex."""
    patterns = [(p, s) for p, s in _subschemas(editor_schema()) if "pattern" in s]
    assert len(patterns) >= 5
    for path, sub in patterns:
        message = sub.get("patternErrorMessage", "")
        assert message and not re.search(r"[\\^$]", message), (path, message)
        assert "e.g." in message, (path, message)


def test_every_property_has_markdown_help_with_its_examples():
    schema = editor_schema()
    for obj in [schema, *schema["$defs"].values()]:
        for name, prop in obj["properties"].items():
            text = prop["markdownDescription"]
            assert text.startswith(prop["description"]), name
            if prop.get("examples") and "enum" not in prop:
                assert f"```yaml\n{name}: " in text, name


def test_the_editor_knows_the_builtin_backends_and_validation_accepts_installed_ones():
    good = {"source": {"git": "x"}, "entrypoint": "a.b:c", "cluster": {"backend": "k8s"}}
    backend = editor_schema()["$defs"]["cluster"]["properties"]["backend"]
    assert backend["enum"] == list(BUILTIN)
    assert "entry point" in backend["description"]
    editor = jsonschema.Draft202012Validator(editor_schema())
    assert list(editor.iter_errors(good))
    assert "enum" not in pipeline_schema()["$defs"]["cluster"]["properties"]["backend"]
    assert not list(jsonschema.Draft202012Validator(pipeline_schema()).iter_errors(good))


def test_new_finds_the_repository_schema_from_a_nested_pipelines_folder(tmp_path, capsys):
    subprocess.run(["git", "init", "--quiet", str(tmp_path)], check=True)
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "pipeline.schema.json").write_text("{}\n")
    folder = tmp_path / "teams" / "sales" / "pipelines"
    code = main(["new", "rollup", "--git", "x", "--entrypoint", "a:b", "--dir", str(folder)])
    assert code == 0
    first = (folder / "rollup.yml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../../../schemas/pipeline.schema.json"
    assert (tmp_path / "schemas" / "pipeline.schema.json").read_text() == "{}\n"
    assert not (folder.parent / "schemas").exists()
    assert "differs from this dagfactory's schema" in capsys.readouterr().err


def test_new_writes_the_schema_beside_the_pipelines_folder(tmp_path):
    subprocess.run(["git", "init", "--quiet", str(tmp_path)], check=True)
    placed = locate_schema(tmp_path / "pipelines")
    assert placed.path == tmp_path / "schemas" / "pipeline.schema.json"
    assert placed.reference == "../schemas/pipeline.schema.json" and not placed.exists
    # A repository that is its pipelines folder keeps the schema inside it.
    inside = locate_schema(tmp_path)
    assert inside.reference == "schemas/pipeline.schema.json"
    assert main(["new", "a", "--git", "x", "--entrypoint", "a:b", "--dir", str(tmp_path)]) == 0
    assert (tmp_path / "schemas" / "pipeline.schema.json").read_text() == schema_text()


def test_new_writes_nothing_when_the_pipeline_is_refused(tmp_path):
    code = main(["new", "bad", "--git", "ext::sh", "--entrypoint", "a:b", "--dir", str(tmp_path)])
    assert code == 1
    assert not (tmp_path.parent / "schemas").exists() and not (tmp_path / "bad.yml").exists()


def test_schema_path_prints_the_installed_file(capsys):
    assert main(["schema", "--path"]) == 0
    assert capsys.readouterr().out.strip() == str(installed_schema_path())


def test_schema_is_a_valid_draft_2020_12_schema():
    schema = pipeline_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def test_every_field_is_described():
    schema = json.loads(schema_text())
    objects = [schema, *schema["$defs"].values()]
    for obj in objects:
        for name, prop in obj["properties"].items():
            assert prop.get("description"), name


def test_required_fields_and_strictness():
    schema = pipeline_schema()
    # entrypoint or stages: validate's own rule says which is missing, the editor file oneOf
    assert schema["required"] == ["source"]
    assert editor_schema()["oneOf"] == [{"required": ["entrypoint"]}, {"required": ["stages"]}]
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["source"]["required"] == ["git"]
    validator = jsonschema.Draft202012Validator(schema)
    good = {"source": {"git": "x"}, "entrypoint": "a.b:c", "cluster": {"workers": 3}}
    assert not list(validator.iter_errors(good))
    assert list(validator.iter_errors({**good, "cluster": {"workers": "3"}}))


def _check_jsonschema(*files: str):
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(sys.executable).parent / "check-jsonschema"
    return subprocess.run(
        [str(tool), "--schemafile", "schemas/pipeline.schema.json", *files],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_check_jsonschema_accepts_the_example_pipeline():
    out = _check_jsonschema("pipelines/wordcount.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_check_jsonschema_rejects_invalid_corpus_files():
    out = _check_jsonschema(
        "tests/invalid/workers_zero.yml", "tests/invalid/schema_unknown_n_workers.yml"
    )
    assert out.returncode == 1
    assert "workers_zero.yml::$.cluster.workers: 0 is less than the minimum of 1" in out.stdout
    assert "'n_workers' was unexpected" in out.stdout


def test_the_example_pipeline_names_the_schema_for_the_yaml_language_server():
    first = (ROOT / "pipelines" / "wordcount.yml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../schemas/pipeline.schema.json"


def test_every_field_an_editor_can_complete_has_examples():
    schema = json.loads(schema_text())
    missing = [
        f"{obj['description'].split(':')[0]}: {name}"
        for obj in [schema, *schema["$defs"].values()]
        for name, prop in obj["properties"].items()
        if "$ref" not in prop and prop.get("type") != "boolean"
        if not (prop.get("examples") or prop.get("enum"))
    ]
    assert missing == [], "add examples= to these fields in dagfactory/spec/pipeline.py"
