"""Airflow 3 Assets between pipelines: `outlets` and `schedule: {assets: ...}`.

The URI rules of `dagfactory validate` (a pure function, no Airflow) are held against Airflow's
own `Asset`; the DAGs are checked for the run task's outlets and the schedule of every form; and
under real Airflow services an upstream pipeline's successful run starts its downstream one.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from dagfactory.dag.build import asset, build_dag
from dagfactory.errors import SpecError
from dagfactory.spec.checks import asset_uri_problem
from dagfactory.spec.load import load_file
from dagfactory.spec.schema import editor_schema, pipeline_schema
from tests.conftest import make_repo, write_pipeline
from tests.test_build import _SERIALIZE
from tests.test_validate_properties import SETTINGS, _check_load, mutations, values

HEAD = "source: {git: https://example.com/acme/jobs.git}\nentrypoint: jobs.main:run\n"

# --- the URI rules against Airflow's Asset -------------------------------------------------------

# Accepted by both.
GOOD = [
    "s3://acme/sales/",
    "s3://acme/sales",
    "S3://Acme/sales",
    "s3://acme",
    "file:///tmp/data/sales",
    "file://host/data",
    "gs://bucket/x",
    "https://example.com/api/sales?b=1&a=2#frag",
    "postgres://db:5432/warehouse/public/sales",
    "redshift://cluster:5439/dev/public/sales",
    "redshift://cluster/dev/public/sales",
    "x-warehouse://sales",
    "x-team:anything-at-all",
    "sales_daily",
    "sales.daily-v2",
    "ssh://git@host/path",
    "s3://b/" + "k" * 1400,
    "s3://acme/ünïcode",
]
# Refused by both.
BAD = [
    "",
    "   ",
    "airflow://x",
    "AIRFLOW://x",
    "Airflow:x",
    "s3://",
    "s3:///key",
    "s3:key",
    "redshift://cluster:5439/dev/sales",
    "redshift:///dev/public/sales",
    "redshift://cluster:port/dev/public/sales",
    "self",
    "context",
    "s3://b/" + "k" * 1500,
    "s3://[bad/x",
]
# Accepted by Airflow, which would quietly change or keep them; refused by dagfactory.
STRICTER = [
    " s3://acme/sales",  # the name keeps the space, the URI loses it
    "s3://acme/sales\n",
    "\ts3://acme/sales",
    "s3://acme/my sales",
    "s3://acme/\x00",
    "http://user:secret@host/x",  # Airflow drops the password with a warning
    "x-kind://user:secret@host/x",  # ... and keeps it in an x- URI
    "s3//acme/sales",  # a scheme that lost its ':'
    "acme/sales",
    "://sales",
]


def airflow_accepts(uri: str) -> bool:
    """Airflow's verdict on a URI, as the DAG processor builds it (warnings are not refusals)."""
    from airflow.sdk import Asset

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Asset(uri=uri)
    except (ValueError, TypeError):
        return False
    return True


@pytest.mark.parametrize("uri", GOOD)
def test_uris_airflow_accepts_are_accepted(uri):
    assert airflow_accepts(uri)
    assert asset_uri_problem(uri) is None


@pytest.mark.parametrize("uri", BAD)
def test_uris_airflow_refuses_are_refused_with_a_reason(uri):
    assert not airflow_accepts(uri)
    assert asset_uri_problem(uri)


@pytest.mark.parametrize("uri", STRICTER)
def test_uris_airflow_would_change_quietly_are_refused(uri):
    assert airflow_accepts(uri)
    assert asset_uri_problem(uri)


_SCHEMES = st.sampled_from(["s3", "S3", "file", "redshift", "airflow", "x-a", "http", "gs", ""])
_URI_TEXT = st.lists(
    st.sampled_from([*"ab/:@?#=&.-_%[] \t\x00é", "//", "://", "self", "context"]), max_size=12
).map("".join)


@SETTINGS
@given(_SCHEMES, st.sampled_from(["://", ":", ""]), _URI_TEXT)
def test_every_uri_dagfactory_accepts_airflow_accepts(scheme, separator, rest):
    uri = f"{scheme}{separator}{rest}"
    if asset_uri_problem(uri) is None:
        assert airflow_accepts(uri), uri


def test_an_asset_is_named_by_its_normalized_uri():
    """Airflow matches assets by name and URI: a trailing '/' must not make a second asset."""
    assert asset("s3://acme/sales/") == asset("s3://acme/sales") == asset("S3://acme/sales")
    assert asset("s3://acme/sales/").name == "s3://acme/sales"
    assert asset("file:///tmp/x/").uri == "file:///tmp/x"


# --- validation, located --------------------------------------------------------------------------


def _problems(tmp_path: Path, text: str) -> list[tuple[int, int, str, str]]:
    path = write_pipeline(tmp_path, "p", HEAD + text)
    with pytest.raises(SpecError) as err:
        load_file(path)
    return [(p.line, p.column, p.field, p.message) for p in err.value.problems]


def _only(problems: list[tuple[int, int, str, str]]) -> tuple[int, int, str, str]:
    assert len(problems) == 1, problems
    return problems[0]


def test_outlets_each_bad_uri_at_its_place(tmp_path):
    problems = _problems(tmp_path, "outlets: [s3://ok/x, airflow://y, 's3://a b', s3:///k]\n")
    assert [(line, col, field) for line, col, field, _ in problems] == [
        (3, 22, "outlets.1"),
        (3, 35, "outlets.2"),
        (3, 47, "outlets.3"),
    ]
    assert "airflow:// scheme" in problems[0][3]
    assert "space" in problems[1][3]
    assert "bucket" in problems[2][3]


def test_outlets_must_be_a_list(tmp_path):
    line, col, field, message = _only(_problems(tmp_path, "outlets: s3://acme/sales\n"))
    assert (line, col, field) == (3, 10, "outlets")
    assert "write a list, e.g. [s3://acme/sales]" in message


def test_unknown_key_in_the_schedule_mapping_gets_a_did_you_mean(tmp_path):
    text = "schedule:\n  crn: '0 3 * * *'\n  assets: [s3://a/x]\n"
    assert _only(_problems(tmp_path, text))[:3] == (4, 3, "schedule.crn")
    assert "did you mean 'cron'?" in _only(_problems(tmp_path, text))[3]
    text = "schedule:\n  asset: [s3://a/x]\n"
    messages = [m for *_, m in _problems(tmp_path, text)]
    assert any("unknown key 'asset'; did you mean 'assets'?" in m for m in messages), messages
    assert any("missing required key 'assets'" in m for m in messages), messages


def test_unknown_key_in_a_condition_gets_a_did_you_mean(tmp_path):
    text = "schedule:\n  assets:\n    all:\n      - s3://a/x\n      - {ani: [s3://a/y]}\n"
    line, col, field, message = _only(_problems(tmp_path, text))
    assert (line, col, field) == (7, 10, "schedule.assets.all.1.ani")
    assert "did you mean 'any'?" in message


def test_a_condition_is_any_or_all_not_both(tmp_path):
    text = "schedule: {assets: {any: [s3://a/x], all: [s3://a/y]}}\n"
    line, _, field, message = _only(_problems(tmp_path, text))
    assert (line, field) == (3, "schedule.assets.all")
    assert "either any or all, not both" in message and "nest" in message


def test_conditions_that_could_never_start_a_run(tmp_path):
    line, _, field, message = _only(_problems(tmp_path, "schedule: {assets: []}\n"))
    assert (line, field) == (3, "schedule.assets") and "empty list" in message
    text = "schedule:\n  assets:\n    - s3://a/x\n    - {all: []}\n"
    line, col, field, message = _only(_problems(tmp_path, text))
    assert (line, col, field) == (6, 7, "schedule.assets.1") and "names no asset" in message


def test_a_bad_uri_deep_in_a_condition_is_located(tmp_path):
    text = (
        "schedule:\n  assets:\n    all:\n      - s3://a/x\n      - any: [s3://a/y, airflow://z]\n"
    )
    line, col, field, message = _only(_problems(tmp_path, text))
    assert (line, col, field) == (7, 25, "schedule.assets.all.1.any.1")
    assert "'airflow://z' is not a valid asset URI" in message


def test_the_cron_beside_assets_is_checked_like_a_schedule(tmp_path):
    text = "schedule: {cron: '0 3 * *', assets: [s3://a/x]}\n"
    line, _, field, message = _only(_problems(tmp_path, text))
    assert (line, field) == (3, "schedule.cron") and "not a cron expression" in message
    text = "schedule: {cron: '@once', assets: [s3://a/x]}\n"
    assert "does not combine with assets" in _only(_problems(tmp_path, text))[3]
    text = "schedule: {cron: '@dayly', assets: [s3://a/x]}\n"
    assert "did you mean '@daily'?" in _only(_problems(tmp_path, text))[3]


def test_the_string_schedule_is_checked_as_before(tmp_path):
    line, col, field, message = _only(_problems(tmp_path, "schedule: '@dayly'\n"))
    assert (line, col, field) == (3, 11, "schedule") and "did you mean '@daily'?" in message


# --- the DAG --------------------------------------------------------------------------------------


def _dag(tmp_path: Path, text: str, name: str = "p"):
    return build_dag(load_file(write_pipeline(tmp_path, name, HEAD + text)))


def _condition(tree) -> object:
    """An Airflow asset condition as plain data: ('all'|'any', [...]) or the asset's URI."""
    from airflow.sdk import Asset, AssetAll, AssetAny

    if isinstance(tree, Asset):
        assert tree.name == tree.uri
        return tree.uri
    kind = {AssetAll: "all", AssetAny: "any"}[type(tree)]
    return kind, [_condition(item) for item in tree.objects]


def test_outlets_go_on_the_run_task_only(tmp_path):
    dag = _dag(tmp_path, "outlets: [s3://acme/sales/, file:///data/x]\n")
    tasks = {t.task_id.split(".")[-1]: t for t in dag.tasks}
    assert [(a.name, a.uri) for a in tasks["run"].outlets] == [
        ("s3://acme/sales", "s3://acme/sales"),
        ("file:///data/x", "file:///data/x"),
    ]
    assert [n for n, t in tasks.items() if t.outlets] == ["run"]
    assert _dag(tmp_path, "", "plain").get_task("pipeline.run").outlets == []


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("{assets: [s3://a/x]}", ("all", ["s3://a/x"])),
        ("{assets: [s3://a/x, s3://a/y/]}", ("all", ["s3://a/x", "s3://a/y"])),
        ("{assets: {any: [s3://a/x, s3://a/y]}}", ("any", ["s3://a/x", "s3://a/y"])),
        ("{assets: {all: [s3://a/x, s3://a/y]}}", ("all", ["s3://a/x", "s3://a/y"])),
        (
            "{assets: {all: [s3://a/x, {any: [s3://a/y, {all: [x-b://1, x-b://2]}]}]}}",
            ("all", ["s3://a/x", ("any", ["s3://a/y", ("all", ["x-b://1", "x-b://2"])])]),
        ),
    ],
)
def test_an_asset_schedule_becomes_airflows_condition(tmp_path, schedule, expected):
    from airflow.sdk.definitions.timetables.assets import AssetTriggeredTimetable

    dag = _dag(tmp_path, f"schedule: {schedule}\n")
    assert isinstance(dag.timetable, AssetTriggeredTimetable)
    assert _condition(dag.timetable.asset_condition) == expected


def test_assets_or_time_becomes_an_asset_or_time_schedule(tmp_path):
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    text = "start_date: 2026-01-01\nschedule: {cron: '0 3 * * *', assets: {any: [s3://a/x]}}\n"
    dag = _dag(tmp_path, text)
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert isinstance(dag.timetable.timetable, CronTriggerTimetable)
    assert dag.timetable.timetable.expression == "0 3 * * *"
    assert str(dag.timetable.timetable.timezone) == "UTC" == str(dag.timezone)
    assert _condition(dag.timetable.asset_condition) == ("any", ["s3://a/x"])
    # A plain cron is what it was: the same kind of timetable, on its own.
    plain = _dag(tmp_path, "start_date: 2026-01-01\nschedule: '0 3 * * *'\n", "plain")
    assert type(plain.timetable) is type(dag.timetable.timetable)
    assert plain.timetable.expression == "0 3 * * *"


def test_the_dag_page_says_what_updates_and_what_starts_it(tmp_path):
    text = (
        "outlets: [s3://acme/sales/]\n"
        "schedule: {cron: '0 3 * * *', assets: {all: [s3://a/x, {any: [s3://a/y, s3://a/z]}]}}\n"
    )
    doc = _dag(tmp_path, text).doc_md
    assert "| outlets | a successful run updates `s3://acme/sales/` |" in doc
    assert (
        "| schedule | every day at 03:00 UTC (`0 3 * * *`), and also when `s3://a/x` and "
        "(`s3://a/y` or `s3://a/z`) are updated |"
    ) in doc
    single = _dag(tmp_path, "schedule: {assets: [s3://a/x]}\n", "single").doc_md
    assert "| schedule | when `s3://a/x` is updated |" in single
    either = _dag(tmp_path, "schedule: {assets: {any: [s3://a/x, s3://a/y]}}\n", "e").doc_md
    assert "| schedule | when `s3://a/x` or `s3://a/y` is updated |" in either
    daily = _dag(tmp_path, "schedule: '@daily'\n", "daily").doc_md
    assert "| schedule | every day at 00:00 UTC (`@daily`) |" in daily


def test_same_yaml_gives_the_same_serialized_dag_under_any_hash_seed(tmp_path):
    path = write_pipeline(
        tmp_path,
        "assets",
        HEAD
        + "outlets: [s3://acme/out/b, s3://acme/out/a]\n"
        + "schedule:\n  cron: '0 3 * * *'\n"
        + "  assets: {all: [s3://a/x, {any: [s3://a/z, s3://a/y]}, x-q://1]}\n",
    )
    outputs = [
        subprocess.run(
            [sys.executable, "-c", _SERIALIZE, str(path)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    ]
    assert outputs[0] == outputs[1]
    dag = json.loads(outputs[0])["dag"]
    timetable = json.dumps(dag["timetable"])
    assert "AssetOrTimeSchedule" in timetable and "0 3 * * *" in timetable
    # Written order is kept: it is the order the UI lists them in.
    assert timetable.index("s3://a/z") < timetable.index("s3://a/y")


# --- schema ---------------------------------------------------------------------------------------

VALID_FORMS = [
    {"schedule": {"assets": ["s3://a/x"]}, "outlets": ["s3://a/y"]},
    {"schedule": {"assets": {"any": ["s3://a/x", {"all": ["s3://a/y", "s3://a/z"]}]}}},
    {"schedule": {"cron": "0 3 * * *", "assets": ["s3://a/x"]}},
    {"schedule": "@daily"},
    {"schedule": None},
]


@pytest.mark.parametrize("form", VALID_FORMS)
def test_both_schemas_accept_every_form(form):
    document = {"source": {"git": "x"}, "entrypoint": "a.b:c", **form}
    for schema in (pipeline_schema(), editor_schema()):
        assert list(jsonschema.Draft202012Validator(schema).iter_errors(document)) == []


def test_the_editor_flags_what_it_can_of_a_uri_and_a_condition():
    editor = jsonschema.Draft202012Validator(editor_schema())
    base = {"source": {"git": "x"}, "entrypoint": "a.b:c"}
    for bad in (
        {"outlets": ["airflow://x"]},
        {"outlets": ["s3://a b"]},
        {"outlets": [""]},
        {"schedule": {"assets": ["s3://a/x", " s3://a/y"]}},
        {"schedule": {"assets": {"any": ["s3://a/x"], "all": ["s3://a/y"]}}},
        {"schedule": {"assets": [{}]}},
        {"schedule": {"assets": {"ani": ["s3://a/x"]}}},
        {"schedule": {"crn": "x", "assets": ["s3://a/x"]}},
    ):
        assert list(editor.iter_errors({**base, **bad})), bad
    # The pipeline schema leaves the URI rules to checks.py, which says why in words.
    validator = jsonschema.Draft202012Validator(pipeline_schema())
    assert not list(validator.iter_errors({**base, "outlets": ["airflow://x"]}))


# --- mutations of asset specs: a spec or located errors -------------------------------------------

ASSET_BASES = [
    {
        "source": {"git": "https://github.com/acme/jobs.git"},
        "entrypoint": "jobs.main:run",
        "outlets": ["s3://acme/sales/", "file:///data/x"],
        "schedule": {
            "cron": "0 3 * * *",
            "assets": {"all": ["s3://a/x", {"any": ["s3://a/y", {"all": ["x-q://1"]}]}]},
        },
    },
    {
        "source": {"git": "https://github.com/acme/jobs.git"},
        "entrypoint": "jobs.main:run",
        "schedule": {"assets": ["s3://a/x", {"any": ["s3://a/y"]}]},
    },
]
_ASSET_KEYS = ["assets", "any", "all", "cron", "outlets", "schedule"]
_ASSET_VALUES = st.one_of(
    values,
    st.sampled_from(["airflow://x", "s3://", " s3://a", "s3//a", "@once", "0 3 * *", [], {}]),
    st.lists(st.sampled_from(["s3://a/x", "", {"any": []}, {"all": ["x"]}]), max_size=3),
).map(copy.deepcopy)  # a sampled list or mapping is one object; a mutation must not alias it


def mutated_asset_data() -> st.SearchStrategy:
    return mutations(ASSET_BASES, st.sampled_from(_ASSET_KEYS), _ASSET_VALUES)


@SETTINGS
@given(mutated_asset_data())
def test_mutated_asset_specs_load_and_build_or_fail_with_located_errors(data):
    _check_load(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode("utf-8"))


# --- end to end: an upstream run's outlets start the downstream pipeline --------------------------

JOB = """
def main(client, day="none"):
    return {"total": client.submit(sum, [1, 2, 3]).result(), "day": day}
"""


@pytest.mark.e2e
def test_an_upstream_runs_asset_event_starts_the_downstream_pipeline(tmp_path):
    from tests.airflow_services import airflow_services

    repo = make_repo(tmp_path / "remotes" / "jobs", {"asset_jobs.py": JOB})
    uri = f"file://{tmp_path}/sales"
    pipelines = tmp_path / "pipelines"
    common = f"source:\n  git: {repo.path}\nentrypoint: asset_jobs:main\ncluster: {{workers: 1}}\n"
    write_pipeline(pipelines, "assets_up", common + f"outlets: ['{uri}/']\n")
    # An asset-triggered run has no logical date, as a manual one: {{ ds }} still renders.
    downstream = f"schedule: {{assets: ['{uri}']}}\nparams: {{day: '{{{{ ds }}}}'}}\n"
    write_pipeline(pipelines, "assets_down", common + downstream)
    with airflow_services(tmp_path / "airflow", pipelines) as services:
        services.wait_parsed("assets_up", "assets_down")
        # Created paused, like every DAG here; an asset event only queues runs of an unpaused one.
        services.api("PATCH", "/dags/assets_down", {"is_paused": False})
        assert services.api("GET", "/dags/assets_down/dagRuns")["dag_runs"] == []
        up = services.trigger("assets_up", f"up_{os.getpid()}")
        assert services.wait_run("assets_up", up) == "success", services.explain("assets_up", up)
        events = services.api("GET", "/assets/events?source_dag_id=assets_up")["asset_events"]
        assert [(e["uri"], e["source_run_id"]) for e in events] == [(uri, up)]

        deadline = time.monotonic() + 120
        runs: list = []
        while not runs and time.monotonic() < deadline:
            runs = services.api("GET", "/dags/assets_down/dagRuns")["dag_runs"]
            if not runs:
                time.sleep(1)
        assert len(runs) == 1, services.tail()
        down = runs[0]["dag_run_id"]
        assert runs[0]["run_type"] == "asset_triggered"
        state = services.wait_run("assets_down", down)
        assert state == "success", services.explain("assets_down", down)
        result = services.xcom("assets_down", down, "run")
        assert result["total"] == 6 and re.fullmatch(r"\d{4}-\d{2}-\d{2}", result["day"]), result
        consumed = services.api("GET", f"/dags/assets_down/dagRuns/{down}/upstreamAssetEvents")
        assert [
            (e["uri"], e["source_dag_id"], e["source_run_id"]) for e in consumed["asset_events"]
        ] == [(uri, "assets_up", up)]


# --- in a real editor (yaml-language-server, as tests/test_editor.py) -----------------------------


@pytest.mark.e2e
def test_the_editor_completes_the_schedule_mapping_and_flags_bad_uris(tmp_path):
    from dagfactory.spec.schema import schema_text
    from tests.test_editor import SCHEMA_LINE, LanguageServer, _server_command

    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "pipeline.schema.json").write_text(schema_text())
    (tmp_path / "pipelines").mkdir()
    server = LanguageServer(_server_command(), tmp_path)
    try:
        server.start(tmp_path, {"yaml": {"validate": True, "hover": True, "completion": True}})

        def opened(name: str, text: str) -> str:
            path = tmp_path / "pipelines" / name
            path.write_text(SCHEMA_LINE + HEAD + text)
            return server.open(path, SCHEMA_LINE + HEAD + text)

        uri = opened("complete.yml", "schedule:\n  \n")
        server.diagnostics(uri)
        assert {"assets", "cron"} <= set(server.completion(uri, 4, 2))
        uri = opened("nested.yml", "schedule:\n  assets:\n    a\n")  # a key begun
        server.diagnostics(uri)
        assert {"any", "all"} <= set(server.completion(uri, 5, 5))
        uri = opened("item.yml", "schedule:\n  assets:\n    - s3://a/x\n    - \n")
        server.diagnostics(uri)
        assert {"any", "all"} <= set(server.completion(uri, 6, 6))

        text = (
            "outlets: [s3://ok/x, airflow://y]\n"  # line 3
            "schedule:\n"
            "  crn: '0 3 * * *'\n"  # line 5
            "  assets: {any: [s3://a/x], all: [s3://a/y]}\n"  # line 6
        )
        found = [
            (d["range"]["start"]["line"], d["message"])
            for d in server.diagnostics(opened("bad.yml", text))
        ]
        lines = {line for line, _ in found}
        assert lines == {3, 5, 6}, found
        assert any("airflow://" in m and "e.g." in m for line, m in found if line == 3), found
        assert any("crn" in m for line, m in found if line == 5), found
        assert server.diagnostics(opened("good.yml", "schedule: {assets: [s3://a/x]}\n")) == []
    finally:
        server.close()
