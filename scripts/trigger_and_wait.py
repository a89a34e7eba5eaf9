"""Trigger a DAG in a running Airflow (scheduler + api-server) and wait for the run to end.

Used by `./dev demo` and by the end-to-end test of the scheduler path. Prints each task's
state as it changes, then the result: the `run` task's (`result: JSON`), or for a pipeline with
stages each step's (`result of STAGE.STEP: JSON`, in the order they started); exits 0 only when
the run succeeded.

    python scripts/trigger_and_wait.py DAG_ID [--timeout SECONDS] [--conf JSON]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any


def airflow(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "airflow", *args], capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise SystemExit(f"airflow {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}")
    return out.stdout


def _result(session: Any, dag_id: str, run_id: str, task_id: str) -> Any:
    """The task's return value (its XCom), None when it has none."""
    from airflow.models.xcom import XComModel

    row = session.scalars(
        XComModel.get_many(run_id=run_id, dag_ids=dag_id, task_ids=task_id, key="return_value")
    ).first()
    return XComModel.deserialize_value(row) if row else None


def _steps(instances: list[Any]) -> list[str]:
    """The step tasks of a pipeline with stages (`STAGE.STEP`), in the order they started;
    those that never started come last."""
    steps = [
        ti
        for ti in instances
        if "." in ti.task_id and ti.task_id.rsplit(".", 1)[1] not in ("cluster_up", "teardown")
    ]
    never = datetime.max.replace(tzinfo=UTC)
    return [ti.task_id for ti in sorted(steps, key=lambda ti: (ti.start_date or never, ti.task_id))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dag_id")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--conf", default="{}")
    args = parser.parse_args()

    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    deadline = time.monotonic() + args.timeout
    print(f"waiting for the DAG processor to parse {args.dag_id} ...", flush=True)
    while True:
        with create_session() as session:
            if session.get(DagModel, args.dag_id) is not None:
                break
        if time.monotonic() > deadline:
            print(f"{args.dag_id} was never parsed", file=sys.stderr)
            return 1
        time.sleep(1)
    airflow("dags", "unpause", args.dag_id)
    run_id = f"demo__{datetime.now(UTC):%Y%m%dT%H%M%S}"
    airflow("dags", "trigger", args.dag_id, "--run-id", run_id, "--conf", args.conf)
    print(f"triggered {args.dag_id} run {run_id}", flush=True)
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        with create_session() as session:
            run = session.query(DagRun).filter_by(dag_id=args.dag_id, run_id=run_id).one()
            for ti in run.get_task_instances(session=session):
                state = str(ti.state)
                if ti.state is not None and seen.get(ti.task_id) != state:
                    seen[ti.task_id] = state
                    print(f"  {ti.task_id}: {state}", flush=True)
            if str(run.state) in ("success", "failed"):
                print(f"run {run_id}: {run.state}")
                instances = run.get_task_instances(session=session)
                if any(ti.task_id == "pipeline.run" for ti in instances):
                    result = _result(session, args.dag_id, run_id, "pipeline.run")
                    print(f"result: {json.dumps(result)}", flush=True)
                else:
                    for task_id in _steps(instances):
                        result = _result(session, args.dag_id, run_id, task_id)
                        print(f"result of {task_id}: {json.dumps(result)}", flush=True)
                return 0 if str(run.state) == "success" else 1
        time.sleep(1)
    print(f"run {run_id} did not finish within {args.timeout:.0f}s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
