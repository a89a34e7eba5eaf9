"""Pruning the cache: real checkouts, mirrors and virtualenvs, aged by their stamps only."""

import os
import subprocess
import sys
import time

import pytest

from dagfactory.cli import main
from dagfactory.run.prune import cache_entries, disk_usage, prune
from dagfactory.run.reports import report_path
from dagfactory.run.workspace import checkout, dagfactory_home, prepare, virtualenv
from dagfactory.spec.load import load_file
from tests.conftest import write_pipeline

DAY = 86400
JOB = {"job.py": "def main(client):\n    return 1\n"}


def _spec(folder, repo):
    return load_file(
        write_pipeline(folder, "job", f"source: {{git: {repo.path}}}\nentrypoint: job:main\n")
    )


def _age(path, days: float) -> None:
    when = time.time() - days * DAY
    os.utime(path, (when, when))


@pytest.fixture
def cache(tmp_path, monkeypatch, repo_factory):
    """A dagfactory home of this test alone with a real checkout, mirror and (tiny) virtualenv."""
    monkeypatch.setenv("DAGFACTORY_HOME", str(tmp_path / "home"))
    repo = repo_factory("job", JOB)
    root = checkout(_spec(tmp_path / "pipelines", repo), repo.head())
    venv = virtualenv([])
    [mirror] = [p for p in (dagfactory_home() / "repos").iterdir() if p.is_dir()]
    return {"checkout": root, "venv": venv, "mirror": mirror, "spec_dir": tmp_path / "pipelines"}


def test_old_entries_go_recent_ones_stay_and_the_space_freed_is_reported(cache, capsys):
    _age(cache["checkout"], 40)
    _age(cache["mirror"], 31)
    _age(cache["venv"] / ".dagfactory-complete", 5)
    sizes = {kind: disk_usage(cache[kind]) for kind in ("checkout", "mirror")}
    assert all(sizes.values())

    assert main(["prune", "--days", "30", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove checkouts/{cache['checkout'].name} (unused 40 days" in out
    assert f"would remove repos/{cache['mirror'].name} (unused 31 days" in out
    assert "0 in use, 1 used within 30 days kept" in out
    assert cache["checkout"].is_dir() and cache["mirror"].is_dir()  # a dry run removes nothing

    report = prune(days=30)
    assert {e.path for e, _ in report.removed} == {cache["checkout"], cache["mirror"]}
    assert report.freed == sum(sizes.values())
    assert [e.path for e in report.recent] == [cache["venv"]]
    assert not cache["checkout"].exists() and not cache["mirror"].exists()
    assert cache["venv"].is_dir()
    assert [e.path for e in cache_entries()] == [cache["venv"]]  # no trash left behind

    _age(cache["venv"] / ".dagfactory-complete", 60)
    assert main(["prune"]) == 0  # default: 30 days
    assert "freed " in capsys.readouterr().out
    assert cache_entries() == []
    assert not (dagfactory_home() / "venvs" / f"{cache['venv'].name}.requirements.txt").exists()


def test_a_virtualenv_whose_lock_another_process_holds_is_kept(cache):
    _age(cache["venv"] / ".dagfactory-complete", 90)
    holder = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time; from filelock import FileLock\n"
            "with FileLock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)",
            f"{cache['venv']}.lock",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        report = prune(days=30)
        assert [(e.path, why) for e, why in report.in_use] == [
            (cache["venv"], "its lock is held (being built or fetched)")
        ]
        assert cache["venv"].is_dir()
    finally:
        holder.kill()
        holder.wait()
    assert cache["venv"] in {e.path for e, _ in prune(days=30).removed}


def test_a_checkout_a_live_process_runs_in_is_kept(cache, capsys):
    _age(cache["checkout"], 90)
    user = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], cwd=cache["checkout"]
    )
    try:
        assert main(["prune"]) == 0
        out = capsys.readouterr().out
        assert f"kept checkouts/{cache['checkout'].name}: a live process uses" in out
        assert cache["checkout"].is_dir()
    finally:
        user.kill()
        user.wait()
    assert cache["checkout"] in {e.path for e, _ in prune().removed}


def test_files_hard_linked_from_elsewhere_free_nothing(tmp_path):
    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "own").write_bytes(b"x" * 100_000)
    (tmp_path / "shared").write_bytes(b"y" * 100_000)
    os.link(tmp_path / "shared", entry / "linked")
    with_link = disk_usage(entry)
    (entry / "linked").unlink()
    assert with_link == disk_usage(entry)
    assert disk_usage(entry) >= 100_000


@pytest.mark.e2e
def test_a_run_stamps_what_it_uses_so_prune_keeps_it(tmp_path, repo_factory):
    """The stamps come from `prepare`, not from install times: a virtualenv built long ago and
    used by today's run stays. (The session's cache: its virtualenv is shared with other tests.)"""
    repo = repo_factory("job", JOB)
    spec = _spec(tmp_path / "pipelines", repo)
    before = {e.path for e in cache_entries()}
    workspace = prepare(spec, repo.head())
    mirrors = [e.path for e in cache_entries() if e.kind == "mirror" and e.path not in before]
    assert mirrors  # a new remote: fetched into a new mirror
    for path in [workspace.code_dir, workspace.venv_dir / ".dagfactory-complete", *mirrors]:
        _age(path, 100)
    assert prune(days=30, dry_run=True).removed  # as aged, they would go

    prepare(spec, repo.head())  # the next run: everything cached, nothing rebuilt

    used = {e.path: e for e in cache_entries()}
    now = time.time()
    for path in [workspace.code_dir, workspace.venv_dir, *mirrors]:
        assert used[path].idle_days(now) < 1, path
    assert not {e.path for e, _ in prune(days=30, dry_run=True).removed} & set(used).intersection(
        [workspace.code_dir, workspace.venv_dir, *mirrors]
    )


def _report(dag: str, run: str, task: str, try_number: int, days: float):
    """A performance report written `days` ago (its folders too, as when it was written)."""
    path = report_path(dag, run, task, try_number)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("<html><title>Dask Performance Report</title></html>\n" * 200)
    for item in (path, path.parent, path.parent.parent):
        if item.stat().st_mtime > time.time() - days * DAY:
            _age(item, days)
    return path


def test_reports_go_a_run_at_a_time_when_the_newest_is_older_than_the_limit(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("DAGFACTORY_HOME", str(tmp_path / "home"))
    old = _report("wc", "manual__2026-01-01", "pipeline.run", 1, days=40)
    # What a shim killed while writing leaves: it goes with its run.
    leftover = old.with_name(f".{old.name}.4242.tmp")
    leftover.write_text("half a report")
    _age(leftover, 40)
    _age(old.parent, 40)
    new = _report("wc", "scheduled__2026-02-05", "pipeline.run", 1, days=2)
    # A run whose first try is old but whose retry is recent stays whole.
    first = _report("sales", "manual__retried", "load.rollup", 1, days=45)
    retry = _report("sales", "manual__retried", "load.rollup", 2, days=1)

    assert main(["prune", "--days", "30", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove reports/wc/manual__2026-01-01 (written 40 days ago, " in out
    assert "1 to remove, 0 in use, 2 used within 30 days kept" in out
    assert old.exists()

    size = disk_usage(old.parent.parent)
    report = prune(days=30)
    assert [(e.path, freed) for e, freed in report.removed] == [(old.parent.parent, size)]
    assert not old.parent.parent.exists()
    assert new.exists() and first.exists() and retry.exists()
    assert sorted(e.path for e in cache_entries()) == sorted(
        [new.parent.parent, first.parent.parent]
    )  # no trash left behind

    assert [e.path for e, _ in prune(days=1.5).removed] == [new.parent.parent]
    assert first.exists() and retry.exists()  # its retry, a day old, keeps the run
