"""Time dagfactory's run-time steps with its own functions, in a fresh interpreter.

python overhead_child.py bootstrap PIPELINE_YML RESULT_JSON
    resolve_commit, checkout and virtualenv (what the bootstrap task does), called twice:
    the first call is cold when DAGFACTORY_HOME is empty, the second one is always warm.
python overhead_child.py cluster PIPELINE_YML RESULT_JSON WORKERS REPEATS
    local cluster up and down, REPEATS times.
python overhead_child.py first-line PIPELINE_YML RESULT_JSON REPEATS
    with a 2-worker cluster up: from calling run_entrypoint to the first line the entry
    point prints, and to its end.
"""

import json
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()


def _bootstrap(spec) -> dict:
    from dagfactory.run.workspace import checkout, code_dir_of, requirements_of, resolve_commit
    from dagfactory.run.workspace import virtualenv as make_virtualenv

    t0 = time.perf_counter()
    commit = resolve_commit(spec)
    t1 = time.perf_counter()
    root = checkout(spec, commit)
    code_dir = code_dir_of(spec, root)
    t2 = time.perf_counter()
    make_virtualenv(requirements_of(spec, root, code_dir), output=lambda line: None)
    t3 = time.perf_counter()
    return {"resolve_s": t1 - t0, "checkout_s": t2 - t1, "venv_s": t3 - t2, "total_s": t3 - t0}


def bootstrap(spec) -> dict:
    return {"first": _bootstrap(spec), "second": _bootstrap(spec)}


def cluster(spec, workers: int, repeats: int) -> dict:
    import dataclasses
    import os

    from dagfactory.backends import ClusterContext, ClusterHandle, get_backend
    from dagfactory.backends.local import processes_of
    from dagfactory.run.workspace import prepare, resolve_commit

    workspace = prepare(spec, resolve_commit(spec))
    backend = get_backend("local")
    cluster_spec = dataclasses.replace(spec.cluster, workers=workers)
    runs = []
    for i in range(repeats):
        key = f"bench-overhead-{os.getpid()}-{workers}-{i}"
        context = ClusterContext(key, str(workspace.python), str(workspace.code_dir))
        t0 = time.perf_counter()
        handle = backend.up(cluster_spec, context)
        t1 = time.perf_counter()
        procs = processes_of(key)
        scan = time.perf_counter() - t1
        watcher = _ExitWatcher(procs)
        t2 = time.perf_counter()
        watcher.start()
        backend.down(ClusterHandle.from_json(handle.to_json()))
        t3 = time.perf_counter()
        watcher.join()
        runs.append(
            {
                "up_s": t1 - t0,
                "down_s": t3 - t2,
                "exited_s": watcher.exited - t2,
                "scan_s": scan,
                "processes": len(procs),
                "left": len(processes_of(key)),
            }
        )
    return {"runs": runs}


class _ExitWatcher:
    """When every process of a cluster has exited (a zombie has exited: it only waits for its
    parent, or for init when orphaned, to collect its status)."""

    def __init__(self, procs) -> None:
        import threading

        self.procs = procs
        self.exited = float("nan")
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def join(self) -> None:
        self.thread.join(timeout=30)

    def _watch(self) -> None:
        import psutil

        pending = list(self.procs)
        deadline = time.perf_counter() + 30
        while pending and time.perf_counter() < deadline:
            still = []
            for proc in pending:
                try:
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        still.append(proc)
                except psutil.NoSuchProcess:
                    pass
            pending = still
            if pending:
                time.sleep(0.005)
        self.exited = time.perf_counter()


def first_line(spec, repeats: int) -> dict:
    import os

    from dagfactory.backends import ClusterContext, get_backend
    from dagfactory.run.runner import run_entrypoint
    from dagfactory.run.workspace import prepare, resolve_commit

    workspace = prepare(spec, resolve_commit(spec))
    backend = get_backend("local")
    key = f"bench-first-line-{os.getpid()}"
    handle = backend.up(
        spec.cluster, ClusterContext(key, str(workspace.python), str(workspace.code_dir))
    )
    runs = []
    try:
        for _ in range(repeats):
            seen: list[float] = []

            def output(line: str, seen=seen) -> None:
                if not seen:
                    seen.append(time.perf_counter())

            t0 = time.perf_counter()
            result = run_entrypoint(
                workspace, "fanjob.job:hello", {}, handle.scheduler_address, output
            )
            t1 = time.perf_counter()
            runs.append(
                {"first_line_s": seen[0] - t0, "total_s": t1 - t0, "workers": result["workers"]}
            )
    finally:
        backend.down(handle)
    return {"runs": runs}


def main() -> int:
    what, pipeline, result_file = sys.argv[1:4]
    t0 = time.perf_counter()
    from dagfactory.spec.load import load_file

    spec = load_file(pipeline)
    imports = time.perf_counter() - t0
    if what == "bootstrap":
        report = bootstrap(spec)
    elif what == "cluster":
        report = cluster(spec, int(sys.argv[4]), int(sys.argv[5]))
    elif what == "first-line":
        report = first_line(spec, int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown measurement {what!r}")
    report["import_and_load_s"] = imports
    Path(result_file).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
