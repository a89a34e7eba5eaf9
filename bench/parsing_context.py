"""Does Airflow 3 really tell the loader which DAG a task needs? Checked by running it.

A probe loader (our real `build_dags` plus a line that appends what it saw to a JSON-lines
file) sits in its own DAGs folder over a few pipelines. Then:

- `airflow dags test ctx_02`, which parses the folder once and runs the tasks in-process;
- the real thing: api-server, scheduler (LocalExecutor) and dag-processor started here on a
  free loopback port, `scripts/trigger_and_wait.py ctx_02`, then every process stopped.

Every parse leaves one record: the process (its title says "airflow worker -- <ti>" for the
task runner), the parsing context it saw, and how many DAGs the loader built.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench import fanout
from bench.environment import PYTHON, ROOT, WORK, airflow_env, airflow_services, free_port

BASE = WORK / "context"
HOME = WORK / "airflow-context"
DAGS = BASE / "dags"
PIPELINES = BASE / "pipelines"
RECORD = BASE / "parses.jsonl"
PIPELINE_COUNT = 5
TARGET = "ctx_02"

PROBE = '''\
"""Probe: the dagfactory loader, plus a record of Airflow's parsing context (airflow dag file)."""

import json
import os
import time
from pathlib import Path

from airflow.sdk import get_parsing_context

from dagfactory.dag.build import build_dags

_started = time.perf_counter()
_dags = build_dags({pipelines!r})
globals().update(_dags)
_context = get_parsing_context()
with open({record!r}, "a") as _f:
    _title = Path("/proc/self/cmdline").read_bytes().replace(b"\\0", b" ").decode(errors="replace")
    _f.write(json.dumps({{
        "pid": os.getpid(),
        "process": _title.strip()[:100],
        "dag_id": _context.dag_id,
        "task_id": _context.task_id,
        "dags_built": sorted(_dags),
        "build_s": time.perf_counter() - _started,
    }}) + "\\n")
'''


def setup() -> None:
    fanout.make_repo()
    DAGS.mkdir(parents=True, exist_ok=True)
    PIPELINES.mkdir(parents=True, exist_ok=True)
    for i in range(1, PIPELINE_COUNT + 1):
        text = fanout.PIPELINE.format(n=10, repo=fanout.REPO, workers=1)
        (PIPELINES / f"ctx_{i:02d}.yml").write_text(text)
    (DAGS / "probe.py").write_text(PROBE.format(pipelines=str(PIPELINES), record=str(RECORD)))


def env(port: int | None = None) -> dict[str, str]:
    extra = {
        "DAGFACTORY_PIPELINES_DIR": str(PIPELINES),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__SCHEDULER__DAG_DIR_LIST_INTERVAL": "5",
    }
    if port:
        extra["AIRFLOW__API__PORT"] = str(port)
        extra["AIRFLOW__API__HOST"] = "127.0.0.1"
        extra["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] = f"http://127.0.0.1:{port}/execution/"
    return airflow_env(HOME, DAGS, **extra)


def _records() -> list[dict]:
    if not RECORD.is_file():
        return []
    return [json.loads(line) for line in RECORD.read_text().splitlines() if line.strip()]


def _migrate(log: Callable[[str], None]) -> None:
    import shutil

    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir(parents=True)
    log(f"airflow db migrate in {HOME}")
    subprocess.run(
        [PYTHON, "-m", "airflow", "db", "migrate"], env=env(), check=True, capture_output=True
    )


def under_dags_test(log: Callable[[str], None]) -> dict:
    RECORD.unlink(missing_ok=True)
    started = time.perf_counter()
    with open(BASE / "dags-test.log", "w") as out:
        proc = subprocess.run(
            [PYTHON, "-m", "airflow", "dags", "test", TARGET],
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=900,
        )
    records = _records()
    log(f"dags test {TARGET}: exit {proc.returncode}, {len(records)} parse(s) recorded")
    return {
        "exit_code": proc.returncode,
        "wall_s": time.perf_counter() - started,
        "parses": records,
    }


def under_scheduler(log: Callable[[str], None]) -> dict:
    """Api-server, scheduler, dag-processor (LocalExecutor): trigger one run, record parses."""
    RECORD.unlink(missing_ok=True)
    port = free_port()
    started = time.perf_counter()
    with airflow_services(env(port), BASE / "services"):
        log(f"started api-server (127.0.0.1:{port}), scheduler and dag-processor")
        proc = subprocess.run(
            [PYTHON, str(ROOT / "scripts" / "trigger_and_wait.py"), TARGET, "--timeout", "600"],
            env=env(port),
            capture_output=True,
            text=True,
            timeout=900,
        )
        (BASE / "services" / "trigger_and_wait.log").write_text(proc.stdout + proc.stderr)
    log("stopped api-server, scheduler and dag-processor")
    records = _records()
    log(f"scheduler run of {TARGET}: exit {proc.returncode}, {len(records)} parse(s) recorded")
    return {
        "exit_code": proc.returncode,
        "wall_s": time.perf_counter() - started,
        "output": proc.stdout[-1500:],
        "parses": records,
    }


def source_findings() -> list[dict]:
    """Where the installed Airflow sets the parsing context (file, line, code)."""
    import airflow

    root = Path(airflow.__file__).parent
    wanted = [
        ("sdk/execution_time/task_runner.py", "_airflow_parsing_context_manager(dag_id="),
        ("utils/cli.py", "_airflow_parsing_context_manager(dag_id="),
        ("sdk/definitions/dag.py", "deliberately do NOT use"),
        ("sdk/definitions/dag.py", "run_task_in_process("),
    ]
    found = []
    for relative, needle in wanted:
        path = root / relative
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if needle in line:
                found.append({"file": f"airflow/{relative}", "line": number, "code": line.strip()})
    return found


def run(scheduler: bool, log: Callable[[str], None] = print) -> dict:
    setup()
    _migrate(log)
    results = {"target": TARGET, "pipelines": PIPELINE_COUNT, "source": source_findings()}
    results["dags_test"] = under_dags_test(log)
    if scheduler:
        results["scheduler"] = under_scheduler(log)
    return results
