"""Stages: a cluster shared by a stage's steps, and prewarm, against a cluster per step.

    .venv/bin/python -m bench.stages [--repeats N]     (writes docs/bench-stages.md)

One Airflow (api-server, scheduler, dag-processor; LocalExecutor, SQLite) runs three pipelines
of the same six steps, each step a real Dask job of about STEP_SECONDS on a 2-worker local
cluster, in turn, `--repeats` times each:

- `per_step`: what Airflow users do today with cluster operators (EMR-style create cluster,
  add a step, terminate): every step on a cluster of its own (six stages of one step);
- `shared`: stage `a` runs five steps on one cluster, stage `b` the sixth on another;
- `shared_prewarm`: the same, with `prewarm: true` on `b`, whose cluster then starts while
  `a`'s last step runs.

Measured from the metadata DB: the run's wall time (first task start to last task end), the
clusters started, the time the run's tasks spent starting clusters, and cluster-seconds (per
stage, from cluster_up's start to teardown's end: what a cloud bill counts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from datetime import datetime

from bench.environment import (
    PYTHON,
    ROOT,
    WORK,
    airflow_env,
    airflow_services,
    free_port,
    machine_info,
)
from bench.stats import summarize

BASE = WORK / "stages"
REPO = BASE / "repo"
PIPELINES = BASE / "pipelines"
HOME = BASE / "airflow"
REPORT = ROOT / "docs" / "bench-stages.md"
STEP_SECONDS = 3

JOB = '''\
"""Stages benchmark job: a few seconds of real Dask work on the cluster."""

import time


def step(client, seconds: float, tasks: int = 8) -> dict:
    futures = client.map(time.sleep, [seconds * 2 / tasks] * tasks, pure=False)
    client.gather(futures)
    return {"scheduler": client.scheduler_info()["id"]}
'''

STEP = "{{entrypoint: jobs:step, params: {{seconds: {seconds}}}}}"
HEAD = """\
source: {{git: {repo}}}
cluster: {{workers: 2, memory: 1GiB}}
stages:
"""
STEPS = 6
"""Steps of every pipeline: the last stage's one, and the first stage's STEPS - 1."""


def _pipeline(stages: list[tuple[str, list[str], str]]) -> str:
    """HEAD, then one line per stage: (name, its steps, extra keys)."""
    lines = [
        f"  {name}: {{{{{extra}steps: ["
        + ", ".join(f"{{{{{s}: {{step}}}}}}" for s in steps)
        + "]}}"
        for name, steps, extra in stages
    ]
    return HEAD + "\n".join(lines) + "\n"


_FIRST = [f"s{i}" for i in range(1, STEPS)]
_LAST = f"s{STEPS}"
PIPELINES_TEXT = {
    "per_step": _pipeline(
        [
            (f"p{i}", [f"s{i}"], f"depends_on: [p{i - 1}], " if i > 1 else "")
            for i in range(1, STEPS + 1)
        ]
    ),
    "shared": _pipeline([("a", _FIRST, ""), ("b", [_LAST], "depends_on: [a], ")]),
    "shared_prewarm": _pipeline(
        [("a", _FIRST, ""), ("b", [_LAST], "depends_on: [a], prewarm: true, ")]
    ),
}


def setup() -> None:
    shutil.rmtree(BASE, ignore_errors=True)
    REPO.mkdir(parents=True)
    (REPO / "jobs.py").write_text(JOB)
    git = ["git", "-c", "user.email=bench@dagfactory", "-c", "user.name=bench"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=REPO, check=True)
    subprocess.run([*git, "add", "-A"], cwd=REPO, check=True)
    subprocess.run([*git, "commit", "-qm", "job"], cwd=REPO, check=True)
    PIPELINES.mkdir(parents=True)
    step = STEP.format(seconds=STEP_SECONDS)
    for name, text in PIPELINES_TEXT.items():
        (PIPELINES / f"{name}.yml").write_text(text.format(repo=REPO, step=step))


def env(port: int) -> dict[str, str]:
    return airflow_env(
        HOME,
        ROOT / "dags",
        DAGFACTORY_PIPELINES_DIR=str(PIPELINES),
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
    )


def _task_times(dag_id: str, run_id: str) -> dict[str, tuple[float, float]]:
    with sqlite3.connect(HOME / "airflow.db") as db:
        rows = db.execute(
            "SELECT task_id, start_date, end_date FROM task_instance "
            "WHERE dag_id = ? AND run_id = ?",
            (dag_id, run_id),
        ).fetchall()
    return {task: (_seconds(start), _seconds(end)) for task, start, end in rows if start and end}


def _seconds(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def measure(times: dict[str, tuple[float, float]]) -> dict:
    """Wall time, cluster starts and cluster-seconds of one run, from its tasks' times."""
    stages = {task.split(".")[0] for task in times if task.endswith(".cluster_up")}
    return {
        "wall_s": max(e for _, e in times.values()) - min(s for s, _ in times.values()),
        "clusters": len(stages),
        "starting_s": sum(e - s for t, (s, e) in times.items() if t.endswith(".cluster_up")),
        "cluster_s": sum(
            times[f"{stage}.teardown"][1] - times[f"{stage}.cluster_up"][0] for stage in stages
        ),
    }


def run(repeats: int, log: Callable[[str], None] = print) -> dict:
    setup()
    HOME.mkdir(parents=True)
    port = free_port()
    log(f"airflow db migrate in {HOME}")
    subprocess.run(
        [PYTHON, "-m", "airflow", "db", "migrate"], env=env(port), check=True, capture_output=True
    )
    runs: dict[str, list[dict]] = {name: [] for name in PIPELINES_TEXT}
    with airflow_services(env(port), BASE / "logs"):
        # One unrecorded run first builds the pipeline's virtualenv, for every contender alike.
        for repeat in range(repeats + 1):
            for name in PIPELINES_TEXT:
                run_id = _trigger(name, port)
                if repeat:
                    runs[name].append(measure(_task_times(name, run_id)))
                    log(f"{name} #{repeat}: {runs[name][-1]}")
    return {
        "repeats": repeats,
        "step_seconds": STEP_SECONDS,
        "runs": runs,
        "summary": {
            name: {metric: summarize([r[metric] for r in found]).to_json() for metric in found[0]}
            for name, found in runs.items()
        },
    }


def _trigger(dag_id: str, port: int) -> str:
    """One run of dag_id to its end (scripts/trigger_and_wait.py); its run id."""
    proc = subprocess.run(
        [PYTHON, str(ROOT / "scripts" / "trigger_and_wait.py"), dag_id, "--timeout", "900"],
        env=env(port),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if proc.returncode:
        raise RuntimeError(f"{dag_id} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout.split("run ", 1)[1].split()[0]


def report(results: dict) -> str:
    summary = results["summary"]

    def median(name: str, metric: str) -> float:
        return summary[name][metric]["median"]

    def spread(name: str, metric: str) -> str:
        found = summary[name][metric]
        return f"{found['median']:.1f} s ({found['low']:.0f}-{found['high']:.0f})"

    rows = "\n".join(
        f"| `{name}` | {spread(name, 'wall_s')} | {median(name, 'clusters'):.0f} | "
        f"{median(name, 'starting_s'):.1f} s "
        f"({median(name, 'starting_s') / median(name, 'clusters'):.1f} s each) | "
        f"{median(name, 'cluster_s'):.1f} s |"
        for name in PIPELINES_TEXT
    )
    shared, per_step, prewarm = "shared", "per_step", "shared_prewarm"
    starting = median(shared, "starting_s") / median(per_step, "starting_s")
    machine = results["machine"]
    return f"""# Stages benchmark: one cluster per stage, prewarm

Reproduce: `.venv/bin/python -m bench.stages --repeats {results["repeats"]}` (this file).
Measured {results["at"]} on {machine["cores"]} cores ({machine["cpu"]}), Airflow
{machine["airflow"]}, distributed {machine["distributed"]}; LocalExecutor, SQLite, local Dask
clusters of 2 workers. Medians of {results["repeats"]} runs each, taken in turn.

{STEPS} steps, each {results["step_seconds"]} s of real Dask work (sleeping tasks, so that the
numbers do not depend on the CPU share a step gets):

- `per_step`: a cluster per step, as with EMR-style operators (create, add step, terminate);
- `shared`: {STEPS - 1} steps on the cluster of stage `a`, the last on stage `b`'s;
- `shared_prewarm`: the same, with `prewarm: true` on `b`.

| pipeline | run wall time (min-max) | clusters started | time starting clusters | cluster-seconds |
|---|---|---|---|---|
{rows}

Ratios (medians):

- wall time, shared / per step: **{median(shared, "wall_s") / median(per_step, "wall_s"):.2f}x**;
  cluster-seconds: **{median(shared, "cluster_s") / median(per_step, "cluster_s"):.2f}x**;
  time spent starting clusters: **{starting:.2f}x**.
- prewarm: wall time **{median(prewarm, "wall_s") / median(shared, "wall_s"):.2f}x** of
  `shared` ({median(shared, "wall_s") - median(prewarm, "wall_s"):+.1f} s per run), for
  {median(prewarm, "cluster_s") - median(shared, "cluster_s"):+.1f} cluster-seconds: stage `b`'s
  cluster is up while `a`'s last step runs.

Reading it: sharing a stage's cluster saves a cluster start per step and the task hops of its
cluster_up and teardown, which is what the wall time and the time spent starting clusters show.
Prewarm saves at most one cluster start per stage: a local cluster starts in a few seconds, in
the noise of the scheduler's task hops on a loaded 2-core machine (the range in brackets is
min-max), so it shows no gain here and costs cluster-seconds. It is meant for clusters that
take minutes to start (Fargate: image pull and package install, typically 1-3 minutes).

Wall time is from the first task's start to the last task's end, so the scheduler's own delays
between tasks count, as a user waits for them. Cluster-seconds add, per stage, the time from
its cluster_up's start to its teardown's end.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stages")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report-only", action="store_true", help="render the last results")
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads((BASE / "results.json").read_text())
    else:
        results = run(args.repeats, lambda text: print(f"[bench {time.strftime('%X')}] {text}"))
        results["machine"] = machine_info()
        results["at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        (BASE / "results.json").write_text(json.dumps(results, indent=1))
    REPORT.write_text(report(results))
    print(f"wrote {REPORT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
