"""The census of clusters on this host: real Dask clusters and real marked processes."""

import json
import os
import subprocess
import sys

import psutil
import pytest

from dagfactory.backends import ClusterContext, ClusterHandle, census
from dagfactory.backends.local import KEY_VARIABLE, LocalBackend, cluster_dir
from dagfactory.cli import main
from dagfactory.run.workspace import virtualenv
from dagfactory.spec.pipeline import ClusterSpec


@pytest.fixture(scope="module")
def python():
    return str(virtualenv(["distributed", "bokeh>=3.1"]) / "bin" / "python")


@pytest.fixture
def spawned(tmp_path, monkeypatch):
    """A dagfactory home of this test alone, so that its census sees only this test's clusters;
    the list collects the processes the test starts, all stopped at its end."""
    home = tmp_path / "home"
    monkeypatch.setenv("DAGFACTORY_HOME", str(home))
    started: list[subprocess.Popen] = []
    yield started
    census.stop_all()
    for proc in started:
        proc.kill()
        proc.wait()
    assert _marked(str(home)) == []


def _marked(prefix: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            marked = proc.environ().get(KEY_VARIABLE, "").startswith(prefix)
            if marked and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _marked_sleeper(started: list, marker: str) -> subprocess.Popen:
    """A real process carrying a cluster marker, as a lost Dask worker would."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env={**os.environ, KEY_VARIABLE: marker},
    )
    started.append(proc)
    return proc


@pytest.mark.e2e
def test_a_running_cluster_is_listed_and_stopped_by_its_key(python, spawned, tmp_path, capsys):
    handle = LocalBackend().up(
        ClusterSpec(workers=1, memory="512MiB"), ClusterContext("dag__run:1", python, str(tmp_path))
    )
    try:
        [info] = census.census()
        assert info.key == "dag__run:1"
        assert info.state == census.RUNNING
        assert info.backend == "local"
        assert info.scheduler_address == handle.scheduler_address
        assert info.dashboard_link == handle.dashboard_link
        assert set(handle.details["pids"]) <= set(info.pids)
        assert info.processes >= 3  # scheduler, `dask worker`, its worker process
        assert 0 <= info.age() < 600
        assert census.live_clusters() == [info]

        assert main(["clusters", "--format", "json"]) == 0
        [listed] = json.loads(capsys.readouterr().out)
        assert listed["key"] == "dag__run:1" and listed["state"] == "running"
        assert listed["processes"] == info.processes

        assert main(["clusters"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == [
            "KEY", "BACKEND", "STATE", "AGE", "PROCS", "SCHEDULER", "DASHBOARD"
        ]  # fmt: skip
        assert table[1].split()[:3] == ["dag__run:1", "local", "running"]

        assert main(["clusters", "--stop", "dag__run:1"]) == 0
        assert "stopped dag__run:1 (running," in capsys.readouterr().out
    finally:
        LocalBackend().down(handle)
    assert census.census() == []
    assert not cluster_dir("dag__run:1").exists()
    assert _marked(os.environ["DAGFACTORY_HOME"]) == []
    assert census.stop("dag__run:1") is None  # a second stop finds nothing, and says so


def test_orphans_and_stopped_folders_are_listed_and_stop_all_clears_both(spawned, capsys):
    # Processes whose state folder a teardown removed, and a folder whose processes are gone.
    orphan_dir = cluster_dir("lost__run")
    orphan = _marked_sleeper(spawned, str(orphan_dir))
    stale = cluster_dir("ended__run")
    stale.mkdir(parents=True)
    handle = ClusterHandle("local", "ended__run", "tcp://127.0.0.1:9", "http://127.0.0.1:9/status")
    (stale / "handle.json").write_text(json.dumps(handle.to_json()))
    starting = _marked_sleeper(spawned, str(cluster_dir("new__run")))
    cluster_dir("new__run").mkdir()

    found = {c.key: c for c in census.census()}
    assert set(found) == {"lost__run", "ended__run", "new__run"}
    assert found["lost__run"].state == census.ORPHANED
    assert found["lost__run"].pids == (orphan.pid,)
    assert found["ended__run"].state == census.STOPPED
    assert found["ended__run"].processes == 0
    assert found["ended__run"].scheduler_address == "tcp://127.0.0.1:9"
    assert found["new__run"].state == census.STARTING
    assert {c.key for c in census.live_clusters()} == {"lost__run", "new__run"}

    assert main(["clusters", "--stop-all"]) == 0
    out = capsys.readouterr().out
    assert "stopped lost__run (orphaned, 1 process(es))" in out
    assert "stopped ended__run (stopped, 0 process(es))" in out
    assert "stopped new__run (starting, 1 process(es))" in out
    assert orphan.wait(timeout=10) is not None and starting.wait(timeout=10) is not None
    assert census.census() == []
    assert not stale.exists()


def test_another_homes_clusters_are_not_ours(spawned, tmp_path, capsys):
    other = tmp_path / "other-home" / "clusters" / "theirs__run"
    theirs = _marked_sleeper(spawned, str(other))
    assert census.census() == []
    assert main(["clusters", "--stop-all"]) == 0
    assert theirs.poll() is None  # still running: not ours to stop
    assert "no clusters to stop" in capsys.readouterr().err


def test_stopping_an_unknown_key_names_the_clusters_there(spawned, capsys):
    _marked_sleeper(spawned, str(cluster_dir("known__run")))
    assert main(["clusters", "--stop", "typo__run"]) == 2
    err = capsys.readouterr().err
    assert "no cluster 'typo__run' on this host; clusters here: known__run" in err


def test_an_empty_census_says_so(spawned, capsys):
    assert main(["clusters"]) == 0
    assert "no clusters of" in capsys.readouterr().err
    assert census.census() == [] and census.live_clusters() == []
