"""Real Dask scheduler and worker processes on loopback."""

import contextlib
import json
import os
import signal
import time
import urllib.request

import psutil
import pytest

from dagfactory.backends import ClusterContext, ClusterHandle, backend_names, get_backend
from dagfactory.backends.local import cluster_dir, processes_of
from dagfactory.errors import ClusterError
from dagfactory.run.workspace import virtualenv
from dagfactory.spec.pipeline import AdaptiveSpec, ClusterSpec
from tests.conftest import cluster_processes

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def python():
    return str(virtualenv(["distributed", "bokeh>=3.1"]) / "bin" / "python")


def _workers(handle: ClusterHandle) -> int:
    url = handle.dashboard_link.replace("/status", "/json/counts.json")
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["workers"]


def test_builtin_backends_are_registered():
    assert {"local", "existing"} <= set(backend_names())
    with pytest.raises(ClusterError, match="unknown cluster backend 'nope'"):
        get_backend("nope")


def test_up_starts_the_asked_size_and_down_leaves_nothing(python, tmp_path):
    backend = get_backend("local")
    spec = ClusterSpec(workers=3, cpu=1, memory="512MiB")
    handle = backend.up(spec, ClusterContext("t_up_down", python, str(tmp_path)))
    try:
        assert handle.scheduler_address.startswith("tcp://127.0.0.1:")
        assert _workers(handle) == 3
        # handle survives a trip through JSON (XCom)
        assert ClusterHandle.from_json(json.dumps(handle.to_json())) == handle
        # detached: own session, not in the test's process group
        for proc in cluster_processes("t_up_down"):
            assert os.getsid(proc.pid) != os.getsid(0)
    finally:
        backend.down(handle)
    assert cluster_processes("t_up_down") == []
    assert not cluster_dir("t_up_down").exists()
    backend.down(handle)  # idempotent


def test_down_from_the_key_alone_finds_orphans(python, tmp_path):
    backend = get_backend("local")
    handle = backend.up(ClusterSpec(workers=2), ClusterContext("t_orphans", python, str(tmp_path)))
    # Kill the parent `dask worker` process: its nanny children live on as orphans.
    parent = handle.details["pids"][1]
    os.kill(parent, signal.SIGKILL)
    assert cluster_processes("t_orphans")
    backend.down(ClusterHandle("local", "t_orphans", ""))
    assert cluster_processes("t_orphans") == []


def test_up_again_with_the_same_key_replaces_a_half_made_cluster(python, tmp_path):
    backend = get_backend("local")
    first = backend.up(ClusterSpec(workers=1), ClusterContext("t_retry", python, str(tmp_path)))
    second = backend.up(ClusterSpec(workers=1), ClusterContext("t_retry", python, str(tmp_path)))
    try:
        assert second.scheduler_address != first.scheduler_address
        assert not set(first.details["pids"]) & {p.pid for p in cluster_processes("t_retry")}
    finally:
        backend.down(second)
    assert cluster_processes("t_retry") == []


def test_a_cluster_that_cannot_start_cleans_up_and_says_why(python, tmp_path):
    backend = get_backend("local")
    spec = ClusterSpec(workers=1, memory="1GiB")
    bad_python = tmp_path / "python"
    bad_python.write_text("#!/bin/sh\necho 'no dask in this interpreter' >&2\nexit 3\n")
    bad_python.chmod(0o755)
    with pytest.raises(ClusterError, match="(?s)exited with code 3.*no dask in this interpreter"):
        backend.up(spec, ClusterContext("t_broken", str(bad_python), str(tmp_path)))
    assert cluster_processes("t_broken") == []
    assert not cluster_dir("t_broken").exists()


def test_idle_timeout_stops_a_cluster_nobody_tore_down(python, tmp_path):
    import time

    backend = get_backend("local")
    spec = ClusterSpec(workers=1, idle_timeout="15s")
    backend.up(spec, ClusterContext("t_idle", python, str(tmp_path)))
    deadline = time.monotonic() + 90
    while cluster_processes("t_idle") and time.monotonic() < deadline:
        time.sleep(0.5)
    # the scheduler stops itself; workers follow within the death timeout
    assert not [p for p in cluster_processes("t_idle") if "dask_scheduler" in " ".join(p.cmdline())]
    backend.down(ClusterHandle("local", "t_idle", ""))


def test_existing_backend_connects_and_never_stops_the_cluster(python, tmp_path):
    local = get_backend("local")
    shared = local.up(ClusterSpec(workers=1), ClusterContext("t_shared", python, str(tmp_path)))
    try:
        existing = get_backend("existing")
        spec = ClusterSpec(backend="existing", address=shared.scheduler_address)
        handle = existing.up(spec, ClusterContext("t_user"))
        assert handle.scheduler_address == shared.scheduler_address
        existing.down(handle)
        assert _workers(shared) == 1
        with pytest.raises(ClusterError, match="cannot reach"):
            existing.up(
                ClusterSpec(backend="existing", address="tcp://127.0.0.1:9"),
                ClusterContext("t_user"),
            )
    finally:
        local.down(shared)


def test_down_stops_a_cluster_it_cannot_see_through_dasks_protocol(python, tmp_path, monkeypatch):
    """Teardown on another host: no marked process is visible there, only the handle."""
    backend = get_backend("local")
    handle = backend.up(ClusterSpec(workers=2), ClusterContext("t_remote", python, str(tmp_path)))
    started = cluster_processes("t_remote")
    assert len(started) >= 3  # scheduler, worker parent, nannies and workers
    with monkeypatch.context() as elsewhere:
        elsewhere.setenv("DAGFACTORY_HOME", str(tmp_path / "another-host"))
        assert processes_of("t_remote") == []  # "another host": its census sees nothing
        backend.down(handle)  # the census of "another host" finds none of them
    deadline = time.monotonic() + 60
    while cluster_processes("t_remote") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster_processes("t_remote") == []
    backend.down(handle)  # twice, harmlessly; also removes the state folder here
    assert not cluster_dir("t_remote").exists()


def test_listen_names_loopback_an_interface_or_an_address_of_this_host():
    from dagfactory.backends.local import listen_address

    assert listen_address("loopback") == "127.0.0.1"
    assert listen_address("lo") == "127.0.0.1"
    assert listen_address("127.0.0.1") == "127.0.0.1"
    with pytest.raises(ClusterError, match="'nosuch0' is no interface or address of this host"):
        listen_address("nosuch0")


def test_teardown_never_stops_another_scheduler_that_answers_at_the_handles_address(
    python, tmp_path
):
    """A loopback address in a handle from another host, or a port reused after its scheduler
    left, reaches someone else's scheduler: the scheduler id in the handle must match."""
    backend = get_backend("local")
    handle = backend.up(ClusterSpec(workers=1), ClusterContext("t_owner", python, str(tmp_path)))
    try:
        assert handle.details["scheduler_id"].startswith("Scheduler-")
        stranger = ClusterHandle(
            "local",
            "t_stranger",
            handle.scheduler_address,
            handle.dashboard_link,
            {**handle.details, "scheduler_id": "Scheduler-of-another-run", "host": "elsewhere"},
        )
        assert not backend.alive(stranger)
        backend.down(stranger)
        assert backend.alive(handle) and _workers(handle) == 1
    finally:
        backend.down(handle)
    assert cluster_processes("t_owner") == []


def _worker_commands(key: str) -> list:
    """The `dask worker` command processes of the cluster (each holds a nanny and its worker)."""
    return [p for p in cluster_processes(key) if "distributed.cli.dask_worker" in p.cmdline()]


def _zombies(parent: psutil.Process) -> list:
    """The parent's children that exited and that it has not reaped."""
    found = []
    for child in parent.children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.status() == psutil.STATUS_ZOMBIE:
                found.append(child)
    return found


def _until(condition, timeout: float = 60, every: float = 0.2):
    """Poll `condition` until it holds (generous deadline: the machine is shared)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(every)
    return result


def test_adaptive_grows_with_the_work_within_maximum_and_shrinks_back(python, tmp_path):
    from distributed import Client

    backend = get_backend("local")
    spec = ClusterSpec(workers=1, memory="512MiB", adaptive=AdaptiveSpec(minimum=1, maximum=3))
    handle = backend.up(spec, ClusterContext("t_adaptive", python, str(tmp_path)))
    try:
        assert handle.details["adaptive"] == {"minimum": 1, "maximum": 3}
        assert _workers(handle) == 1
        seen = []
        with Client(handle.scheduler_address, timeout=30) as client:
            futures = client.map(time.sleep, [0.5] * 40, pure=False)
            while not all(f.done() for f in futures):
                seen.append(_workers(handle))
                time.sleep(0.1)
            assert client.gather(futures) == [None] * 40
        assert max(seen) > 1, seen
        assert max(seen) <= 3, seen
        # Idle again: back to the minimum, the retired workers' processes ended and reaped.
        assert _until(lambda: _workers(handle) == 1 and len(_worker_commands("t_adaptive")) == 1)
        scheduler = psutil.Process(handle.details["pids"][0])
        assert _until(lambda: not _zombies(scheduler))
        logs = {p.name for p in cluster_dir("t_adaptive").glob("adaptive-*.log")}
        assert len(logs) >= 1  # the workers the scheduler started log to the cluster's folder
    finally:
        backend.down(handle)
    assert cluster_processes("t_adaptive") == []


def test_adaptive_minimum_zero_idles_with_no_worker_is_alive_and_starts_one_for_work(
    python, tmp_path
):
    from distributed import Client

    backend = get_backend("local")
    spec = ClusterSpec(workers=1, adaptive=AdaptiveSpec(minimum=0, maximum=2))
    handle = backend.up(spec, ClusterContext("t_adaptive0", python, str(tmp_path)))
    try:
        assert _until(lambda: _workers(handle) == 0)
        assert backend.alive(handle)
        fixed = {k: v for k, v in handle.details.items() if k != "adaptive"}
        assert not backend.alive(ClusterHandle(**{**handle.to_json(), "details": fixed}))
        with Client(handle.scheduler_address, timeout=30) as client:
            # work arrives: the scheduler starts a worker for it
            assert client.submit(sum, [1, 2]).result(timeout=60) == 3
    finally:
        backend.down(handle)
    assert cluster_processes("t_adaptive0") == []


def test_adaptive_workers_end_when_their_scheduler_is_killed(python, tmp_path, monkeypatch):
    from distributed import Client, fire_and_forget

    from dagfactory.backends import local

    monkeypatch.setattr(local, "DEATH_TIMEOUT", 5)  # the spawned workers get it too
    backend = get_backend("local")
    spec = ClusterSpec(workers=1, adaptive=AdaptiveSpec(minimum=1, maximum=2))
    handle = backend.up(spec, ClusterContext("t_adaptive_kill", python, str(tmp_path)))
    try:
        pid = handle.details["pids"][1]
        first = psutil.Process(pid).cmdline()
        with Client(handle.scheduler_address, timeout=30) as client:
            fire_and_forget(client.map(time.sleep, [0.5] * 30, pure=False))
        assert _until(lambda: _workers(handle) == 2)
        (spawned,) = [p.cmdline() for p in _worker_commands("t_adaptive_kill") if p.pid != pid]
        # one worker each, named, with the options of the first workers (death timeout included)
        nworkers = first.index("--nworkers")
        assert spawned == [*first[:nworkers], *first[nworkers + 2 :], "--name", "adaptive-1"]
        assert first[first.index("--death-timeout") + 1] == "5"
        os.kill(handle.details["pids"][0], signal.SIGKILL)
        # no scheduler to close them: every worker gives up after its death timeout
        assert _until(lambda: cluster_processes("t_adaptive_kill") == [])
    finally:
        backend.down(handle)
    assert cluster_processes("t_adaptive_kill") == []
    assert not cluster_dir("t_adaptive_kill").exists()
