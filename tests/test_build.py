"""The loader file as Airflow's DAG processor sees it, and the DAG each spec becomes."""

import json
import os
import subprocess
import sys

import pytest

from dagfactory.dag.build import INVALID_TAG, build_dag
from dagfactory.spec.load import load_file
from tests.conftest import ROOT, write_pipeline

SPEC = """
    description: test pipeline {n}
    schedule: "@daily"
    start_date: 2026-01-01
    retries: 2
    timeout: 10m
    tags: [team-a]
    source:
      git: https://example.com/acme/jobs.git
      ref: v1.0
    entrypoint: jobs.main:run
    params:
      day: "{{{{ ds }}}}"
      n: {n}
"""


@pytest.fixture
def pipelines(tmp_path, monkeypatch):
    folder = tmp_path / "pipelines"
    for n in range(3):
        write_pipeline(folder, f"job_{n}", SPEC.format(n=n))
    monkeypatch.setenv("DAGFACTORY_PIPELINES_DIR", str(folder))
    return folder


def _dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"), safe_mode=True)


def test_dag_processor_finds_one_dag_per_spec_without_import_errors(pipelines):
    bag = _dagbag()
    assert bag.import_errors == {}
    assert sorted(bag.dag_ids) == ["job_0", "job_1", "job_2"]


def test_the_repo_pipelines_folder_parses(monkeypatch):
    monkeypatch.delenv("DAGFACTORY_PIPELINES_DIR", raising=False)
    bag = _dagbag()
    assert bag.import_errors == {}
    assert "wordcount" in bag.dag_ids


def test_task_group_chain_with_setup_and_teardown(pipelines):
    dag = _dagbag().dags["job_1"]
    assert sorted(dag.task_ids) == [
        "pipeline.bootstrap",
        "pipeline.cluster_up",
        "pipeline.run",
        "pipeline.teardown",
    ]
    bootstrap, up, run, down = (
        dag.get_task(f"pipeline.{t}") for t in ("bootstrap", "cluster_up", "run", "teardown")
    )
    assert up.is_setup and not up.is_teardown
    assert down.is_teardown and not down.is_setup
    assert not run.is_setup and not run.is_teardown
    assert not down.on_failure_fail_dagrun  # else a failed run would leave the DAG run green
    assert bootstrap.upstream_task_ids == set()
    assert up.upstream_task_ids == {"pipeline.bootstrap"}
    assert run.upstream_task_ids == {"pipeline.bootstrap", "pipeline.cluster_up"}
    assert down.upstream_task_ids == {"pipeline.cluster_up", "pipeline.run"}
    assert down.trigger_rule == "all_done_setup_success"


def test_spec_fields_reach_the_dag(pipelines):
    dag = build_dag(load_file(pipelines / "job_2.yml"))
    assert dag.description == "test pipeline 2"
    assert dag.tags == {"dagfactory", "team-a"}
    assert dag.params["n"] == 2 and dag.params["day"] == "{{ ds }}"
    assert dag.start_date.isoformat() == "2026-01-01T00:00:00+00:00"
    run = dag.get_task("pipeline.run")
    assert run.execution_timeout.total_seconds() == 600
    assert run.retries == 2
    assert "jobs.main:run" in dag.doc_md


def test_invalid_file_becomes_a_marked_dag_and_valid_ones_still_load(pipelines):
    (pipelines / "broken.yml").write_text("source: {git: x}\nentrypoint: 42\n")
    bag = _dagbag()
    assert bag.import_errors == {}
    assert {"job_0", "job_1", "job_2", "broken"} <= set(bag.dag_ids)
    broken = bag.dags["broken"]
    assert INVALID_TAG in broken.tags
    assert "broken.yml:2:" in broken.doc_md and "entrypoint" in broken.doc_md


_SERIALIZE = """
import json, sys
from dagfactory.dag.build import build_dag
from dagfactory.spec.load import load_file
from airflow.serialization.serialized_objects import DagSerialization
dag = build_dag(load_file(sys.argv[1]))
print(json.dumps(DagSerialization.to_dict(dag), sort_keys=True))
"""


def test_same_yaml_gives_the_same_serialized_dag_in_two_processes(pipelines):
    outputs = [
        subprocess.run(
            [sys.executable, "-c", _SERIALIZE, str(pipelines / "job_0.yml")],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2)
    ]
    assert outputs[0] == outputs[1]
    dag = json.loads(outputs[0])["dag"]
    assert dag["dag_id"] == "job_0"
    links = {t["__var"]["task_id"]: t["__var"].get("_operator_extra_links") for t in dag["tasks"]}
    assert links["pipeline.cluster_up"] == {"Dask dashboard": "_link_DaskDashboardLink"}
    assert links["pipeline.run"] == {
        "Dask dashboard": "_link_DaskDashboardLink",
        "Dask report": "_link_DaskReportLink",
    }
    assert links["pipeline.bootstrap"] == {"Commit": "_link_CommitLink"}


_SERIALIZE_FOLDER = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
from airflow.models.serialized_dag import SerializedDagModel
from airflow.serialization.serialized_objects import DagSerialization
bag = DagBag(dag_folder=sys.argv[1], safe_mode=True)
assert not bag.import_errors, bag.import_errors
stored = {}
for dag_id, dag in sorted(bag.dags.items()):
    data = DagSerialization.to_dict(dag)  # what the DAG processor hands to the metadata DB
    stored[dag_id] = {
        "json": json.dumps(data, sort_keys=True),  # as SerializedDagModel stores it
        "dag_hash": SerializedDagModel.hash(data),  # a new DAG version when this changes
    }
print(json.dumps(stored))
"""

_VARIED = """
    description: 'pipeline {n}: ünïcode, "quotes" and a {{{{ ds }}}} in text'
    schedule: "{schedule}"
    start_date: 2026-01-01
    retries: {n}
    timeout: 90m
    tags: [zeta, alpha, team-{n}, mid, beta, omega, kappa]
    source:
      git: https://example.com/acme/jobs.git
      ref: v{n}
      requirements: [pandas>=2, "numpy<3", pyarrow]
    entrypoint: jobs.run_{n}:main
    params:
      day: "{{{{ ds }}}}"
      names: [c, a, b]
      limits: {{zeta: 1, alpha: 2.5, mid: null, flag: true}}
      nested: {{b: [1, {{y: 2, x: 3}}], a: "text"}}
    cluster:
      workers: {workers}
      cpu: 2
      memory: 3GiB
      idle_timeout: 20m
"""


def test_a_pipelines_folder_serializes_byte_identically_under_any_hash_seed(tmp_path):
    """Airflow 3 stores a new DAG version whenever a parse serializes a DAG differently; set and
    dict orders that depend on PYTHONHASHSEED would make one per DAG processor restart."""
    folder = tmp_path / "pipelines"
    folder.mkdir()
    (folder / "wordcount.yml").write_text((ROOT / "pipelines" / "wordcount.yml").read_text())
    for n, schedule in enumerate(["@daily", "*/15 6-18 * * 1-5", "@hourly"]):
        write_pipeline(folder, f"varied_{n}", _VARIED.format(n=n, schedule=schedule, workers=n + 1))
    (folder / "defaults.yml").write_text("owner: data-eng\ntags: [shared, defaults]\n")
    (folder / "broken.yml").write_text("source: {git: x}\nentrypoint: 42\n")  # a marked DAG
    outputs = [
        subprocess.run(
            [sys.executable, "-c", _SERIALIZE_FOLDER, str(ROOT / "dags")],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed, "DAGFACTORY_PIPELINES_DIR": str(folder)},
        ).stdout.splitlines()[-1]  # Airflow logs to stdout before it
        for seed in ("0", "4242")
    ]
    first = json.loads(outputs[0])
    assert sorted(first) == ["broken", "varied_0", "varied_1", "varied_2", "wordcount"]
    assert outputs[1] == outputs[0]
    dags = {dag_id: json.loads(stored["json"])["dag"] for dag_id, stored in first.items()}
    assert [d for d, dag in dags.items() if INVALID_TAG in dag["tags"]] == ["broken"]
    assert set(dags["varied_1"]["tags"]) >= {"zeta", "alpha", "team-1", "omega", "kappa"}


def test_parsing_context_builds_only_the_dag_being_run(pipelines, monkeypatch):
    from dagfactory.dag.build import build_dags

    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "job_1")
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_TASK_ID", "pipeline.run")
    (pipelines / "broken.yml").write_text("not: [valid")
    assert list(build_dags(pipelines)) == ["job_1"]


def test_a_file_repeating_another_files_dag_id_is_shown_under_a_marked_name(tmp_path):
    from dagfactory.dag.build import build_dags

    write_pipeline(tmp_path, "a", "dag_id: b\nsource: {git: x}\nentrypoint: a.b:c\n")
    write_pipeline(tmp_path, "b", "source: {git: x}\nentrypoint: a.b:c\n")
    dags = build_dags(tmp_path)
    assert INVALID_TAG not in dags["b"].tags
    assert INVALID_TAG in dags["b__invalid"].tags
    assert "b.yml:1:1: error: dag_id: DAG id 'b' (from its file name)" in dags["b__invalid"].doc_md


def test_a_spec_that_fails_to_build_does_not_take_the_others_down(tmp_path, monkeypatch):
    from dagfactory.dag import build

    write_pipeline(tmp_path, "fine", "source: {git: x}\nentrypoint: a.b:c\n")
    write_pipeline(tmp_path, "boom", "source: {git: x}\nentrypoint: a.b:c\n")
    real = build.build_dag

    def flaky(spec, *args):
        if spec.dag_id == "boom":
            raise RuntimeError("simulated bug")
        return real(spec, *args)

    monkeypatch.setattr(build, "build_dag", flaky)
    dags = build.build_dags(tmp_path)
    assert INVALID_TAG not in dags["fine"].tags
    assert "RuntimeError: simulated bug" in dags["boom"].doc_md


def test_queue_and_pool_go_on_the_tasks_that_drive_a_cluster(tmp_path):
    text = SPEC.format(n=1) + "    queue: big\n    cluster: {pool: dagfactory_clusters}\n"
    dag = build_dag(load_file(write_pipeline(tmp_path, "queued", text)))
    tasks = {t.task_id.split(".")[-1]: t for t in dag.tasks}
    default_queue = tasks["bootstrap"].queue
    assert default_queue != "big"
    assert {n: t.queue for n, t in tasks.items()} == {
        "bootstrap": default_queue, "cluster_up": "big", "run": "big", "teardown": default_queue,
    }  # fmt: skip
    # Only run holds a slot (the cluster starts there); teardown never waits for one.
    assert {n: t.pool for n, t in tasks.items()} == {
        "bootstrap": "default_pool", "cluster_up": "default_pool",
        "run": "dagfactory_clusters", "teardown": "default_pool",
    }  # fmt: skip
