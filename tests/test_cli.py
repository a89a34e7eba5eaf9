"""The dagfactory command, run as a user runs it: a subprocess."""

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from dagfactory.run.reports import report_path
from tests.conftest import (
    FAILING_JOB,
    ROOT,
    cluster_processes,
    write_pipeline,
    write_wordcount_pipeline,
)

DAGFACTORY = [sys.executable, "-m", "dagfactory.cli"]


def dagfactory(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DAGFACTORY, *args], cwd=cwd, capture_output=True, text=True, env=os.environ.copy()
    )


def test_schema_prints_the_checked_in_schema():
    out = dagfactory("schema")
    assert out.returncode == 0
    assert out.stdout == (ROOT / "schemas" / "pipeline.schema.json").read_text()


def test_validate_the_repo_pipelines():
    out = dagfactory("validate")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 pipeline file(s) valid" in out.stderr


def test_validate_reports_file_line_col_and_exits_1(tmp_path):
    write_pipeline(tmp_path, "bad", "source: {git: x}\nentrypoint: a.b:c\ncluster: {workers: 0}\n")
    out = dagfactory("validate", str(tmp_path))
    assert out.returncode == 1
    assert f"{tmp_path}/bad.yml:3:20: error: cluster.workers: must be at least 1" in out.stdout


def test_render_fills_in_defaults():
    out = dagfactory("render", "pipelines/wordcount.yml")
    assert out.returncode == 0
    spec = json.loads(out.stdout)
    assert spec["dag_id"] == "wordcount" and spec["cluster"]["idle_timeout"] == "5m"


@pytest.mark.e2e
def test_run_prints_the_result_as_the_last_line(tmp_path, wordcount_repo):
    path = write_wordcount_pipeline(
        tmp_path, wordcount_repo, chunks=4, top=2, label="{{ ds }}", name="wc"
    )
    out = dagfactory("run", str(path), "-p", "chunks=6")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["chunks"] == 6 and result["top"][0] == ["the", 3368]
    assert len(result["label"]) == 10  # {{ ds }} rendered
    assert "counting 4000 lines in 6 chunks on 2 workers" in out.stderr
    assert cluster_processes("wc__cli_") == []
    lines = out.stderr.splitlines()
    # Not a terminal: the plain progress lines a task log gets; the last one is the total.
    progress = [line for line in lines if line.startswith("dask progress: ")]
    assert progress[-1] == "dask progress: 7/7 tasks done (count_words 6/6, merge 1/1)"
    assert "\r" not in out.stderr
    [report] = _reports(out.stderr)
    assert lines.index(f"Dask performance report: {report}") > lines.index(
        next(line for line in lines if line.startswith("[dagfactory] done"))
    )
    run_id = report.parts[-3]
    assert report == report_path("wc", run_id, "run", 1) and run_id.startswith("cli_")
    page = report.read_text()
    assert "<title>Dask Performance Report</title>" in page and "number of tasks: 7" in page


def _reports(stderr: str) -> list[Path]:
    prefix = "Dask performance report: "
    return [Path(line[len(prefix) :]) for line in stderr.splitlines() if line.startswith(prefix)]


def _run_on_a_terminal(*args: str, columns: int = 200) -> tuple[subprocess.CompletedProcess, str]:
    """`dagfactory run` with stderr on a pseudo-terminal (stdout a pipe, as in `| jq`);
    returns the process and what the terminal received."""
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    received: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: every holder of the terminal side closed it
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    try:
        proc = subprocess.Popen(
            [*DAGFACTORY, "run", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=terminal, env=os.environ.copy(),
        )  # fmt: skip
        os.close(terminal)
        terminal = -1
        reader.start()
        stdout, _ = proc.communicate(timeout=600)
        reader.join(timeout=60)
    finally:
        if terminal >= 0:
            os.close(terminal)
        os.close(main)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout.decode(), "")
    return done, b"".join(received).decode(errors="replace")


@pytest.mark.e2e
def test_run_on_a_terminal_draws_one_progress_bar_per_step_and_reports_each(
    tmp_path, wordcount_repo
):
    path = write_pipeline(
        tmp_path,
        "tty",
        f"""
        source: {{git: {wordcount_repo.path}, requirements: requirements.txt}}
        cluster: {{workers: 1, memory: 1GiB}}
        stages:
          count:
            steps:
              - first: {{entrypoint: wordcount.job:main, params: {{chunks: 3, top: 1}}}}
              - second: {{entrypoint: wordcount.job:main, params: {{chunks: 5, top: 1}}}}
        """,
    )
    out, screen = _run_on_a_terminal(str(path))
    assert out.returncode == 0, screen
    assert json.loads(out.stdout.strip().splitlines()[-1])["second"]["chunks"] == 5
    assert "dask progress:" not in screen  # the lines became the bar
    # Each step's bar ends at its total, left on its own line for the steps after it.
    bar = "\rdask [########################] {} tasks ({})\x1b[K\r\n"
    assert bar.format("4/4", "count_words 3/3, merge 1/1") in screen
    assert bar.format("6/6", "count_words 5/5, merge 1/1") in screen
    assert screen.index("4/4 tasks") < screen.index("[dagfactory] count.second")
    first, second = _reports(screen.replace("\r\n", "\n"))
    run_id = first.parts[-3]
    assert first == report_path("tty", run_id, "count.first", 1)
    assert second == report_path("tty", run_id, "count.second", 1)
    assert all("Dask Performance Report" in p.read_text() for p in (first, second))
    assert cluster_processes("tty__cli_") == []


@pytest.mark.e2e
def test_run_of_a_failing_entry_point_exits_non_zero_after_teardown(tmp_path, repo_factory):
    repo = repo_factory("failing", {"failing_job.py": FAILING_JOB})
    path = write_pipeline(
        tmp_path,
        "fails",
        f"source: {{git: {repo.path}}}\nentrypoint: failing_job:main\nparams: {{message: x}}\n",
    )
    out = dagfactory("run", str(path), "-p", "message=no good")
    assert out.returncode == 1
    assert out.stdout == ""
    assert "failing_job:main raised ValueError: no good" in out.stderr
    assert "partial result 6" in out.stderr
    assert out.stderr.index("[dagfactory] teardown") > out.stderr.index("partial result 6")
    assert cluster_processes("fails__cli_") == []


def test_run_refuses_an_undeclared_param(tmp_path):
    path = write_pipeline(tmp_path, "p", "source: {git: x}\nentrypoint: a.b:c\nparams: {n: 1}\n")
    out = dagfactory("run", str(path), "-p", "m=2")
    assert out.returncode == 1
    assert f"'m': not a param of {path}; declared params: n" in out.stderr
    assert "[dagfactory] bootstrap" not in out.stderr  # refused before anything started


@pytest.mark.parametrize(
    "pair, message",
    [
        ("n=abc", "param 'n': 'abc' is not an integer"),
        ("n=0", "param 'n': must be at least 1, not 0"),
        ("mode=slow", 'param \'mode\': must be one of "fast", "exact", not "slow"'),
        ("label={{ nope }}", "param 'label': cannot render '{{ nope }}'"),
        ("broken", "-p 'broken': write -p name=value"),
    ],
)
def test_run_refuses_a_bad_value_before_anything_starts(tmp_path, pair, message):
    path = write_pipeline(
        tmp_path,
        "p",
        """
        source: {git: x}
        entrypoint: a.b:c
        params:
          n: {default: 2, type: integer, minimum: 1}
          mode: {default: fast, enum: [fast, exact]}
          label: "{{ ds }}"
        """,
    )
    out = dagfactory("run", str(path), "-p", pair)
    assert out.returncode == 1, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr and "[dagfactory] bootstrap" not in out.stderr


RETRY_JOB = """
import os
import pathlib


def main(client, marker=""):
    first = not pathlib.Path(marker).exists()
    pathlib.Path(marker).touch()
    address = client.scheduler.address
    if first:  # lose the cluster the way a reclaimed spot host loses it
        client.run_on_scheduler(os._exit, 1)
    return {"scheduler": address, "answer": client.submit(sum, [1, 2, 3]).result()}
"""


@pytest.mark.e2e
def test_run_retry_replaces_a_lost_cluster_and_tears_down_both(tmp_path, repo_factory):
    repo = repo_factory("retry", {"retry_job.py": RETRY_JOB})
    marker = tmp_path / "first-try-done"
    path = write_pipeline(
        tmp_path,
        "retry",
        f"""
        retries: 1
        retry_delay: 1s
        source: {{git: {repo.path}}}
        entrypoint: retry_job:main
        params: {{marker: "{marker}"}}
        cluster: {{workers: 1}}
        """,
    )
    out = dagfactory("run", str(path))
    assert out.returncode == 0, out.stderr
    assert "retrying in 1s" in out.stderr
    assert "does not answer; starting a new one under retry__cli_" in out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["answer"] == 6
    first_address = out.stderr.split("Dask scheduler at ", 1)[1].split()[0]
    assert result["scheduler"] != first_address  # the retry ran on the replacement
    assert cluster_processes("retry__cli_") == []


def test_new_writes_a_pipeline_that_validates(tmp_path):
    out = dagfactory(
        "new", "daily_sales", "--git", "https://example.com/acme/sales.git",
        "--entrypoint", "sales.jobs:rollup", "--dir", str(tmp_path / "pipelines"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    path = tmp_path / "pipelines" / "daily_sales.yml"
    assert out.stdout.strip() == str(path)
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=")
    schema_ref = text.splitlines()[0].split("=", 1)[1]
    assert (path.parent / schema_ref).resolve() == tmp_path / "schemas" / "pipeline.schema.json"
    assert not schema_ref.startswith("/")
    assert dagfactory("validate", str(path)).returncode == 0
    again = dagfactory(
        "new", "daily_sales", "--git", "x", "--entrypoint", "a:b", "--dir", str(path.parent)
    )
    assert again.returncode == 2 and "exists already" in again.stderr


def test_new_refuses_what_would_not_validate(tmp_path):
    out = dagfactory(
        "new", "bad", "--git", "ext::sh -c id", "--entrypoint", "a:b", "--dir", str(tmp_path)
    )
    assert out.returncode == 1
    assert "remote helper" in out.stderr
    assert not (tmp_path / "bad.yml").exists()


IDLE_JOB = """
import time


def main(client, pause=0):
    time.sleep(pause)  # work without Dask, longer than the cluster's idle timeout
    return client.submit(sum, [1, 2, 3]).result()
"""


@pytest.mark.e2e
def test_a_running_entry_point_keeps_a_short_idle_timeout_from_stopping_its_cluster(
    tmp_path, repo_factory
):
    repo = repo_factory("idle", {"idle_job.py": IDLE_JOB})
    path = write_pipeline(
        tmp_path,
        "idle",
        f"""
        source: {{git: {repo.path}}}
        entrypoint: idle_job:main
        params: {{pause: 20}}
        cluster: {{workers: 1, idle_timeout: 6s}}
        """,
    )
    out = dagfactory("run", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "6"
    assert "does not answer" not in out.stderr
    assert cluster_processes("idle__cli_") == []


@pytest.mark.e2e
def test_run_warns_of_uncommitted_changes_and_worktree_runs_them(tmp_path, repo_factory):
    repo = repo_factory("edit", {"edit_job.py": "def main(client):\n    return 'committed'\n"})
    repo.write("edit_job.py", "def main(client):\n    return 'edited'\n")
    path = write_pipeline(
        tmp_path, "edit", f"source: {{git: {repo.path}}}\nentrypoint: edit_job:main\n"
    )
    out = dagfactory("run", str(path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == '"committed"'
    assert "warning: 1 uncommitted change(s)" in out.stderr and "edit_job.py" in out.stderr
    assert "--worktree" in out.stderr
    out = dagfactory("run", str(path), "--worktree")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == '"edited"'
    assert "warning" not in out.stderr
    assert cluster_processes("edit__cli_") == []
