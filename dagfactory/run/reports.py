"""Where each run's Dask performance report lives: one HTML file per task try, under
DAGFACTORY_HOME, so that it outlives the cluster and any host's task log."""

from __future__ import annotations

import re
from pathlib import Path

from dagfactory.run.workspace import dagfactory_home


def reports_dir() -> Path:
    return dagfactory_home() / "reports"


def report_path(dag_id: str, run_id: str, task_id: str, try_number: int) -> Path:
    """The report of one try of one task of one run (the names made safe for a path)."""
    parts = [_safe(dag_id), _safe(run_id), _safe(task_id), f"try-{int(try_number)}.html"]
    return reports_dir().joinpath(*parts)


def run_reports(dag_id: str, run_id: str) -> list[Path]:
    """The reports written for one run, oldest first (its steps and tries in the order run)."""
    folder = report_path(dag_id, run_id, "_", 1).parent.parent
    found = []
    for path in folder.glob("*/try-*.html"):
        try:
            found.append((path.stat().st_mtime, str(path), path))
        except OSError:  # pruned meanwhile
            continue
    return [path for *_, path in sorted(found)]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).lstrip(".") or "_"
