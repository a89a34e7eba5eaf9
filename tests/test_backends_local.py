"""Real Dask scheduler and worker processes on loopback."""

import json
import os
import signal
import time
import urllib.request

import pytest

from dagfactory.backends import ClusterContext, ClusterHandle, backend_names, get_backend
from dagfactory.backends.local import cluster_dir, processes_of
from dagfactory.errors import ClusterError
from dagfactory.spec import ClusterSpec
from dagfactory.workspace import virtualenv
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
