"""Params: typed by their default or their long form, read and checked alike everywhere."""

import pytest

from dagfactory.errors import ParamError, SpecError
from dagfactory.spec.load import load_file
from dagfactory.spec.params import check_values, json_schema, parse_text
from tests.conftest import write_pipeline

PIPELINE = """
source: {git: .}
entrypoint: job:main
params:
  label: "{{ ds }}"
  chunks: {default: 64, type: integer, minimum: 1, description: Pieces to split into}
  ratio: 0.5
  dry_run: false
  days: [1, 2]
  mode: {default: fast, enum: [fast, exact]}
  anything: null
"""


@pytest.fixture
def spec(tmp_path):
    return load_file(write_pipeline(tmp_path, "p", PIPELINE))


def test_types_come_from_the_default_or_the_long_form(spec):
    schemas = {name: json_schema(p) for name, p in spec.param_specs.items()}
    assert schemas == {
        "label": {"type": "string"},
        "chunks": {"type": "integer", "minimum": 1, "description": "Pieces to split into"},
        "ratio": {"type": "number"},
        "dry_run": {"type": "boolean"},
        "days": {"type": "array"},
        "mode": {"type": "string", "enum": ["fast", "exact"]},
        "anything": {},
    }
    assert spec.param_defaults["chunks"] == 64 and spec.param_defaults["mode"] == "fast"


@pytest.mark.parametrize(
    "name, text, value",
    [
        ("label", "{{ ds }}", "{{ ds }}"),  # not YAML: braces are text
        ("label", "@daily", "@daily"),
        ("label", "2026-01-01", "2026-01-01"),  # not a date
        ("label", "no", "no"),  # not false
        ("label", "0755", "0755"),  # not 493
        ("label", "[1,", "[1,"),
        ("label", "!!python/object:os.system", "!!python/object:os.system"),
        ("chunks", "0755", 755),  # decimal, as written
        ("chunks", "12", 12),
        ("ratio", "2", 2),
        ("ratio", "1e3", 1000.0),
        ("dry_run", "true", True),
        ("days", "[3, 4]", [3, 4]),
        ("anything", '{"a": 1}', {"a": 1}),
        ("anything", "plain words", "plain words"),
    ],
)
def test_command_line_text_is_read_by_the_params_type(spec, name, text, value):
    parsed = parse_text(name, text, spec.param_specs[name])
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("chunks", "abc", "param 'chunks': 'abc' is not an integer; write e.g. -p NAME=64"),
        ("ratio", "nan", "param 'ratio': 'nan' is not a number"),
        ("ratio", "inf", "param 'ratio': 'inf' is not a number"),
        ("dry_run", "no", "param 'dry_run': 'no' is not true or false"),
        ("days", "[1,", "param 'days': '[1,' is not a list"),
    ],
)
def test_text_that_is_not_of_the_type_is_refused_in_words(spec, name, text, message):
    with pytest.raises(ParamError) as err:
        parse_text(name, text, spec.param_specs[name])
    assert str(err.value).startswith(message)


def test_values_are_checked_against_the_schema_and_unknown_names_refused(spec):
    merged = check_values(spec.param_specs, {"chunks": 8}, spec.origin)
    assert merged["chunks"] == 8 and merged["mode"] == "fast"
    with pytest.raises(ParamError) as err:
        check_values(spec.param_specs, {"chunks": 0, "mode": "slow", "chunk": 3}, "p.yml")
    text = str(err.value)
    assert "'chunk': not a param of p.yml; declared params: label, chunks" in text
    assert "param 'chunks': must be at least 1, not 0" in text
    assert 'param \'mode\': must be one of "fast", "exact", not "slow"' in text
    with pytest.raises(ParamError, match="param 'chunks': must be an integer, not \"abc\""):
        check_values(spec.param_specs, {"chunks": "abc"}, "p.yml")


@pytest.mark.parametrize(
    "params, line_col, message",
    [
        ("{n: {default: 1, tpye: integer}}", "6:26", "unknown key 'tpye'; did you mean 'type'?"),
        ("{n: {default: abc, type: integer}}", "6:14", "the default must be an integer"),
        ("{n: {default: null, type: integer}}", "6:14", "add 'null' to type"),
        ("{n: {default: 1, type: int}}", "6:32", "type: must be one of string, integer,"),
        ("{2x: 1}", "6:10", "'2x' is not a param name: params are keyword arguments"),
        ("{n: {default: a, pattern: '['}}", "6:10", "'[' is not a 'regex'"),
    ],
)
def test_a_long_form_that_cannot_work_is_a_located_error(tmp_path, params, line_col, message):
    path = write_pipeline(
        tmp_path, "p", f"source: {{git: .}}\nentrypoint: job:main\n\n\n\nparams: {params}\n"
    )
    with pytest.raises(SpecError) as err:
        load_file(path)
    text = str(err.value)
    assert f"p.yml:{line_col}: error:" in text and message in text, text


def test_schema_errors_and_rule_errors_are_reported_in_one_pass(tmp_path):
    path = write_pipeline(
        tmp_path,
        "p",
        """
        schedule: "@daly"
        source: {git: .}
        entrypoint: job:main
        cluster: {workers: two, backend: existing, address: tcp://h:8786, cpu: 2}
        """,
    )
    with pytest.raises(SpecError) as err:
        load_file(path)
    fields = [p.field for p in err.value.problems]
    assert fields == ["schedule", "cluster.workers", "cluster.cpu"], str(err.value)
    assert "unknown preset '@daly'; did you mean '@daily'?" in str(err.value)
    assert "'cpu' has no effect there" in str(err.value)


def test_a_long_form_list_default_is_an_array(tmp_path):
    from dagfactory.spec.load import load_file
    from tests.conftest import write_pipeline

    path = write_pipeline(
        tmp_path,
        "lists",
        """
        source: {git: x}
        entrypoint: a.b:c
        params:
          regions: {default: [eu, us], type: array, items: {type: string}}
        """,
    )
    spec = load_file(path)
    assert spec.param_defaults == {"regions": ["eu", "us"]}
