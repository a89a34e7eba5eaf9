"""A chatty entry point: N printed lines, in the Airflow run task and in `dagfactory run`.

    .venv/bin/python -m bench.chatty [--lines 100000] [--repeats 3] [--before REV]

Each measurement is a fresh interpreter (private AIRFLOW_HOME and DAGFACTORY_HOME under
bench/.work/chatty) running the whole pipeline on a 1-worker local cluster:

- airflow: `dag.test()` of the DAG the loader builds, with the real operators; the log is what
  the process prints (dag.test() runs the tasks in-process and logs to the console).
- cli: `dagfactory run FILE`; the log is what it prints.

"entry point" is the wall time of `run_entrypoint` (the same clock in both), "run task" the
Airflow task's own duration. "before" runs the runner and shim of git revision REV (default:
the commit this change was made on), loaded from `git show`, in place of today's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from bench.environment import PYTHON, ROOT, WORK, airflow_env

BASE = WORK / "chatty"
BEFORE = "1e4a20331ece9a44997b8f965c654b5a093d844f"
JOB = """\
def main(client, lines=100000):
    for i in range(lines):
        print(f"line {i} of a chatty entry point")
    return lines
"""


def _setup(lines: int) -> tuple[Path, dict[str, str]]:
    """A git repository with the chatty job, its pipeline file, a migrated Airflow home."""
    repo = BASE / "repo"
    if not (repo / ".git").is_dir():
        shutil.rmtree(repo, ignore_errors=True)
        (repo / "chatty").mkdir(parents=True)
        (repo / "chatty" / "__init__.py").write_text("")
        (repo / "chatty" / "job.py").write_text(JOB)
        git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.invalid"]
        subprocess.run([*git, "init", "-q", "-b", "main"], cwd=repo, check=True)
        subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
        subprocess.run([*git, "commit", "-q", "-m", "chatty"], cwd=repo, check=True)
    pipelines = BASE / "pipelines"
    pipelines.mkdir(parents=True, exist_ok=True)
    (pipelines / "chatty.yml").write_text(
        textwrap.dedent(
            f"""\
            source: {{git: {repo}}}
            entrypoint: chatty.job:main
            params: {{lines: {lines}}}
            cluster: {{workers: 1, memory: 1GiB}}
            """
        )
    )
    home = BASE / "airflow"
    env = airflow_env(home, ROOT / "dags", DAGFACTORY_PIPELINES_DIR=str(pipelines))
    if not (home / ".migrated").exists():
        subprocess.run([PYTHON, "-m", "airflow", "db", "migrate"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        (home / ".migrated").touch()
    return pipelines / "chatty.yml", env


def _old_runner(rev: str) -> Path:
    folder = BASE / f"before-{rev[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("runner.py", "entry_shim.py"):
        text = subprocess.run(["git", "show", f"{rev}:dagfactory/{name}"], cwd=ROOT,
                              check=True, capture_output=True, text=True).stdout  # fmt: skip
        (folder / name).write_text(text)
    return folder / "runner.py"


def _measure(mode: str, variant: str, rev: str, pipeline: Path, env: dict[str, str]) -> dict:
    out = BASE / "out.json"
    out.unlink(missing_ok=True)
    output = BASE / "output.txt"
    runner = str(_old_runner(rev)) if variant == "before" else ""
    cmd = [PYTHON, "-m", "bench.chatty", "--child", mode, str(pipeline), str(out), runner]
    with open(output, "wb") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode or not out.exists():
        tail = output.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{mode} {variant} failed (exit {proc.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    text = output.read_text(errors="replace")
    result["log_bytes"] = output.stat().st_size
    result["lines_found"] = text.count(" of a chatty entry point")
    return result


def _child(mode: str, pipeline: Path, out: Path, runner: str) -> None:
    """In the measured interpreter: patch the runner (to time it, or to use the old one), run."""
    from dagfactory.run import steps

    run_entrypoint = steps.run_entrypoint
    if runner:
        loaded = importlib.util.spec_from_file_location("dagfactory_runner_before", runner)
        module = importlib.util.module_from_spec(loaded)
        loaded.loader.exec_module(module)
        run_entrypoint = module.run_entrypoint
    timing = {}

    def timed(*args, key: str = "", **kwargs):
        started = time.perf_counter()
        try:
            if not runner:
                kwargs["key"] = key
            return run_entrypoint(*args, **kwargs)
        finally:
            timing["entrypoint_s"] = time.perf_counter() - started

    steps.run_entrypoint = timed
    if mode == "cli":
        from dagfactory import cli

        code = cli.main(["run", str(pipeline)])
        if code:
            raise SystemExit(code)
        out.write_text(json.dumps(timing))
        return
    from airflow.utils.cli import get_bagged_dag

    dag_run = get_bagged_dag(None, "chatty").test()
    run = next(t for t in dag_run.get_task_instances() if t.task_id == "pipeline.run")
    if str(run.state) != "success":
        raise SystemExit(f"the run task ended {run.state}")
    timing["task_s"] = (run.end_date - run.start_date).total_seconds()
    out.write_text(json.dumps(timing))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chatty", description=__doc__)
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", default=BEFORE, help="git revision of the old runner")
    parser.add_argument("--no-before", action="store_true", help="measure today's code only")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        mode, pipeline, out, runner = args.child
        _child(mode, Path(pipeline), Path(out), runner)
        return 0
    BASE.mkdir(parents=True, exist_ok=True)
    pipeline, env = _setup(args.lines)
    variants = ["after"] if args.no_before else ["before", "after"]
    rows = []
    for mode in ("airflow", "cli"):
        for variant in variants:
            runs = []
            for i in range(args.repeats):
                runs.append(_measure(mode, variant, args.before, pipeline, env))
                print(f"[chatty] {mode} {variant} #{i + 1}: {runs[-1]}", file=sys.stderr)
            rows.append((mode, variant, runs))
    print(f"\n{args.lines} lines printed by the entry point; median of {args.repeats} runs\n")
    print("| where | code | entry point (s) | run task (s) | log (MB) | lines in log |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for mode, variant, runs in rows:

        def med(key: str, runs=runs) -> float:
            return statistics.median(r[key] for r in runs) if key in runs[0] else float("nan")

        task = f"{med('task_s'):.1f}" if mode == "airflow" else "-"
        print(
            f"| {mode} | {variant} | {med('entrypoint_s'):.1f} | {task} | "
            f"{med('log_bytes') / 1e6:.1f} | {min(r['lines_found'] for r in runs)} |"
        )
    cmd = f".venv/bin/python -m bench.chatty --lines {args.lines} --repeats {args.repeats}"
    print(f"\nreproduce: {cmd}  (before = {args.before[:12]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
