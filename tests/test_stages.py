"""Stages: the spec as loaded, the DAG it becomes, params between steps, and `dagfactory run`
of a staged pipeline on real local clusters (the Airflow runs are in test_stages_airflow.py)."""

import json
import os
import subprocess
import sys

import jinja2
import pytest

from dagfactory.dag.build import build_dag
from dagfactory.errors import ParamError, SpecError
from dagfactory.spec.load import load_file
from dagfactory.spec.params import render_step_params
from tests.conftest import ROOT, cluster_processes, write_pipeline

THREE_STAGES = """
    source: {git: https://example.com/acme/jobs.git}
    params: {n: 7}
    outlets: [s3://acme/report]
    timeout: 10m
    cluster: {workers: 1, memory: 1GiB, listen: loopback}
    stages:
      prepare:
        cluster: {workers: 3}
        steps:
          - extract: {entrypoint: jobs.steps:extract, params: {n: "{{ params.n }}"}}
          - parallel:
              - clean: {entrypoint: jobs.steps:clean, params: {rows: "{{ steps.extract.rows }}"}}
              - audit: {entrypoint: jobs.steps:audit, outlets: [s3://acme/audit]}
      model:
        depends_on: [prepare]
        prewarm: true
        queue: big
        cluster: {adaptive: {minimum: 1, maximum: 4}}
        steps:
          - train: {entrypoint: jobs.steps:train, retries: 0, timeout: 1h,
                    params: {rows: "{{ steps.clean.rows }}"}}
      report:
        depends_on: [model]
        cluster: {backend: existing, address: "tcp://10.0.0.5:8786"}
        steps:
          - publish: {entrypoint: jobs.steps:publish,
                      params: {rows: "{{ steps.train.rows }}", who: "{{ steps.audit }}"}}
"""


@pytest.fixture
def three(tmp_path):
    return load_file(write_pipeline(tmp_path, "three", THREE_STAGES))


def test_each_stage_runs_on_its_cluster_merged_over_the_pipelines(three):
    prepare, model, report = (three.stages[n].cluster for n in ("prepare", "model", "report"))
    assert (prepare.workers, prepare.memory, prepare.adaptive) == (3, "1GiB", None)
    assert (model.workers, model.memory, model.adaptive.maximum) == (1, "1GiB", 4)
    # switching backend keeps none of the other backend's settings (listen) nor the sizes
    assert report.backend == "existing" and report.listen == "loopback"  # the default
    assert three.for_stage("model").queue == "big"
    assert three.for_stage("prepare").queue is None
    assert three.entrypoints == (
        "jobs.steps:extract",
        "jobs.steps:clean",
        "jobs.steps:audit",
        "jobs.steps:train",
        "jobs.steps:publish",
    )


def test_a_setting_every_stage_inherits_is_reported_once_where_it_is_written(tmp_path):
    path = write_pipeline(
        tmp_path,
        "zero",
        """
        source: {git: x}
        cluster: {memory: 0GiB}
        stages:
          a: {steps: [{one: {entrypoint: jobs.a:main}}]}
          b: {steps: [{two: {entrypoint: jobs.b:main}}]}
        """,
    )
    with pytest.raises(SpecError) as caught:
        load_file(path)
    assert [(p.line, p.field) for p in caught.value.problems] == [(3, "cluster.memory")]


def test_the_dag_has_a_group_per_stage_with_its_setup_steps_and_teardown(three):
    dag = build_dag(three)
    upstream = {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}
    assert upstream == {
        "bootstrap": [],
        "prepare.cluster_up": ["bootstrap"],
        "prepare.extract": ["bootstrap", "prepare.cluster_up"],
        "prepare.clean": ["bootstrap", "prepare.cluster_up", "prepare.extract"],
        "prepare.audit": ["bootstrap", "prepare.cluster_up", "prepare.extract"],
        "prepare.teardown": ["prepare.audit", "prepare.clean", "prepare.cluster_up"],
        # prewarm: after the steps before prepare's last group, not after the last group
        "model.cluster_up": ["bootstrap", "prepare.extract"],
        "model.train": ["bootstrap", "model.cluster_up", "prepare.audit", "prepare.clean"],
        "model.teardown": ["model.cluster_up", "model.train"],
        "report.cluster_up": ["bootstrap", "model.train"],
        "report.publish": ["bootstrap", "model.train", "report.cluster_up"],
        "report.teardown": ["report.cluster_up", "report.publish"],
    }
    tasks = dag.task_dict
    assert [t for t in tasks if tasks[t].is_setup] == [
        "prepare.cluster_up",
        "model.cluster_up",
        "report.cluster_up",
    ]
    assert [t for t in tasks if tasks[t].is_teardown] == [
        "prepare.teardown",
        "model.teardown",
        "report.teardown",
    ]
    # a step knows where the results it uses come from, and which tasks may have replaced
    # its stage's cluster before it
    assert tasks["report.publish"].results == {"train": "model.train", "audit": "prepare.audit"}
    assert tasks["prepare.audit"].earlier == ("prepare.extract",)
    assert tasks["prepare.teardown"].earlier == (
        "prepare.extract",
        "prepare.clean",
        "prepare.audit",
    )
    # the pipeline's outlets go on the one last step; a step's own on that step
    assert [a.uri for a in tasks["report.publish"].outlets] == ["s3://acme/report"]
    assert [a.uri for a in tasks["prepare.audit"].outlets] == ["s3://acme/audit"]
    assert tasks["prepare.clean"].outlets == []
    assert tasks["model.train"].retries == 0 and tasks["prepare.clean"].retries == 0
    assert tasks["model.train"].execution_timeout.total_seconds() == 3600
    assert tasks["prepare.clean"].execution_timeout.total_seconds() == 600
    assert tasks["model.train"].queue == "big" and tasks["model.cluster_up"].queue == "big"
    assert tasks["prepare.extract"].queue != "big"
    assert "stage model" in dag.doc_md and "1-4 workers (adaptive) after prepare" in dag.doc_md


def test_stages_with_no_dependency_between_them_start_together(tmp_path):
    spec = load_file(
        write_pipeline(
            tmp_path,
            "fan",
            """
            source: {git: x}
            stages:
              eu: {steps: [{eu_sales: {entrypoint: jobs.a:main}}]}
              us: {steps: [{us_sales: {entrypoint: jobs.a:main}}]}
              merge:
                depends_on: [eu, us]
                steps: [{total: {entrypoint: jobs.b:main}}]
            """,
        )
    )
    tasks = build_dag(spec).task_dict
    assert tasks["eu.cluster_up"].upstream_task_ids == {"bootstrap"}
    assert tasks["us.cluster_up"].upstream_task_ids == {"bootstrap"}
    assert tasks["merge.total"].upstream_task_ids == {
        "bootstrap",
        "merge.cluster_up",
        "eu.eu_sales",
        "us.us_sales",
    }
    assert spec.stage_order() == ["eu", "us", "merge"]


def test_one_expression_keeps_its_json_type_and_text_stays_text():
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    context = {
        "ds": "2026-01-02",
        "params": {"day": "20260102"},
        "steps": {"clean": {"rows": 41, "parts": ["a", "b"], "label": "007"}},
    }
    params = {
        "rows": "{{ steps.clean.rows }}",
        "more": "{{ steps.clean.rows + 1 }}",
        "parts": " {{ steps.clean.parts }} ",
        "label": "{{ steps.clean.label }}",  # text that looks like a number stays text
        "day": "{{ params.day }}",
        "line": "{{ ds }}: {{ steps.clean.rows }} rows",
        "nested": {"all": ["{{ steps.clean }}", 3]},
        "plain": 5,
    }
    assert render_step_params(params, context, env) == {
        "rows": 41,
        "more": 42,
        "parts": ["a", "b"],
        "label": "007",
        "day": "20260102",
        "line": "2026-01-02: 41 rows",
        "nested": {"all": [{"rows": 41, "parts": ["a", "b"], "label": "007"}, 3]},
        "plain": 5,
    }
    with pytest.raises(ParamError, match="param 'x'.*has no attribute 'missing'"):
        render_step_params({"x": "{{ steps.clean.missing }}"}, context, env)


STEP_JOBS = """
import os
import signal


def scheduler(client):
    return client.scheduler_info()["id"]


def extract(client, n):
    return {"rows": client.submit(len, list(range(n))).result(), "scheduler": scheduler(client)}


def clean(client, rows):
    assert isinstance(rows, int), rows
    return {"rows": rows - 1, "scheduler": scheduler(client)}


def audit(client, rows):
    return {"rows": rows, "workers": len(client.scheduler_info()["workers"]),
            "scheduler": scheduler(client)}


def train(client, rows, fail=False):
    if fail:
        raise RuntimeError(f"train failed on {rows} rows")
    return {"rows": rows * 2, "scheduler": scheduler(client)}
"""

RUNNABLE = """
    source: {{git: {git}}}
    params: {{n: 5, fail: false}}
    cluster: {{workers: 1, memory: 512MiB}}
    stages:
      prepare:
        cluster: {{workers: 2}}
        steps:
          - extract: {{entrypoint: jobs:extract, params: {{n: "{{{{ params.n }}}}"}}}}
          - parallel:
              - clean: {{entrypoint: jobs:clean, params: {{rows: "{{{{ steps.extract.rows }}}}"}}}}
              - audit: {{entrypoint: jobs:audit, params: {{rows: "{{{{ steps.extract.rows }}}}"}}}}
      model:
        depends_on: [prepare]
        steps:
          - train:
              entrypoint: jobs:train
              params: {{rows: "{{{{ steps.clean.rows }}}}", fail: "{{{{ params.fail }}}}"}}
"""


@pytest.fixture
def runnable(tmp_path, repo_factory):
    repo = repo_factory("steps", {"jobs.py": STEP_JOBS})
    return write_pipeline(tmp_path, "staged", RUNNABLE.format(git=repo.path))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dagfactory.cli", "run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=600,
    )


@pytest.mark.e2e
def test_dagfactory_run_runs_each_stage_on_its_own_cluster_and_passes_results(runnable):
    out = _run(str(runnable))
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.splitlines()[-1])
    assert results["extract"]["rows"] == 5
    assert results["clean"]["rows"] == 4 and results["audit"]["rows"] == 5
    assert results["audit"]["workers"] == 2
    assert results["train"]["rows"] == 8
    # one cluster per stage, shared by its steps
    prepare = {results[s]["scheduler"] for s in ("extract", "clean", "audit")}
    assert len(prepare) == 1 and results["train"]["scheduler"] not in prepare
    # each stage is torn down as soon as its last step is done, before the next one starts
    log = out.stderr
    assert log.index("prepare: teardown") < log.index("model: cluster_up")
    assert cluster_processes("staged__") == []


@pytest.mark.e2e
def test_a_failing_step_fails_the_run_after_tearing_down_every_started_stage(runnable):
    out = _run(str(runnable), "-p", "fail=true")
    assert out.returncode == 1
    assert "train failed on 4 rows" in out.stderr
    assert "model: teardown" in out.stderr and "prepare: teardown" in out.stderr
    assert cluster_processes("staged__") == []


@pytest.mark.e2e
def test_steps_that_find_their_cluster_lost_at_once_start_one_replacement(runnable):
    """Parallel steps of a stage retry together after its scheduler died: one new cluster."""
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from dagfactory.backends import ClusterHandle, get_backend
    from dagfactory.run import steps

    spec = load_file(runnable).for_stage("prepare")
    boot = steps.bootstrap(spec)
    key = "staged__lost_at_once__prepare"
    first = steps.cluster_up(spec, boot, key)
    os.kill(first["details"]["pids"][0], signal.SIGKILL)  # the scheduler
    try:
        with ThreadPoolExecutor(2) as pool:
            found = list(pool.map(lambda _: steps.ensure_cluster(spec, boot, key, first), "ab"))
        ids = {h["details"]["scheduler_id"] for h in found}
        assert len(ids) == 1 and first["details"]["scheduler_id"] not in ids
        assert get_backend("local").alive(ClusterHandle.from_json(found[0]))
    finally:
        steps.teardown(spec, key, first, *found)
    assert cluster_processes(key) == []
