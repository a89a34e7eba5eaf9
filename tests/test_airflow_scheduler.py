"""The deployment path: api-server, scheduler and DAG processor as separate processes,
LocalExecutor running each task in its own task-runner process, a run triggered from the CLI
with no logical date (Airflow 3's default for manual runs)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, cluster_processes, write_wordcount_pipeline

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def airflow_services(tmp_path, wordcount_repo):
    port = _free_port()
    pipelines = tmp_path / "pipelines"
    write_wordcount_pipeline(pipelines, wordcount_repo, chunks=8, top=2, label="{{ ds }}")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "DAGFACTORY_PIPELINES_DIR": str(pipelines),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
    }
    airflow = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    logs = tmp_path / "service-logs"
    logs.mkdir()
    procs = []
    for service in ("api-server", "scheduler", "dag-processor"):
        with open(logs / f"{service}.log", "wb") as out:
            procs.append(
                subprocess.Popen(
                    [*airflow, service],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    yield env, logs
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    for proc in procs:
        try:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_triggered_run_goes_green_under_the_scheduler(airflow_services):
    env, logs = airflow_services
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "trigger_and_wait.py"), "wordcount"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    service_logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in Path(logs).iterdir())
    assert out.returncode == 0, out.stdout + out.stderr + service_logs
    result = json.loads(out.stdout.split("result: ", 1)[1].splitlines()[0])
    assert result["chunks"] == 8 and result["top"] == [["the", 3368], ["of", 3218]]
    # a manual run has no logical date; {{ ds }} still renders as the run's day
    assert len(result["label"]) == 10 and result["label"][4] == "-"
    assert "pipeline.teardown: success" in out.stdout
    assert cluster_processes("wordcount__demo") == []
