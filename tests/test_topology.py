"""The production topology, for real: Airflow on Postgres and Redis with the CeleryExecutor, and
two Celery workers on two hosts (network namespaces made by the test, see tests/topology.py).

Host dfx-a consumes the queue `big`, host dfx-b the default queue. A pipeline with `queue: big`
therefore bootstraps on dfx-b, starts its cluster and runs on dfx-a, and tears down on dfx-b.
Each host has its own DAGFACTORY_HOME: dfx-b cannot find dfx-a's processes by their marker, so
only Dask's own shutdown, sent to the address the cluster listens on (`listen: dfx0`), can stop
them. The hosts reach nothing but the bridge: their virtualenvs are built from uv's cache
(UV_OFFLINE), which the test fills first from the root namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil
import pytest

from tests.airflow_services import AirflowServices, airflow_services
from tests.conftest import EXAMPLE, make_repo, write_pipeline
from tests.topology import Network, celery_worker, hosts, missing, postgres, redis

pytestmark = pytest.mark.e2e

POOL = "dagfactory_clusters"
CROSS = "topology_cross"
CAPPED = ("topology_capped_1", "topology_capped_2")
STOPPED_WITHIN = 30  # seconds from a green run to no process of it; idle_timeout is 10 minutes

GATE = '''
import json
import os
import pathlib
import time

from wordcount.job import main as wordcount


def gated(client, gate_dir, **params):
    """Say where the cluster runs, wait until the test has looked, then count words."""
    gate = pathlib.Path(gate_dir)
    note = {"pid": os.getpid(), "scheduler": client.scheduler.address,
            "workers": sorted(client.scheduler_info()["workers"])}
    (gate / "ready.tmp").write_text(json.dumps(note))
    (gate / "ready.tmp").rename(gate / "ready.json")
    deadline = time.monotonic() + 300
    while not (gate / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return wordcount(client, **params)
'''

CLUSTER = "{workers: 1, memory: 1GiB, listen: dfx0, idle_timeout: 10m%s}"


@dataclass
class Topology:
    network: Network
    services: AirflowServices
    root: Path  # every host's DAGFACTORY_HOME is under it
    gate: Path


def _warm_package_cache() -> None:
    """Build the pipelines' virtualenv once here, where the package index is reachable: the
    hosts then install the same requirements from uv's cache alone."""
    from dagfactory.run.workspace import BASE_REQUIREMENTS, virtualenv

    lines = (EXAMPLE / "requirements.txt").read_text().splitlines()
    virtualenv([*BASE_REQUIREMENTS, *(line.strip() for line in lines if line.strip())])


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


@pytest.fixture(scope="module")
def topology(tmp_path_factory, wordcount_repo):
    if why := missing():
        if os.environ.get("CI"):
            pytest.fail(f"the topology tests cannot run: {why}")
        pytest.skip(why)
    root = tmp_path_factory.mktemp("topology")
    gate = root / "gate"
    gate.mkdir()
    gated = make_repo(root / "remotes" / "gated", {"gate.py": GATE}, copy_from=EXAMPLE)
    pipelines = root / "pipelines"
    write_pipeline(
        pipelines,
        CROSS,
        f"""
        source: {{git: {gated.path}, requirements: requirements.txt}}
        entrypoint: gate:gated
        params: {{gate_dir: {json.dumps(str(gate))}, chunks: 8, top: 2}}
        queue: big
        cluster: {CLUSTER % ""}
        """,
    )
    for dag_id in CAPPED:
        write_pipeline(
            pipelines,
            dag_id,
            f"""
            source: {{git: {wordcount_repo.path}, requirements: requirements.txt}}
            entrypoint: wordcount.job:main
            params: {{chunks: 8, top: 2}}
            queue: big
            cluster: {CLUSTER % f", pool: {POOL}"}
            """,
        )
    _warm_package_cache()
    begin = time.monotonic()
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(hosts(2))
        listen = ("127.0.0.1", net.address)
        pg = stack.enter_context(postgres(root / "postgres", listen, clients=(net.subnet,)))
        broker = stack.enter_context(redis(root / "redis", listen))
        celery = {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__FERNET_KEY": _fernet_key(),
            "AIRFLOW__CELERY__BROKER_URL": broker.url(net.address),
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + pg.url(net.address),
        }
        services = stack.enter_context(
            airflow_services(
                root / "airflow",
                pipelines,
                celery,
                host=net.address,
                database=pg.url("127.0.0.1"),
            )
        )
        workers = []
        for host, queue in zip(net.hosts, ("big", "default"), strict=True):
            env = {
                **services.env,  # the same JWT secret, fernet key, broker, DAGs
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.url(net.address),
                "DAGFACTORY_HOME": str(root / "hosts" / host.name / "dagfactory"),
                "UV_OFFLINE": "1",
            }
            workers.append(stack.enter_context(celery_worker(host, [queue], env, services.logs)))
        for worker in workers:
            worker.wait_ready()
        services.wait_parsed(CROSS, *CAPPED)
        print(f"\ntopology up in {time.monotonic() - begin:.1f} s")
        yield Topology(net, services, root, gate)


# --- census --------------------------------------------------------------------------------------


def marked(topology: Topology) -> list[tuple[str, int, str]]:
    """(host, pid, command line) of every live process that carries the marker of a run of
    any host's DAGFACTORY_HOME: Dask scheduler, workers, nannies, entry points."""
    from dagfactory.backends.local import KEY_VARIABLE

    found = []
    for proc in psutil.process_iter():
        try:
            marker = proc.environ().get(KEY_VARIABLE, "")
            if marker.startswith(str(topology.root)) and proc.status() != psutil.STATUS_ZOMBIE:
                where = topology.network.host_of(proc.pid)
                found.append((where, proc.pid, " ".join(proc.cmdline())[:160]))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def wait_nothing_left(topology: Topology, bound: float = STOPPED_WITHIN) -> float:
    """Seconds until no marked process is left on any host; fails after `bound`."""
    began = time.monotonic()
    while left := marked(topology):
        if time.monotonic() - began > bound:
            pytest.fail(
                f"{len(left)} process(es) of a finished run still running {bound:.0f} s after "
                "it went green:\n" + "\n".join(f"  {h} {pid} {cmd}" for h, pid, cmd in left)
            )
        time.sleep(0.2)
    return time.monotonic() - began


def _run_id(name: str) -> str:
    return f"{name}_{time.time_ns()}"


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def _wait_gate(topology: Topology, dag_id: str, run_id: str) -> dict:
    path = topology.gate / "ready.json"
    deadline = time.monotonic() + 300
    while not path.exists():
        if time.monotonic() > deadline or topology.services.run(dag_id, run_id)["state"] in (
            "failed",
            "success",
        ):
            pytest.fail(
                f"{dag_id} never got to its entry point: "
                + topology.services.explain(dag_id, run_id)
                + topology.services.tail()
            )
        time.sleep(0.2)
    return json.loads(path.read_text())


# --- tests ---------------------------------------------------------------------------------------


def test_cluster_on_one_host_is_torn_down_from_the_other(topology):
    services, (a, b) = topology.services, topology.network.hosts
    dag_id, run_id = CROSS, _run_id("cross")
    services.trigger(dag_id, run_id)

    note = _wait_gate(topology, dag_id, run_id)
    running = marked(topology)
    scheduler = [p for p in running if "dask_scheduler" in p[2]]
    assert len(scheduler) == 1, running
    assert {host for host, _, _ in running} == {a.name}, running
    assert a.contains(note["pid"])  # the entry point
    assert note["scheduler"].startswith(f"tcp://{a.address}:"), note
    assert all(w.startswith(f"tcp://{a.address}:") for w in note["workers"]), note
    (topology.gate / "go").touch()

    assert services.wait_run(dag_id, run_id) == "success", services.explain(dag_id, run_id)
    tis = services.task_instances(dag_id, run_id)
    where = {task: (ti["hostname"], ti["queue"]) for task, ti in tis.items()}
    assert where == {
        "bootstrap": (b.name, "default"),
        "cluster_up": (a.name, "big"),
        "run": (a.name, "big"),
        "teardown": (b.name, "default"),
    }, where
    assert services.xcom(dag_id, run_id, "cluster_up")["scheduler_address"] == note["scheduler"]
    # The code moved with the run: dfx-a prepared the commit dfx-b's bootstrap pinned, and said so.
    commit = services.xcom(dag_id, run_id, "bootstrap")["commit"]
    said = f"commit {commit[:12]} is not on this host ({a.name}) yet: bootstrapping here"
    assert said in services.task_log(dag_id, run_id, "cluster_up", chars=10**6)
    result = services.xcom(dag_id, run_id, "run")
    assert result["chunks"] == 8 and result["top"] == [["the", 3368], ["of", 3218]]

    # dfx-b's teardown cannot find dfx-a's processes by marker (another DAGFACTORY_HOME):
    # what stops them is its shutdown message to the scheduler's address on dfx-a.
    took = wait_nothing_left(topology)
    print(f"\nteardown on {b.name}: nothing left on any host {took:.1f} s after the run")


def test_a_pool_of_one_runs_two_clusters_one_after_the_other(topology):
    services = topology.services
    services.api("POST", "/pools", {"name": POOL, "slots": 1, "description": "running clusters"})
    runs = {dag_id: services.trigger(dag_id, _run_id("capped")) for dag_id in CAPPED}
    for dag_id, run_id in runs.items():
        assert services.wait_run(dag_id, run_id) == "success", services.explain(dag_id, run_id)

    tis = {dag_id: services.task_instances(dag_id, run_id) for dag_id, run_id in runs.items()}
    first, second = sorted(CAPPED, key=lambda d: _when(tis[d]["run"]["start_date"]))
    for dag_id in CAPPED:
        assert tis[dag_id]["run"]["pool"] == POOL, tis[dag_id]
        assert all(ti["state"] == "success" for ti in tis[dag_id].values()), tis[dag_id]
        # The cluster started inside the run task, which held the slot.
        log = services.task_log(dag_id, runs[dag_id], "run", chars=10**6)
        assert "starting the cluster of this run under" in log, log[-2000:]
    # The second run was ready (its cluster_up done) while the first held the slot, and its
    # cluster started only once the first run had ended.
    first_ended = _when(tis[first]["run"]["end_date"])
    second_ready = _when(tis[second]["cluster_up"]["end_date"])
    second_started = _when(tis[second]["run"]["start_date"])
    assert second_ready < first_ended <= second_started, (first, tis[first], second, tis[second])
    gap = (second_started - first_ended).total_seconds()
    print(f"\n{second} run (and its cluster) started {gap:.1f} s after {first} run ended")
    wait_nothing_left(topology)
