"""Fargate pipelines run by Airflow against the fake AWS on loopback (tests/aws_fake.py): as
`airflow dags test` runs them, with the credentials in an Airflow connection, and under the
real scheduler when the run task is SIGKILLed. Nothing of a run may be left on AWS."""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.airflow_services import airflow_services
from tests.aws_fake import fake_aws
from tests.conftest import make_repo, write_pipeline
from tests.test_fargate import SECRET, leftovers, wait_nothing_left
from tests.test_faults import JOBS, _entry_points, wait_ready
from tests.test_operators import _run_dag, _states, _xcom

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def aws():
    with fake_aws(images={"*": sys.prefix}, require_stopped=True) as fake:
        yield fake


@pytest.fixture(scope="module")
def jobs_repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("remotes") / "fg_jobs", {"fault_jobs.py": JOBS})


def _pipeline(folder, name: str, repo, entrypoint: str, params: dict, cluster: dict) -> None:
    settings = {"backend": "fargate", "workers": 1, "region": "eu-west-2", **cluster}
    write_pipeline(
        folder,
        name,
        f"""
        source: {{git: {repo.path}}}
        entrypoint: fault_jobs:{entrypoint}
        params: {json.dumps(params)}
        cluster: {json.dumps(settings)}
        """,
    )


def test_airflow_dags_test_runs_a_fargate_pipeline_with_an_aws_connection(
    airflow_db, aws, jobs_repo, tmp_path, monkeypatch
):
    # Credentials and endpoint only in the Airflow connection: no AWS variable is set.
    for name in aws.env:
        monkeypatch.delenv(name, raising=False)
    connection = {
        "conn_type": "aws",
        "login": "testing",
        "password": SECRET,
        "extra": {"region_name": "eu-west-2", "endpoint_url": aws.endpoint},
    }
    monkeypatch.setenv("AIRFLOW_CONN_AWS_FAKE", json.dumps(connection))
    folder = tmp_path / "pipelines"
    _pipeline(folder, "fg_dags_test", jobs_repo, "quick", {"n": 30}, {"aws_conn_id": "aws_fake"})
    dag_run = _run_dag(monkeypatch, folder, "fg_dags_test")
    assert str(dag_run.state) == "success", _states(dag_run)
    result = _xcom(dag_run, "pipeline.run")
    assert result["total"] == sum(i * i for i in range(30))
    assert result["scheduler"].startswith("tls://127.")  # the Fargate scheduler's private IP
    handle = _xcom(dag_run, "pipeline.cluster_up")
    assert handle["backend"] == "fargate" and handle["details"]["aws_conn_id"] == "aws_fake"
    assert SECRET not in json.dumps(handle) and "PRIVATE KEY" not in json.dumps(handle)
    assert _xcom(dag_run, "pipeline.cluster_up", key="_link_DaskDashboardLink").endswith(
        ":8787/status"
    )
    wait_nothing_left(aws)


def test_sigkill_of_the_run_task_under_the_scheduler_leaves_nothing_on_aws(
    aws, jobs_repo, tmp_path_factory
):
    root = tmp_path_factory.mktemp("fg-airflow")
    signals = root / "signals"
    signals.mkdir()
    pipelines = root / "pipelines"
    params = {"signal_dir": str(signals), "name": "fg_kill"}
    _pipeline(pipelines, "fg_kill", jobs_repo, "kill_runner", params, {})
    with airflow_services(root / "airflow", pipelines, aws.env) as services:
        services.wait_parsed("fg_kill")
        run_id = f"kill_{time.time_ns()}"
        services.trigger("fg_kill", run_id)
        wait_ready(signals, "fg_kill", services, "fg_kill", run_id)
        assert leftovers(aws)["tasks"]  # the cluster runs on (fake) Fargate now
        [entry] = _entry_points("kill_runner")
        entry.parent().kill()  # the run task's process
        assert services.wait_run("fg_kill", run_id) == "failed"
        states = services.states("fg_kill", run_id)
        assert states["run"] == "failed", services.explain("fg_kill", run_id)
        assert states["teardown"] == "success", services.explain("fg_kill", run_id)
        log = services.task_log("fg_kill", run_id, "teardown")
        assert "stopped 2 task(s), deregistered 2 task definition(s)" in log, log[-2000:]
        wait_nothing_left(aws)
