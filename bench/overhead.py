"""Run overhead: bootstrap (cold and warm), local cluster up and down, run start to first line.

Each measurement runs `overhead_child.py` in a fresh interpreter with a private
DAGFACTORY_HOME, against the fan-out benchmark's git repository. "Cold" means an empty
DAGFACTORY_HOME: dulwich clones the repository, the commit is exported and a virtualenv with
distributed and bokeh is made by uv, whose own download cache stays warm between runs (this
machine cannot download anything else; a first-ever install would also download the wheels).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from bench import fanout
from bench.environment import PYTHON, WORK, airflow_env
from bench.stats import summarize

CHILD = Path(__file__).with_name("overhead_child.py")
BASE = WORK / "overhead"


def _child(home: Path, *args: str, timeout: float = 1200, bytecode: bool = True) -> dict:
    result = BASE / "result.json"
    result.unlink(missing_ok=True)
    env = airflow_env(WORK / "airflow-overhead", DAGFACTORY_HOME=str(home))
    if not bytecode:
        # As this machine runs everything by default: nothing may write .pyc files, and the
        # virtualenvs uv makes ship none, so each Dask process compiles what it imports.
        env.pop("PYTHONPYCACHEPREFIX", None)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    pipeline = fanout.PIPELINES / "fanout_100.yml"
    cmd = [PYTHON, str(CHILD), args[0], str(pipeline), str(result), *args[1:]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return json.loads(result.read_text())


def run(
    cold_repeats: int,
    warm_repeats: int,
    cluster_repeats: int,
    worker_counts: list[int],
    first_line_repeats: int,
    log: Callable[[str], None] = print,
) -> dict:
    if not fanout.PIPELINES.is_dir():
        fanout.make_dags([100])
    BASE.mkdir(parents=True, exist_ok=True)
    results: dict = {"bootstrap": {}, "cluster": {}, "first_line": {}}

    cold, warm_same, warm_fresh = [], [], []
    for i in range(cold_repeats):
        home = BASE / f"home-cold-{i}"
        shutil.rmtree(home, ignore_errors=True)
        r = _child(home, "bootstrap")
        cold.append(r["first"])
        warm_same.append(r["second"])
        log(f"bootstrap cold #{i + 1}: {r['first']['total_s']:.2f} s")
        if i < cold_repeats - 1:
            shutil.rmtree(home, ignore_errors=True)
    warm_home = BASE / f"home-cold-{cold_repeats - 1}"
    for i in range(warm_repeats):
        r = _child(warm_home, "bootstrap")
        warm_fresh.append(r["first"])
        warm_same.append(r["second"])
        log(f"bootstrap warm #{i + 1}: {r['first']['total_s'] * 1000:.0f} ms (fresh process)")
    for name, runs in (("cold", cold), ("warm", warm_same), ("warm_fresh", warm_fresh)):
        results["bootstrap"][name] = {
            part: summarize([r[part] for r in runs]).to_json()
            for part in ("resolve_s", "checkout_s", "venv_s", "total_s")
        }

    for workers in worker_counts:
        r = _child(warm_home, "cluster", str(workers), str(cluster_repeats))
        runs = r["runs"]
        if any(run["left"] for run in runs):
            raise RuntimeError(f"cluster down left processes behind: {runs}")
        results["cluster"][str(workers)] = {
            part: summarize([run[part] for run in runs]).to_json()
            for part in ("up_s", "down_s", "exited_s", "scan_s")
        }
        results["cluster"][str(workers)]["processes"] = runs[-1]["processes"]
        ups = ", ".join(f"{run['up_s']:.2f}" for run in runs)
        downs = ", ".join(f"{run['down_s']:.2f}" for run in runs)
        log(f"cluster {workers} worker(s): up {ups} s; down {downs} s")

    if 2 in worker_counts:
        r = _child(warm_home, "cluster", "2", str(cluster_repeats), bytecode=False)
        results["cluster_no_bytecode"] = {
            part: summarize([run[part] for run in r["runs"]]).to_json()
            for part in ("up_s", "down_s")
        }
        ups = ", ".join(f"{run['up_s']:.2f}" for run in r["runs"])
        log(f"cluster 2 worker(s), no bytecode cache: up {ups} s")

    r = _child(warm_home, "first-line", str(first_line_repeats))
    results["first_line"] = {
        part: summarize([run[part] for run in r["runs"]]).to_json()
        for part in ("first_line_s", "total_s")
    }
    log(
        "run_entrypoint to first line: "
        + ", ".join(f"{run['first_line_s']:.2f}" for run in r["runs"])
        + " s"
    )
    return results
