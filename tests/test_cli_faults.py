"""`dagfactory run` stopped the ways a terminal stops a command: nothing left running.

The command runs as a real subprocess (`python -m dagfactory.cli run FILE`) on a real local
cluster; each test stops it while its entry point sleeps (a signal, a timeout) or takes its
output away (a closed stderr, a reader of stdout that goes away after one byte), then takes a
census: no process carrying the run's marker (Dask and the entry point) and no entry point
process left. The time from the fault to an empty census is printed (run with -s).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import cluster_processes, make_repo, write_pipeline

pytestmark = pytest.mark.e2e

JOBS = '''
import json
import os
import pathlib
import time


def _ready(signal_dir, name):
    path = pathlib.Path(signal_dir) / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid()}))
    tmp.rename(path)


def sleeps(client, signal_dir, name, seconds=300):
    client.submit(sum, [1, 2]).result()
    _ready(signal_dir, name)
    print("sleeping", flush=True)
    time.sleep(seconds)
    return "woke up"


# One name per test: the census finds each test's entry point by its command line.
sig_int = sig_term = sig_hup = times_out = sleeps


def chatty(client, signal_dir, name, n=300_000):
    """Much output on stderr, a result larger than a pipe's buffer on stdout."""
    for i in range(200):
        print(f"line {i} " + "x" * 200, flush=True)
    total = client.submit(sum, range(n)).result()
    _ready(signal_dir, name)
    return {"total": total, "numbers": list(range(n))}
'''

TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def jobs_repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("remotes") / "cli_jobs", {"cli_jobs.py": JOBS})


@pytest.fixture(scope="module", autouse=True)
def _print_timings():
    yield
    if TIMINGS:
        rows = "\n".join(f"  {name:<40} {secs:6.1f} s" for name, secs in TIMINGS.items())
        print(f"\ndagfactory run: fault -> zero processes:\n{rows}")


def _pipeline(folder: Path, dag_id: str, repo, entrypoint: str, extra: str = "", **params) -> Path:
    params = {"signal_dir": str(folder), "name": dag_id, **params}
    return write_pipeline(
        folder,
        dag_id,
        f"source:\n  git: {repo.path}\nentrypoint: cli_jobs:{entrypoint}\n"
        f"params: {json.dumps(params)}\ncluster: {{workers: 1}}\n{extra}\n",
    )


@contextlib.contextmanager
def _started(path: Path, **kwargs) -> Iterator[subprocess.Popen]:
    """`dagfactory run FILE` as a user starts it; killed on the way out if a test failed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagfactory.cli", "run", str(path)],
        stdin=subprocess.DEVNULL,
        **kwargs,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _entry_points(entrypoint: str) -> list[psutil.Process]:
    wanted = f"cli_jobs:{entrypoint}"
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and wanted in cmd and "--check" not in cmd:
            found.append(proc)
    return found


def census(dag_id: str, entrypoint: str) -> list[psutil.Process]:
    """Live processes of the pipeline's runs: marked ones (Dask, entry point), entry points."""
    found = {p.pid: p for p in cluster_processes(f"/{dag_id}__cli_")}
    found.update({p.pid: p for p in _entry_points(entrypoint)})
    return list(found.values())


def wait_zero(dag_id: str, entrypoint: str, since: float, bound: float, fault: str) -> float:
    while True:
        left = census(dag_id, entrypoint)
        elapsed = time.monotonic() - since
        if not left:
            TIMINGS[fault] = elapsed
            print(f"\n{fault}: zero processes {elapsed:.1f} s after the fault")
            return elapsed
        if elapsed > bound:
            shown = "\n".join(f"  {p.pid} {' '.join(p.cmdline())[:160]}" for p in left)
            for proc in left:
                proc.kill()
            pytest.fail(f"{fault}: still running {bound:.0f} s after the fault:\n{shown}")
        time.sleep(0.1)


def wait_ready(folder: Path, name: str, proc: subprocess.Popen, timeout: float = 300) -> dict:
    path = folder / f"{name}.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the job never got ready (exit {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.1)
    return json.loads(path.read_text())


@pytest.mark.parametrize(
    ("sig", "entrypoint"),
    [(signal.SIGINT, "sig_int"), (signal.SIGTERM, "sig_term"), (signal.SIGHUP, "sig_hup")],
    ids=["SIGINT", "SIGTERM", "SIGHUP"],
)
def test_a_stop_signal_tears_the_cluster_down_and_exits_non_zero(
    tmp_path, jobs_repo, sig, entrypoint
):
    dag_id = f"cli_{entrypoint}"
    path = _pipeline(tmp_path, dag_id, jobs_repo, entrypoint)
    with _started(path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        note = wait_ready(tmp_path, dag_id, proc)
        assert [p.pid for p in _entry_points(entrypoint)] == [note["pid"]]
        assert cluster_processes(f"/{dag_id}__cli_")  # a cluster to tear down
        proc.send_signal(sig)
        fault = time.monotonic()
        out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err
    assert "woke up" not in out
    wait_zero(dag_id, entrypoint, fault, 30, f"dagfactory run, {sig.name}")


def test_output_that_goes_away_never_skips_the_teardown(tmp_path, jobs_repo):
    """`dagfactory run FILE 2>&- | head -c 1`: stderr closed, stdout read once, then closed."""
    dag_id = "cli_chatty"
    path = _pipeline(tmp_path, dag_id, jobs_repo, "chatty")
    with _started(path, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        proc.stderr.close()  # every write to stderr now fails with EPIPE
        first = proc.stdout.read(1)  # stdout gets the result only: after the teardown
        at_first_byte = census(dag_id, "chatty")
        proc.stdout.close()
        fault = time.monotonic()
        proc.wait(timeout=60)
    assert first == b"{"
    assert (tmp_path / f"{dag_id}.json").exists()  # the job ran to its end, output or not
    assert at_first_byte == [], "the result was printed before the cluster was torn down"
    wait_zero(dag_id, "chatty", fault, 30, "dagfactory run, output closed")


def test_timeout_stops_the_run_and_exits_non_zero(tmp_path, jobs_repo):
    dag_id = "cli_times_out"
    path = _pipeline(tmp_path, dag_id, jobs_repo, "times_out", "timeout: 5s", seconds=60)
    with _started(path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        wait_ready(tmp_path, dag_id, proc)
        ready = time.monotonic()
        # the 60 s job must not be waited for: the bound is well under it
        out, err = proc.communicate(timeout=40)
    assert proc.returncode != 0, err
    assert "woke up" not in out
    assert "timeout" in err.lower() or "timed out" in err.lower(), err
    wait_zero(dag_id, "times_out", ready, 45, "dagfactory run, timeout: 5s (from job start)")
