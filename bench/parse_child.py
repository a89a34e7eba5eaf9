"""Parse one DAG file the way Airflow 3 does it, in this (fresh) interpreter, and time it.

Run by `bench.parse` under each contender's own interpreter (ours, dag-factory's virtualenv), so
it imports only the standard library and Airflow. Two modes:

- `processor`: what the DAG processor's child does for a file (the steps of
  `processor._parse_file`): the stability check, `BundleDagBag` (import the file, collect its
  DAGs) and serializing every DAG.
  Before that, the Airflow modules the file imports are imported, because the DAG processor
  does that once in its long-lived parent before it forks a child per file
  (`parsing_pre_import_modules`). Logs go through the same JSON channel the real child uses,
  written to a file instead of the supervisor's socket.
- `task`: what a task's runner does before it runs the task (`task_runner.parse`): a
  `BundleDagBag` of the file, no serialization. The caller sets the parsing context
  (`_AIRFLOW_PARSING_CONTEXT_DAG_ID` / `_TASK_ID`) in the environment, as the runner does.

With BENCH_PROFILE=FILE in the environment, the parse runs under cProfile and its stats are
written to FILE.

    python parse_child.py MODE DAG_FILE BUNDLE_PATH RESULT_JSON LOG_FILE
"""

import json
import os
import resource
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()


def _peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def main() -> int:
    mode, dag_file, bundle_path, result_file, log_file = sys.argv[1:6]
    from airflow.sdk.execution_time.supervisor import _configure_logs_over_json_channel

    _configure_logs_over_json_channel(os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC))
    import structlog
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.dag_processing.processor import _pre_import_airflow_modules, _serialize_dags
    from airflow.utils.dag_version_inflation_checker import check_dag_file_stability

    log = structlog.get_logger(logger_name="task")
    _pre_import_airflow_modules(dag_file, log)
    ready = time.perf_counter()
    rss_before = _peak_rss_kib()
    profile_to = os.environ.get("BENCH_PROFILE")
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu_before = time.process_time()
    if mode == "processor":
        # processor._parse_file, step by step, so that importing the file and serializing
        # its DAGs are timed apart.
        stability = check_dag_file_stability(dag_file)
        bag = BundleDagBag(
            dag_folder=dag_file,
            bundle_path=Path(bundle_path),
            bundle_name="bench",
            load_op_links=False,
        )
        imported = time.perf_counter()
        serialized, serialization_errors = _serialize_dags(bag, log)
        stability.get_formatted_warnings(bag.dag_ids)
        dag_ids = sorted(d.dag_id for d in serialized)
        errors = {**bag.import_errors, **serialization_errors}
    elif mode == "task":
        bag = BundleDagBag(
            dag_folder=dag_file,
            safe_mode=False,
            load_op_links=False,
            bundle_path=Path(bundle_path),
            bundle_name="bench",
        )
        imported = time.perf_counter()
        dag_ids = sorted(bag.dags)
        errors = dict(bag.import_errors)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    done = time.perf_counter()
    if profile_to:
        profiler.disable()
        profiler.dump_stats(profile_to)
    report = {
        "parse_s": done - ready,
        "import_s": imported - ready,
        "serialize_s": done - imported,
        "parse_cpu_s": time.process_time() - cpu_before,
        "setup_s": ready - STARTED,
        "rss_before_kib": rss_before,
        "peak_rss_kib": _peak_rss_kib(),
        "dags": len(dag_ids),
        "first_dag_ids": dag_ids[:3],
        "errors": len(errors),
        "first_error": next(iter(errors.values()), "")[-2000:],
    }
    Path(result_file).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
