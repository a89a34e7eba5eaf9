"""Whole DAG runs in a real Airflow (SQLite metadata DB), with real git, venvs and Dask."""

import re
from collections import Counter

import pytest

from tests.conftest import (
    EXAMPLE,
    FAILING_JOB,
    cluster_processes,
    write_pipeline,
    write_wordcount_pipeline,
)

pytestmark = pytest.mark.e2e


def _expected_wordcount(chunks: int, top: int) -> dict:
    """Counted here with plain Python, independently of the example's code."""
    text = (EXAMPLE / "wordcount" / "data" / "corpus.txt").read_text()
    counts = Counter(re.findall(r"[a-z']+", text.lower()))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return {
        "chunks": chunks,
        "lines": len(text.splitlines()),
        "total_words": sum(counts.values()),
        "distinct_words": len(counts),
        "top": [[w, c] for w, c in ranked[:top]],
    }


def _run_dag(monkeypatch, folder, dag_id: str, conf: dict | None = None):
    """Parse the loader file the way `airflow dags test` does, sync it to the DB, run it."""
    from airflow.utils.cli import get_bagged_dag

    monkeypatch.setenv("DAGFACTORY_PIPELINES_DIR", str(folder))
    dag = get_bagged_dag(None, dag_id)
    return dag.test(run_conf=conf)


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id.split(".")[-1]: str(ti.state) for ti in dag_run.get_task_instances()}


def _xcom(dag_run, task_id: str, key: str = "return_value"):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.scalars(
            XComModel.get_many(
                run_id=dag_run.run_id, dag_ids=dag_run.dag_id, task_ids=task_id, key=key
            )
        ).first()
        return XComModel.deserialize_value(row) if row else None


def test_example_dag_runs_green_and_its_result_is_in_xcom(
    airflow_db, tmp_path, wordcount_repo, monkeypatch
):
    path = write_wordcount_pipeline(
        tmp_path / "pipelines", wordcount_repo, chunks=16, top=3, label="day {{ ds }}"
    )
    dag_run = _run_dag(monkeypatch, path.parent, "wordcount", {"chunks": 12})
    assert str(dag_run.state) == "success", _states(dag_run)
    assert _states(dag_run) == dict.fromkeys(
        ["bootstrap", "cluster_up", "run", "teardown"], "success"
    )
    result = _xcom(dag_run, "pipeline.run")
    label = result.pop("label")
    assert re.fullmatch(r"day \d{4}-\d{2}-\d{2}", label)  # Jinja rendered at run time
    assert result == _expected_wordcount(chunks=12, top=3)  # trigger-time override won
    assert _xcom(dag_run, "pipeline.bootstrap") == {"commit": wordcount_repo.head(), "pins": {}}
    handle = _xcom(dag_run, "pipeline.cluster_up")
    assert handle["backend"] == "local" and handle["scheduler_address"].startswith("tcp://")
    for task in ("pipeline.cluster_up", "pipeline.run"):  # the "Dask dashboard" button
        link = _xcom(dag_run, task, key="_link_DaskDashboardLink")
        assert link == handle["dashboard_link"] and link.endswith("/status")
    assert cluster_processes("wordcount__") == []


def test_failing_entry_point_fails_the_run_and_teardown_still_stops_the_cluster(
    airflow_db, tmp_path, repo_factory, monkeypatch
):
    repo = repo_factory("failing", {"failing_job.py": FAILING_JOB})
    path = write_pipeline(
        tmp_path / "pipelines",
        "failing",
        f"""
        source:
          git: {repo.path}
        entrypoint: failing_job:main
        params:
          message: the input is corrupt
        cluster:
          workers: 1
        """,
    )
    dag_run = _run_dag(monkeypatch, path.parent, "failing")
    assert str(dag_run.state) == "failed"
    states = _states(dag_run)
    assert states["run"] == "failed"
    assert states["cluster_up"] == "success"
    assert states["teardown"] == "success"
    assert cluster_processes("failing__") == []


SLEEPY_JOB = """
import time


def main(client):
    print("going to sleep", flush=True)
    time.sleep(300)
"""


def test_timeout_stops_the_entry_point_and_the_cluster(
    airflow_db, tmp_path, repo_factory, monkeypatch
):
    import psutil

    repo = repo_factory("sleepy", {"sleepy_job.py": SLEEPY_JOB})
    path = write_pipeline(
        tmp_path / "pipelines",
        "sleepy",
        f"""
        timeout: 20s
        source:
          git: {repo.path}
        entrypoint: sleepy_job:main
        cluster:
          workers: 1
        """,
    )
    dag_run = _run_dag(monkeypatch, path.parent, "sleepy")
    states = _states(dag_run)
    assert str(dag_run.state) == "failed"
    assert states["run"] == "failed" and states["teardown"] == "success"
    assert cluster_processes("sleepy__") == []
    shims = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "sleepy_job:main" in " ".join(p.info["cmdline"] or [])
    ]
    assert shims == []


def test_params_carry_their_schema_and_bad_conf_is_refused_before_a_cluster_starts(
    airflow_db, tmp_path, wordcount_repo, monkeypatch
):
    from airflow.exceptions import ParamValidationError
    from airflow.utils.cli import get_bagged_dag

    path = write_pipeline(
        tmp_path / "pipelines",
        "typed",
        f"""
        source: {{git: {wordcount_repo.path}, requirements: requirements.txt}}
        entrypoint: wordcount.job:main
        params:
          chunks: {{default: 4, type: integer, minimum: 1, description: Pieces to split into}}
          label: "{{{{ ds }}}}"
        cluster: {{workers: 1}}
        """,
    )
    monkeypatch.setenv("DAGFACTORY_PIPELINES_DIR", str(path.parent))
    dag = get_bagged_dag(None, "typed")
    chunks = dag.params.get_param("chunks")
    assert chunks.schema == {"type": "integer", "minimum": 1}
    assert chunks.description == "Pieces to split into"
    assert dag.params.get_param("label").schema == {"type": "string"}
    with pytest.raises(ParamValidationError):  # what the trigger form and REST API refuse
        dag.test(run_conf={"chunks": "abc"})
    dag_run = dag.test(run_conf={"chunk": 3})  # a typo Airflow alone would drop silently
    states = _states(dag_run)
    assert states["bootstrap"] == "failed" and states["cluster_up"] == "upstream_failed"
    assert cluster_processes("typed__") == []
