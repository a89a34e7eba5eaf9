"""The entry point runs in the pipeline's virtualenv, against a real local cluster."""

import os
import re
import subprocess
import sys
import threading
import time

import psutil
import pytest

from dagfactory.backends import ClusterContext, get_backend
from dagfactory.backends.local import processes_of
from dagfactory.errors import EntrypointError
from dagfactory.run.runner import check_entrypoint, run_entrypoint
from dagfactory.run.workspace import prepare, resolve_commit
from dagfactory.spec.load import load_file
from dagfactory.spec.pipeline import ClusterSpec
from tests.conftest import ROOT, write_pipeline

pytestmark = pytest.mark.e2e

JOBS = {
    "pkg/__init__.py": "",
    "pkg/helpers.py": """\
import os
import time


def square(x):
    return x * x


def wait_for(path, i):
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never came")
        time.sleep(0.02)
    time.sleep(0.02)
    return i
""",
    "pkg/broken.py": "import os\n\nraise ValueError('no config at import')\n",
    "pkg/needs_pandas.py": "import pandas_not_installed_here  # noqa\n",
    "pkg/jobs.py": """\
import math
import os
import sys
import time

from pkg.helpers import square, wait_for


def squares(client, n=3, label=""):
    print("starting", label)
    print("to stderr", file=sys.stderr)
    futures = client.map(square, range(n))
    return {"label": label, "squares": client.gather(futures)}


def not_json(client):
    return {1, 2}


def with_nan(client):
    return {"mean": math.nan, "xs": [1.5, math.inf, -math.inf], "ok": 2}


def fails(client):
    return _helper()


def _helper():
    raise RuntimeError("the data is bad")


def imports_airflow(client):
    import airflow  # noqa: F401


def chatty(client, n=20000):
    for i in range(n):
        print(f"line {i}")
    sys.stdout.write("\\r\\nno newline at the end")


def trickle(client, folder, n=3):
    # Prints line i only once the runner has handed line i-1 on: a runner that held lines
    # back (until the end, or until a buffer filled) would make this wait forever.
    for i in range(n):
        print(f"tick {i}", flush=True)
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(folder, f"seen-{i}")):
            if time.monotonic() > deadline:
                raise TimeoutError(f"tick {i} never reached the log")
            time.sleep(0.01)
    return n


def sleeps(client):
    print("sleeping", flush=True)
    time.sleep(300)


def gated(client, gate, n=40):
    # No task can finish before the test opens the gate: what progress shows until then is
    # fixed, whatever the machine's speed.
    parts = client.map(wait_for, [gate] * n, range(n), pure=False)
    return client.submit(sum, parts).result()


def no_dask_work(client, seconds=1.5):
    time.sleep(seconds)
    return "rested"
""",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.conftest import make_repo

    base = tmp_path_factory.mktemp("runner")
    repo = make_repo(base / "jobs", JOBS)
    spec = load_file(
        write_pipeline(base, "p", f"source:\n  git: {repo.path}\nentrypoint: pkg.jobs:squares\n")
    )
    workspace = prepare(spec, resolve_commit(spec))
    backend = get_backend("local")
    # Workers get no PYTHONPATH: the code must reach them by value, as on a remote cluster.
    handle = backend.up(ClusterSpec(workers=2), ClusterContext("t_runner", str(workspace.python)))
    yield workspace, handle.scheduler_address
    backend.down(handle)


def _lines(chunks: list[str]) -> list[str]:
    return "\n".join(chunks).split("\n")


def test_result_comes_back_and_output_is_streamed(cluster):
    workspace, address = cluster
    chunks = []
    result = run_entrypoint(
        workspace, "pkg.jobs:squares", {"n": 4, "label": "x"}, address, chunks.append
    )
    assert result == {"label": "x", "squares": [0, 1, 4, 9]}
    assert "starting x" in _lines(chunks) and "to stderr" in _lines(chunks)


def test_an_exception_prints_one_traceback_of_the_users_frames(cluster):
    workspace, address = cluster
    chunks = []
    with pytest.raises(EntrypointError) as err:
        run_entrypoint(workspace, "pkg.jobs:fails", {}, address, chunks.append)
    assert str(err.value) == "pkg.jobs:fails raised RuntimeError: the data is bad; traceback above"
    log = "\n".join(chunks)
    assert log.count("Traceback (most recent call last)") == 1
    assert "entry_shim.py" not in log
    frames = [line.strip() for line in log.splitlines() if line.strip().startswith("File ")]
    assert [f.split(", in ")[-1] for f in frames] == ["fails", "_helper"]
    assert log.rstrip().endswith("RuntimeError: the data is bad")


def test_a_result_that_is_not_json_is_refused(cluster):
    workspace, address = cluster
    with pytest.raises(EntrypointError, match="returned a set, which is not JSON"):
        run_entrypoint(workspace, "pkg.jobs:not_json", {}, address, lambda _: None)


def test_nan_and_infinity_become_null_with_a_warning_naming_them(cluster):
    workspace, address = cluster
    chunks = []
    result = run_entrypoint(workspace, "pkg.jobs:with_nan", {}, address, chunks.append)
    assert result == {"mean": None, "xs": [1.5, None, None], "ok": 2}
    warnings = [line for line in _lines(chunks) if "NaN or Infinity" in line]
    assert len(warnings) == 1
    assert 'result["mean"], result["xs"][1], result["xs"][2]' in warnings[0]


def test_missing_function_and_bad_params_are_reported(cluster):
    workspace, address = cluster
    with pytest.raises(EntrypointError, match="has no function 'nope'"):
        run_entrypoint(workspace, "pkg.jobs:nope", {}, address, lambda _: None)
    with pytest.raises(EntrypointError, match="unexpected keyword argument 'bogus'"):
        run_entrypoint(workspace, "pkg.jobs:squares", {"bogus": 1}, address, lambda _: None)


def test_the_virtualenv_has_no_airflow(cluster):
    workspace, address = cluster
    with pytest.raises(EntrypointError, match="No module named 'airflow'"):
        run_entrypoint(workspace, "pkg.jobs:imports_airflow", {}, address, lambda _: None)


@pytest.mark.parametrize(
    ("entrypoint", "expected"),
    [
        (
            "pkg.jobz:squares",
            r"entrypoint pkg.jobz:squares: no module 'pkg.jobz' in the code folder .+ "
            r"\(source.subdir\); did you mean 'pkg.jobs'\?$",
        ),
        ("pkgg.jobs:squares", r"no module 'pkgg' in the code folder .+; did you mean 'pkg'\?$"),
        (
            "pkg.jobs:sqares",
            r"^entrypoint pkg.jobs:sqares: module 'pkg.jobs' has no function 'sqares'; "
            r"did you mean 'squares'\?$",
        ),
        (
            "pkg.jobs:zzz",
            r"has no function 'zzz'; its functions: chatty, fails, gated, imports_airflow, "
            r"no_dask_work, not_json, sleeps, squares, trickle, with_nan$",
        ),
        (
            "pkg.broken:main",
            r"^entrypoint pkg.broken:main: importing pkg.broken raised ValueError: "
            r"no config at import \(at pkg/broken.py:3\)$",
        ),
        (
            "pkg.needs_pandas:main",
            r"No module named 'pandas_not_installed_here' \(at pkg/needs_pandas.py:1\); add the "
            r"package that provides it to source.requirements$",
        ),
    ],
)
def test_check_entrypoint_says_what_to_fix_in_one_line(cluster, entrypoint, expected):
    workspace, _ = cluster
    with pytest.raises(EntrypointError, match=expected) as err:
        check_entrypoint(workspace, entrypoint)
    assert "\n" not in str(err.value)


def test_check_entrypoint_accepts_a_good_one_without_a_cluster(cluster):
    workspace, _ = cluster
    assert check_entrypoint(workspace, "pkg.jobs:squares") is None


def test_a_burst_of_lines_arrives_complete_in_order_and_in_few_records(cluster):
    workspace, address = cluster
    chunks = []
    run_entrypoint(workspace, "pkg.jobs:chatty", {"n": 20000}, address, chunks.append)
    lines = _lines(chunks)
    assert [line for line in lines if line.startswith("line ")] == [
        f"line {i}" for i in range(20000)
    ]
    assert lines[-2:] == ["", "no newline at the end"]
    assert len(chunks) < 200  # one record per line before


def test_a_trickle_of_lines_is_handed_on_line_by_line(cluster, tmp_path):
    workspace, address = cluster

    def output(text: str) -> None:
        for line in text.split("\n"):
            if line.startswith("tick "):
                (tmp_path / f"seen-{line.split()[1]}").touch()

    folder = str(tmp_path)
    assert run_entrypoint(workspace, "pkg.jobs:trickle", {"folder": folder}, address, output) == 3


def test_a_run_writes_its_performance_report_atomically_where_asked(cluster, tmp_path):
    workspace, address = cluster
    report = tmp_path / "reports" / "dag" / "run" / "try-1.html"  # its folders made too
    result = run_entrypoint(
        workspace, "pkg.jobs:squares", {"n": 5}, address, lambda _: None, report=report
    )
    assert result["squares"] == [0, 1, 4, 9, 16]
    page = report.read_text()
    assert "<title>Dask Performance Report</title>" in page
    assert "Task Stream" in page and "number of tasks: 5" in page
    assert "def squares(client, n=3, label=" in page  # the entry point's code, not the shim's
    assert "cdn.bokeh.org" not in page  # readable with no network: Bokeh is inline
    assert os.listdir(report.parent) == ["try-1.html"]  # no temporary file left
    # No path, no report (Dask's default name would land in the code folder).
    run_entrypoint(workspace, "pkg.jobs:squares", {}, address, lambda _: None)
    assert not list(workspace.code_dir.rglob("*.html"))


def test_a_failing_entry_point_still_writes_its_report(cluster, tmp_path):
    workspace, address = cluster
    report = tmp_path / "try-2.html"
    chunks = []
    with pytest.raises(EntrypointError, match="raised RuntimeError: the data is bad"):
        run_entrypoint(workspace, "pkg.jobs:fails", {}, address, chunks.append, report=report)
    assert "Dask Performance Report" in report.read_text()
    assert "Traceback" in "\n".join(chunks)  # the error surfaces as without a report


def test_a_stopped_entry_point_writes_its_report_before_it_goes(cluster, tmp_path):
    """A task timeout stops the entry point: the report of the slow run is the one to read."""
    workspace, address = cluster
    report = tmp_path / "try-1.html"

    def output(text: str) -> None:
        if "sleeping" in text:
            raise TimeoutError("the task's timeout")  # as Airflow's execution_timeout does

    with pytest.raises(TimeoutError):
        run_entrypoint(workspace, "pkg.jobs:sleeps", {}, address, output, report=report)
    assert "Dask Performance Report" in report.read_text()


PROGRESS = re.compile(r"dask progress: (\d+)/(\d+) tasks done \((.*)\)")


def test_progress_lines_follow_the_work_and_do_not_repeat_themselves(cluster, tmp_path):
    workspace, address = cluster
    gate = tmp_path / "gate"
    every = 0.2
    seen: list[tuple[float, str]] = []
    opener: list[threading.Timer] = []
    opened: list[float] = []

    def open_gate() -> None:
        opened.append(time.monotonic())
        gate.touch()

    def output(text: str) -> None:
        for line in text.split("\n"):
            if PROGRESS.fullmatch(line):
                seen.append((time.monotonic(), line))
                if not opener:  # hold the gate for many intervals, then open it
                    opener.append(threading.Timer(10 * every, open_gate))
                    opener[0].start()

    started = time.monotonic()
    result = run_entrypoint(
        workspace, "pkg.jobs:gated", {"gate": str(gate), "n": 40}, address, output,
        progress_every=every,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result == sum(range(40))
    lines = [line for _, line in seen]
    assert lines[-1] == "dask progress: 41/41 tasks done (wait_for 40/40, sum 1/1)"
    counts = [tuple(map(int, PROGRESS.fullmatch(line).groups()[:2])) for line in lines]
    assert all(done <= total for done, total in counts)
    assert [done for done, _ in counts] == sorted(done for done, _ in counts)
    assert len(set(lines)) == len(lines)  # only when it changed
    # While the gate was shut nothing could change: at most the graph's arrival (the map,
    # then the sum) was told, however many intervals passed.
    shut = [line for when, line in seen if when < opened[0]]
    assert 1 <= len(shut) <= 2 and all(line.startswith("dask progress: 0/") for line in shut)
    assert len(lines) <= elapsed / every + 2  # never more than one a period


def test_no_progress_when_no_dask_work_runs(cluster):
    workspace, address = cluster
    chunks = []
    result = run_entrypoint(
        workspace, "pkg.jobs:no_dask_work", {"seconds": 1.5}, address, chunks.append,
        keepalive=0.2, progress_every=0.2,
    )  # fmt: skip
    assert result == "rested"
    assert not [line for line in _lines(chunks) if "dask progress" in line]  # keepalives too


ORPHAN_CHILD = """
import sys
from pathlib import Path

from dagfactory.run.runner import run_entrypoint
from dagfactory.run.workspace import Workspace

commit, code_dir, venv_dir, address, key = sys.argv[1:]
workspace = Workspace(commit, Path(code_dir), Path(venv_dir))
run_entrypoint(workspace, "pkg.jobs:sleeps", {}, address, lambda t: print(t, flush=True), key=key)
"""


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_the_entry_point_carries_the_marker_and_dies_with_its_task(cluster):
    workspace, address = cluster
    key = "t_runner_orphan"
    task = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_CHILD, workspace.commit, str(workspace.code_dir),
         str(workspace.venv_dir), address, key],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert task.stdout is not None
        for line in task.stdout:
            if line.strip() == "sleeping":
                break
        marked = _alive(processes_of(key))
        assert any("entry_shim.py" in " ".join(p.cmdline()) for p in marked)
        task.kill()  # as the OOM killer or a lost Airflow worker would
        task.wait()
        deadline = time.monotonic() + 30
        while _alive(processes_of(key)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _alive(processes_of(key)) == []
    finally:
        task.kill()
        for proc in processes_of(key):
            proc.kill()
