import json

import jsonschema

from dagfactory.schema import pipeline_schema, schema_text
from tests.conftest import ROOT


def test_checked_in_schema_matches_the_dataclasses():
    checked_in = (ROOT / "schemas" / "pipeline.schema.json").read_text()
    assert checked_in == schema_text(), (
        "run: dagfactory schema --write schemas/pipeline.schema.json"
    )


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
    assert schema["required"] == ["source", "entrypoint"]
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
    for obj in [schema, *schema["$defs"].values()]:
        for name, prop in obj["properties"].items():
            if "$ref" in prop or prop.get("type") == "boolean":
                continue
            assert prop.get("examples") or prop.get("enum"), name
