"""The deployment path: api-server, scheduler and DAG processor as separate processes,
LocalExecutor running each task in its own task-runner process, a run triggered from the CLI
with no logical date (Airflow 3's default for manual runs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.airflow_services import airflow_services
from tests.conftest import ROOT, cluster_processes, write_wordcount_pipeline

pytestmark = pytest.mark.e2e


@pytest.fixture
def airflow_env(tmp_path, wordcount_repo):
    pipelines = tmp_path / "pipelines"
    write_wordcount_pipeline(pipelines, wordcount_repo, chunks=8, top=2, label="{{ ds }}")
    with airflow_services(tmp_path / "airflow", pipelines) as services:
        yield services.env, services.logs


def test_triggered_run_goes_green_under_the_scheduler(airflow_env):
    env, logs = airflow_env
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
