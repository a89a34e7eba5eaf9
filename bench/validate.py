"""`dagfactory validate` over a folder of pipeline files, as CI runs it (a fresh process)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench import parse
from bench.environment import PYTHON, WORK, airflow_env
from bench.stats import summarize


def run(sizes: list[int], repeats: int, log: Callable[[str], None] = print) -> dict:
    results = {}
    for n in sizes:
        folder = parse.generate(n)["ours"].parent.parent / "pipelines"
        times = []
        for rep in range(repeats):
            times.append(_once(folder))
            log(f"validate {n} files #{rep + 1}: {times[-1]:.2f} s")
        results[str(n)] = summarize(times).to_json()
    return results


def _once(folder: Path) -> float:
    env = airflow_env(WORK / "airflow-validate")
    started = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, "-m", "dagfactory.cli", "validate", str(folder)],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if proc.returncode:
        raise RuntimeError(f"dagfactory validate {folder} failed:\n{proc.stdout}{proc.stderr}")
    return elapsed
