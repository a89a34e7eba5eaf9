"""Fan-out: one job of N independent chunks, as a dagfactory pipeline and as a mapped DAG.

Both run under `airflow dags test` in the same AIRFLOW_HOME and the same Airflow, and do the
same work per chunk (`fanjob.job.work`, ~10 ms of SHA-256 rounds):

- `fanout_N`: a generated pipeline (bootstrap, cluster_up, run, teardown) whose entry point
  `fanjob.job:main(client, chunks=N)` maps the chunks over a 2-worker local Dask cluster;
- `mapped_N`: the same job written as Airflow DAG with dynamic task mapping: a task returns the
  N chunk seeds, `work.expand(seed=...)` runs one task instance per chunk, a last task sums up.

The repository the pipeline clones is a real git repository made under bench/.work; its
virtualenv is built before the timed runs (the cold bootstrap is measured in `overhead`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.environment import PYTHON, ROOT, WORK, airflow_env
from bench.stats import summarize

BASE = WORK / "fanout"
REPO = BASE / "repo"
DAGS = BASE / "dags"
PIPELINES = BASE / "pipelines"
HOME = WORK / "airflow-fanout"
ROUNDS = 15_000
"""SHA-256 rounds per chunk: about 10 ms of CPU on this machine."""
WORKERS = 2

JOB = f'''\
"""Fan-out benchmark job: N independent chunks of a little real CPU work."""

import hashlib

ROUNDS = {ROUNDS}


def work(seed: int) -> str:
    """About 10 ms of SHA-256 rounds; returns a short digest."""
    digest = seed.to_bytes(8, "little")
    for _ in range(ROUNDS):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()[:16]


def summarize(digests) -> dict:
    digests = list(digests)
    return {{"chunks": len(digests), "xor": f"{{_xor(digests):016x}}"}}


def _xor(digests) -> int:
    total = 0
    for d in digests:
        total ^= int(d, 16)
    return total


def hello(client) -> dict:
    """Prints at once: the overhead benchmark times the way to this line."""
    print("entry point started", flush=True)
    return {{"workers": len(client.nthreads())}}


def main(client, chunks: int = 1000) -> dict:
    print(f"mapping {{chunks}} chunks over {{len(client.nthreads())}} workers", flush=True)
    futures = client.map(work, range(int(chunks)), pure=False)
    return summarize(client.gather(futures))
'''

PIPELINE = """\
description: Fan-out benchmark, {n} chunks
owner: bench
schedule: null
source:
  git: {repo}
  ref: main
entrypoint: fanjob.job:main
params:
  chunks: {n}
cluster:
  backend: local
  workers: {workers}
  cpu: 1
  memory: 1GiB
  idle_timeout: 10m
"""

MAPPED = '''\
"""Fan-out benchmark as an airflow DAG with dynamic task mapping (one task instance per chunk)."""

import sys

from airflow.sdk import DAG, task

sys.path.insert(0, {repo!r})
from fanjob import job  # noqa: E402

for n in {sizes!r}:
    with DAG(dag_id=f"mapped_{{n}}", schedule=None, max_active_tasks=16, tags=["bench"]) as dag:

        @task
        def chunks(n=n):
            return list(range(n))

        @task
        def work(seed):
            return job.work(seed)

        @task
        def summarize(digests):
            return job.summarize(digests)

        summarize(work.expand(seed=chunks()))
    globals()[dag.dag_id] = dag

# Airflow's own fixed cost of `airflow dags test`: one task that does nothing.
with DAG(dag_id="noop", schedule=None, tags=["bench"]) as noop:

    @task
    def nothing():
        return None

    nothing()
'''

RUN_INFO = """
import json, sys
from airflow.models.dagrun import DagRun
from airflow.models.taskinstance import TaskInstance
from airflow.utils.session import create_session
with create_session() as s:
    run = s.query(DagRun).filter_by(dag_id=sys.argv[1]).order_by(DagRun.id.desc()).first()
    tis = s.query(TaskInstance).filter_by(dag_id=run.dag_id, run_id=run.run_id).all()
    states = {}
    for ti in tis:
        states[str(ti.state)] = states.get(str(ti.state), 0) + 1
    print(json.dumps({
        "run_id": run.run_id, "state": str(run.state),
        "run_s": (run.end_date - run.start_date).total_seconds() if run.end_date else None,
        "task_instances": len(tis), "ti_states": states,
    }))
"""


def git(*args: str, cwd: Path = REPO) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.invalid",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    }
    out = subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)
    return out.stdout.decode().strip()


def make_repo() -> Path:
    """A real git repository holding the benchmark job (made once, then reused)."""
    if (REPO / ".git").is_dir():
        return REPO
    shutil.rmtree(REPO, ignore_errors=True)
    (REPO / "fanjob").mkdir(parents=True)
    (REPO / "fanjob" / "__init__.py").write_text('"""Fan-out benchmark job."""\n')
    (REPO / "fanjob" / "job.py").write_text(JOB)
    git("init", "-q", "-b", "main")
    git("add", "-A")
    git("commit", "-q", "-m", "fan-out benchmark job")
    return REPO


def make_dags(sizes: list[int]) -> None:
    """The DAGs folder: our loader over fanout_N pipelines, and the mapped_N DAGs."""
    make_repo()
    shutil.rmtree(DAGS, ignore_errors=True)
    shutil.rmtree(PIPELINES, ignore_errors=True)
    DAGS.mkdir(parents=True)
    PIPELINES.mkdir(parents=True)
    shutil.copyfile(ROOT / "dags" / "pipelines.py", DAGS / "pipelines.py")
    for n in sizes:
        text = PIPELINE.format(n=n, repo=REPO, workers=WORKERS)
        (PIPELINES / f"fanout_{n}.yml").write_text(text)
    (DAGS / "mapped.py").write_text(MAPPED.format(repo=str(REPO), sizes=sizes))


def env(**extra: str) -> dict[str, str]:
    return airflow_env(
        HOME,
        DAGS,
        DAGFACTORY_PIPELINES_DIR=str(PIPELINES),
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        **extra,
    )


def migrate(log: Callable[[str], None] = print) -> None:
    """A fresh SQLite metadata DB, so that earlier runs cannot slow these ones down."""
    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir(parents=True)
    log(f"airflow db migrate in {HOME}")
    subprocess.run(
        [PYTHON, "-m", "airflow", "db", "migrate"], env=env(), check=True, capture_output=True
    )


def warm_workspace(log: Callable[[str], None] = print) -> None:
    """Build the pipeline's checkout and virtualenv once, before any timed run."""
    code = (
        "from dagfactory.spec.load import load_file\nfrom dagfactory import steps\nimport sys\n"
        "steps.bootstrap(load_file(sys.argv[1]), output=print)"
    )
    spec = next(PIPELINES.glob("fanout_*.yml"))
    log("warming the pipeline's checkout and virtualenv")
    subprocess.run([PYTHON, "-c", code, str(spec)], env=env(), check=True, capture_output=True)


def dags_test(dag_id: str, timeout: float, **extra_env: str) -> dict:
    """`airflow dags test DAG_ID`, timed end to end; the run's state from the metadata DB."""
    logs = BASE / "logs"
    logs.mkdir(exist_ok=True)
    log_file = logs / f"{dag_id}.log"
    started = time.perf_counter()
    with open(log_file, "w") as out:
        proc = subprocess.run(
            [PYTHON, "-m", "airflow", "dags", "test", dag_id],
            env=env(**extra_env),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    wall = time.perf_counter() - started
    info = subprocess.run(
        [PYTHON, "-c", RUN_INFO, dag_id], env=env(), capture_output=True, text=True, check=True
    )
    result = json.loads(info.stdout.strip().splitlines()[-1])
    result.update(wall_s=wall, exit_code=proc.returncode, log=str(log_file.relative_to(ROOT)))
    result["tasks"] = task_durations(log_file)
    if result["state"] != "success":
        text = log_file.read_text(errors="replace")
        found = re.search(r".*(too large to map|max_map_length|unmappable)[^\n]*", text)
        result["failure"] = found.group(0).strip()[-400:] if found else text[-400:]
    return result


_TASK_EDGE = re.compile(
    r"^(\S+)Z .*\[DAG TEST\] (starting|end task) task_id=(\S+) map_index=(-?\d+)"
)


def task_durations(log_file: Path) -> dict[str, float]:
    """Seconds per task (mapped instances summed) from `dags test`'s own log lines."""
    from datetime import datetime

    starts: dict[tuple[str, str], datetime] = {}
    totals: dict[str, float] = {}
    for line in log_file.read_text(errors="replace").splitlines():
        match = _TASK_EDGE.match(line)
        if not match:
            continue
        when = datetime.fromisoformat(match.group(1))
        key = (match.group(3), match.group(4))
        if match.group(2) == "starting":
            starts[key] = when
        elif key in starts:
            name = key[0].split(".")[-1]
            totals[name] = totals.get(name, 0.0) + (when - starts.pop(key)).total_seconds()
    return totals


def run(
    sizes: list[int],
    repeats: dict[int, int],
    mapped_repeats: dict[int, int],
    raised_limit: list[int],
    log: Callable[[str], None] = print,
) -> dict:
    make_dags(sizes)
    migrate(log)
    warm_workspace(log)
    results: dict = {"sizes": sizes, "workers": WORKERS, "rounds": ROUNDS, "runs": {}}
    for rep in range(max(repeats.values())):
        r = dags_test("noop", timeout=600)
        results["runs"].setdefault("noop", []).append(r)
        log(f"fan-out noop #{rep + 1}: {r['state']} in {r['wall_s']:.1f} s")
    for n in sizes:
        refused = False
        for rep in range(max(repeats[n], mapped_repeats[n])):
            for kind, count in (("fanout", repeats[n]), ("mapped", mapped_repeats[n])):
                if rep >= count or (kind == "mapped" and refused):
                    continue
                dag_id = f"{kind}_{n}"
                r = dags_test(dag_id, timeout=3600)
                results["runs"].setdefault(dag_id, []).append(r)
                log(
                    f"fan-out {dag_id} #{rep + 1}: {r['state']} in {r['wall_s']:.1f} s "
                    f"({r['task_instances']} task instances)"
                )
                # A refused mapping fails the same way every time.
                refused = refused or (kind == "mapped" and r["state"] != "success")
    for n in raised_limit:
        dag_id = f"mapped_{n}"
        r = dags_test(dag_id, timeout=7200, AIRFLOW__CORE__MAX_MAP_LENGTH=str(n))
        results["runs"][f"{dag_id}|max_map_length={n}"] = [r]
        log(f"fan-out {dag_id} with max_map_length={n}: {r['state']} in {r['wall_s']:.1f} s")
    results["summary"] = {
        key: {
            "wall_s": summarize([r["wall_s"] for r in runs]).to_json(),
            "run_s": summarize([r["run_s"] for r in runs if r["run_s"]]).to_json(),
            "state": runs[-1]["state"],
            "task_instances": runs[-1]["task_instances"],
            "failure": runs[-1].get("failure", ""),
            "tasks": {
                name: summarize([r["tasks"].get(name, 0.0) for r in runs]).to_json()
                for name in runs[-1]["tasks"]
            },
        }
        for key, runs in results["runs"].items()
    }
    return results
