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
