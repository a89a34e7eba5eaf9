"""DAG parse at scale: dagfactory against dag-factory and against the floor, side by side.

For each N, three folders of N files describe the same N DAGs (one per file: a TaskGroup
"pipeline" of four tasks in a chain, with the same DAG arguments and params):

- `ours`: pipeline YAML files and a copy of `dags/pipelines.py` (the loader Airflow imports),
  with full validation (JSON Schema, typed spec, extra checks);
- `dag-factory`: dag-factory 1.x YAML with EmptyOperators, loaded by its `load_yaml_dags`,
  in dag-factory's own virtualenv;
- `floor`: a loader that reads our YAML files with `yaml.CSafeLoader` and builds the DAGs
  directly with EmptyOperators, no validation: what any YAML-to-DAG tool must at least pay.

Each parse runs `parse_child.py` in a fresh interpreter. Contenders take turns within each
repeat, so that drifts of the noisy machine hit all of them alike.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.environment import ROOT, WORK, airflow_env
from bench.stats import summarize

CONTENDERS = ("ours", "dag-factory", "floor")
CHILD = Path(__file__).with_name("parse_child.py")
CONTEXT_DAG = "p{index:05d}"
"""DAG ids are p00001 ... pN; file names are the DAG ids."""
EMPTY = "airflow.providers.standard.operators.empty.EmptyOperator"
TASKS = ("bootstrap", "cluster_up", "run", "teardown")

OURS_YAML = """\
# yaml-language-server: $schema=../schemas/pipeline.schema.json
description: Pipeline {index} of the parse benchmark
owner: data-eng
tags: [bench, team-{team}]
schedule: "@daily"
start_date: 2026-01-01
catchup: false
retries: 1
timeout: 30m
source:
  git: https://git.example.invalid/acme/pipelines.git
  ref: main
  subdir: jobs/job{index}
  requirements: requirements.txt
entrypoint: jobs.job{index}:main
params:
  chunks: {chunks}
  top: 5
  label: "{{{{ ds }}}}"
cluster:
  backend: local
  workers: 2
  cpu: 1
  memory: 1GiB
"""

DAG_FACTORY_YAML = """\
{dag_id}:
  description: Pipeline {index} of the parse benchmark
  schedule: "@daily"
  catchup: false
  max_active_tasks: 4
  tags: [bench, dagfactory, team-{team}]
  params:
    chunks: {chunks}
    top: 5
    label: "{{{{ ds }}}}"
  default_args:
    owner: data-eng
    retries: 1
    start_date: 2026-01-01
  task_groups:
    - group_name: pipeline
      tooltip: jobs.job{index}:main on a local cluster
  tasks:
    - task_id: bootstrap
      operator: {empty}
      task_group_name: pipeline
    - task_id: cluster_up
      operator: {empty}
      task_group_name: pipeline
      dependencies: [bootstrap]
    - task_id: run
      operator: {empty}
      task_group_name: pipeline
      dependencies: [cluster_up]
    - task_id: teardown
      operator: {empty}
      task_group_name: pipeline
      dependencies: [run]
"""

DAG_FACTORY_LOADER = '''\
"""dag-factory's documented loader: every YAML file of the folder becomes a DAG (airflow)."""

from dagfactory import load_yaml_dags

load_yaml_dags(globals_dict=globals(), dags_folder={folder!r})
'''

FLOOR_LOADER = '''\
"""The floor: the same airflow DAG shape from CSafeLoader output, no validation at all."""

from datetime import datetime, timezone
from pathlib import Path

import yaml
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, TaskGroup

for path in sorted(Path({folder!r}).glob("*.yml")):
    spec = yaml.load(path.read_bytes(), Loader=yaml.CSafeLoader)
    dag_id = path.stem
    start = spec["start_date"]
    with (
        DAG(
            dag_id=dag_id,
            description=spec["description"],
            schedule=spec["schedule"],
            start_date=datetime(start.year, start.month, start.day, tzinfo=timezone.utc),
            catchup=spec["catchup"],
            tags=sorted({{"dagfactory", *spec["tags"]}}),
            params=spec["params"],
            doc_md=spec["description"],
            default_args={{"owner": spec["owner"], "retries": spec["retries"]}},
            max_active_tasks=4,
        ) as dag,
        TaskGroup("pipeline", tooltip=f"{{spec['entrypoint']}} on a local cluster"),
    ):
        bootstrap = EmptyOperator(task_id="bootstrap")
        cluster_up = EmptyOperator(task_id="cluster_up")
        run = EmptyOperator(task_id="run")
        teardown = EmptyOperator(task_id="teardown")
        bootstrap >> cluster_up >> run >> teardown.as_teardown(setups=cluster_up)
    globals()[dag_id] = dag
'''


def dag_id(index: int) -> str:
    return CONTEXT_DAG.format(index=index)


def generate(n: int) -> dict[str, Path]:
    """The three contenders' DAG folders for N pipeline files; returns each one's loader file."""
    base = WORK / "parse" / f"n{n}"
    done = base / ".complete"
    loaders = {
        "ours": base / "ours" / "dags" / "pipelines.py",
        "dag-factory": base / "dag-factory" / "dags" / "dag_factory_loader.py",
        "floor": base / "floor" / "dags" / "floor_loader.py",
    }
    # The loader is copied on every run, so that the current dags/pipelines.py is measured.
    if not done.is_file():
        shutil.rmtree(base, ignore_errors=True)
        ours_dir = base / "ours" / "pipelines"
        df_dir = base / "dag-factory" / "configs"
        for folder in (ours_dir, df_dir, *(p.parent for p in loaders.values())):
            folder.mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            fields = {"index": i, "team": i % 7, "chunks": 16 + i % 50, "dag_id": dag_id(i)}
            (ours_dir / f"{dag_id(i)}.yml").write_text(OURS_YAML.format(**fields))
            (df_dir / f"{dag_id(i)}.yml").write_text(DAG_FACTORY_YAML.format(**fields, empty=EMPTY))
        loaders["dag-factory"].write_text(DAG_FACTORY_LOADER.format(folder=str(df_dir)))
        loaders["floor"].write_text(FLOOR_LOADER.format(folder=str(ours_dir)))
        done.write_text(str(n))
    shutil.copyfile(ROOT / "dags" / "pipelines.py", loaders["ours"])
    return loaders


def parse_once(
    python: Path | str,
    loader: Path,
    mode: str = "processor",
    context: tuple[str, str] | None = None,
    profile: Path | None = None,
    timeout: float = 1800,
) -> dict:
    """One parse of `loader` in a fresh interpreter; the child's report plus its wall time."""
    out_dir = WORK / "parse" / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    result_file = out_dir / "result.json"
    result_file.unlink(missing_ok=True)
    env = airflow_env(
        WORK / "airflow-parse",
        loader.parent,
        # The default 30 s would cut the biggest parses off; the report says which ones
        # would not fit under it.
        AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="0",
    )
    if context:
        env["_AIRFLOW_PARSING_CONTEXT_DAG_ID"], env["_AIRFLOW_PARSING_CONTEXT_TASK_ID"] = context
    if profile:
        env["BENCH_PROFILE"] = str(profile)
    cmd = [str(python), str(CHILD), mode, str(loader), str(loader.parent), str(result_file)]
    cmd.append(str(out_dir / "log.jsonl"))
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - started
    if proc.returncode or not result_file.is_file():
        raise RuntimeError(f"parse of {loader} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    report = json.loads(result_file.read_text())
    report["process_s"] = wall
    return report


def run(
    sizes: list[int],
    repeats: dict[int, int],
    pythons: dict[str, Path | str],
    context_sizes: list[int],
    log: Callable[[str], None] = print,
) -> dict:
    """Full parses for every size and contender, and the parsing-context case for ours."""
    results: dict = {"sizes": sizes, "full": {}, "context": {}}
    for n in sizes:
        loaders = generate(n)
        runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
        for rep in range(repeats[n]):
            for contender in CONTENDERS:
                report = parse_once(pythons[contender], loaders[contender])
                if report["dags"] != n or report["errors"]:
                    raise RuntimeError(
                        f"{contender} at N={n}: {report['dags']} DAGs, {report['errors']} "
                        f"import errors: {report['first_error']}"
                    )
                runs[contender].append(report)
                log(
                    f"parse N={n} {contender} #{rep + 1}: {report['parse_s']:.2f} s, "
                    f"peak RSS {report['peak_rss_kib'] / 1024:.0f} MiB"
                )
        results["full"][str(n)] = {c: _summarize(r) for c, r in runs.items()}
        if n in context_sizes:
            results["context"][str(n)] = context_case(n, loaders, repeats[n], pythons, log)
    return results


def context_case(
    n: int, loaders: dict[str, Path], repeats: int, pythons: dict, log: Callable[[str], None]
) -> dict:
    """What a task's start costs: the task runner's parse, with and without a parsing context.

    The DAG asked for is the one in the middle of the folder. dag-factory has no parsing
    context support, so its task parse is the full folder either way: measured with the
    context set, to show it.
    """
    wanted = (dag_id(max(1, n // 2)), "pipeline.run")
    cases = (("ours", "no context"), ("ours", "context"), ("dag-factory", "context"))
    runs: dict[str, list[dict]] = {}
    for _ in range(repeats):
        for contender, label in cases:
            context = wanted if label == "context" else None
            report = parse_once(pythons[contender], loaders[contender], "task", context)
            if report["errors"] or not report["dags"]:
                raise RuntimeError(f"task parse of {contender} failed: {report['first_error']}")
            runs.setdefault(f"{contender}|{label}", []).append(report)
            log(f"task parse N={n} {contender} {label}: {report['parse_s']:.3f} s")
    summary = {key: _summarize(r) for key, r in runs.items()}
    summary["wanted"] = list(wanted)
    return summary


def _summarize(reports: list[dict]) -> dict:
    return {
        "parse_s": summarize([r["parse_s"] for r in reports]).to_json(),
        "import_s": summarize([r["import_s"] for r in reports]).to_json(),
        "serialize_s": summarize([r["serialize_s"] for r in reports]).to_json(),
        "parse_cpu_s": summarize([r["parse_cpu_s"] for r in reports]).to_json(),
        "process_s": summarize([r["process_s"] for r in reports]).to_json(),
        "setup_s": summarize([r["setup_s"] for r in reports]).to_json(),
        "peak_rss_mib": summarize([r["peak_rss_kib"] / 1024 for r in reports]).to_json(),
        "rss_growth_mib": summarize(
            [(r["peak_rss_kib"] - r["rss_before_kib"]) / 1024 for r in reports]
        ).to_json(),
        "dags": reports[-1]["dags"],
    }


def profile(n: int, contender: str, python: Path | str, mode: str = "processor", context=None):
    """cProfile stats of one parse (written next to the other scratch data)."""
    loaders = generate(n)
    target = WORK / "profiles" / f"parse-{contender}-n{n}-{mode}{'-ctx' if context else ''}.prof"
    target.parent.mkdir(parents=True, exist_ok=True)
    parse_once(python, loaders[contender], mode, context, profile=target)
    return target
