"""Faults injected into real runs under real Airflow services: nothing left running, nothing lost.

Each test triggers a run through the REST API of a running api-server, scheduler and DAG
processor (LocalExecutor, SQLite), injects one fault (an exception, a SIGKILL of a task process,
of a Dask process, of all of Airflow, a timeout), then checks what Airflow shows and takes a
census: no process carrying the run's marker (Dask and the entry point), no task process of the
run. The time from the fault to an empty census is printed (run with -s) and summed up at the
end of the module.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.airflow_services import AirflowServices, airflow_services
from tests.conftest import make_repo, marked_processes, run_key, write_pipeline

pytestmark = pytest.mark.e2e

JOBS = '''
import json
import os
import pathlib
import time


def _ready(signal_dir, name, **info):
    """Tell the test that the job reached the point where the fault belongs."""
    path = pathlib.Path(signal_dir) / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), **info}))
    tmp.rename(path)


def _square(i, delay=0.0):
    time.sleep(delay)
    return i * i


def fails(client, signal_dir, name):
    client.submit(sum, [1, 2, 3]).result()
    raise ValueError("the input is corrupt")


def sleeps(client, signal_dir, name, seconds=300):
    client.submit(sum, [1, 2, 3]).result()
    _ready(signal_dir, name)
    time.sleep(seconds)
    return "woke up"


# One name per scenario: a census finds each scenario's entry point by its command line.
kill_runner = kill_supervisor = times_out = dagrun_times_out = whole_tree = sleeps


def squares(client, signal_dir, name, n=40, delay=0.25):
    before = sorted(client.run(os.getpid).values())
    futures = client.map(_square, range(n), delay=delay)
    futures[0].result()
    _ready(signal_dir, name, workers=before)
    total = sum(client.gather(futures))
    return {"total": total, "workers_before": before,
            "workers_after": sorted(client.run(os.getpid).values())}


def heals(client, signal_dir, name, n=20):
    """First try: keep the cluster busy until its scheduler is killed. Retry: compute."""
    if not (pathlib.Path(signal_dir) / f"{name}.json").exists():
        _ready(signal_dir, name, scheduler=client.scheduler.address)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            client.submit(_square, 3, 0.1, pure=False).result()
        raise RuntimeError("the scheduler was never killed")
    return {"total": sum(client.gather(client.map(_square, range(n)))),
            "scheduler": client.scheduler.address}


def quick(client, n=20):
    return {"total": sum(client.gather(client.map(_square, range(n), delay=0.05))),
            "scheduler": client.scheduler.address}
'''

HEARTBEAT_TIMEOUT = 20
SERVICES_ENV = {
    # A task whose supervisor died is noticed after this long (default 300 s).
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
}
SQUARES = sum(i * i for i in range(40))

# fault -> seconds from the fault to an empty census, printed at the end of the module
TIMINGS: dict[str, float] = {}


def _pipeline(entrypoint: str, params: dict | None = None, extra: str = "", workers: int = 1):
    return entrypoint, params or {}, extra, workers


def _scenarios(signals: Path) -> dict[str, tuple]:
    def sig(name: str) -> dict:
        return {"signal_dir": str(signals), "name": name}

    return {
        "faults_raise": _pipeline("fails", sig("raise")),
        "faults_kill_runner": _pipeline("kill_runner", sig("kill_runner")),
        "faults_kill_supervisor": _pipeline("kill_supervisor", sig("kill_supervisor")),
        "faults_timeout": _pipeline("times_out", sig("timeout"), "timeout: 10s"),
        "faults_kill_worker": _pipeline("squares", sig("kill_worker")),
        "faults_kill_scheduler": _pipeline(
            "heals", sig("kill_scheduler"), "retries: 1\nretry_delay: 2s"
        ),
        "faults_dagrun_timeout": _pipeline(
            "dagrun_times_out", sig("dagrun_timeout"), "dagrun_timeout: 30s", 1
        ),
        "faults_twice": _pipeline("quick"),
    }


def _write(folder: Path, dag_id: str, repo: Path, scenario: tuple, cluster: str = "") -> None:
    entrypoint, params, extra, workers = scenario
    module = "fault_jobs"
    text = f"source:\n  git: {repo}\n"
    text += f"entrypoint: {module}:{entrypoint}\nparams: {json.dumps(params)}\n"
    text += f"cluster: {{workers: {workers}{cluster}}}\n{extra}\n"
    write_pipeline(folder, dag_id, text)


@pytest.fixture(scope="module")
def signals(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("signals")


@pytest.fixture(scope="module")
def jobs_repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("remotes") / "jobs", {"fault_jobs.py": JOBS})


@pytest.fixture(scope="module")
def same_commit_repo(tmp_path_factory):
    """A commit (and a requirements set) no other test uses: its cache entries start empty."""
    marker = f"faults-{os.getpid()}-{time.time_ns()}"
    return make_repo(
        tmp_path_factory.mktemp("remotes") / "same_commit",
        {"fault_jobs.py": JOBS, "requirements.txt": f"toolz  # {marker}\n"},
    ), marker


@pytest.fixture(scope="module")
def services(tmp_path_factory, jobs_repo, same_commit_repo, signals):
    root = tmp_path_factory.mktemp("faults-airflow")
    pipelines = root / "pipelines"
    scenarios = _scenarios(signals)
    for dag_id, scenario in scenarios.items():
        _write(pipelines, dag_id, jobs_repo.path, scenario)
    repo, _ = same_commit_repo
    for dag_id in ("faults_commit_a", "faults_commit_b"):
        text = (
            f"source:\n  git: {repo.path}\n  requirements: requirements.txt\n"
            "entrypoint: fault_jobs:quick\ncluster: {workers: 1}\n"
        )
        write_pipeline(pipelines, dag_id, text)
    begin = time.monotonic()
    with airflow_services(root / "airflow", pipelines, SERVICES_ENV) as started:
        print(f"\nAirflow services up in {time.monotonic() - begin:.1f} s")
        started.wait_parsed(*scenarios, "faults_commit_a", "faults_commit_b")
        print(f"pipelines parsed after {time.monotonic() - begin:.1f} s")
        yield started
    _print_timings()


def _print_timings() -> None:
    if TIMINGS:
        rows = "\n".join(f"  {name:<48} {secs:6.1f} s" for name, secs in TIMINGS.items())
        print(f"\nfault -> zero processes of the run:\n{rows}")


# --- census ------------------------------------------------------------------------------------


def _entry_points(entrypoint: str) -> list[psutil.Process]:
    """Live entry point processes of `fault_jobs:<entrypoint>` (not bootstrap's import check)."""
    wanted = f"fault_jobs:{entrypoint}"
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or "--check" in cmd:
            continue
        if wanted in cmd and "--entrypoint" in cmd:
            found.append(proc)
    return found


def census(services: AirflowServices, dag_id: str, run_id: str, entrypoint: str) -> list:
    """Every live process of the run: marked ones, its entry point, its task processes."""
    found = {p.pid: p for p in marked_processes(run_key(dag_id, run_id))}
    found.update({p.pid: p for p in _entry_points(entrypoint)})
    found.update({p.pid: p for p in services.task_processes(dag_id, run_id)})
    return list(found.values())


def _describe(procs: list) -> str:
    lines = []
    for proc in procs:
        try:
            lines.append(f"  {proc.pid} {' '.join(proc.cmdline())[:160]}")
        except psutil.Error:
            lines.append(f"  {proc.pid} (gone)")
    return "\n".join(lines)


def wait_zero(
    services: AirflowServices,
    dag_id: str,
    run_id: str,
    entrypoint: str,
    since: float,
    bound: float,
    fault: str,
) -> float:
    """Seconds from `since` (a monotonic time) until the census of the run is empty."""
    while True:
        left = census(services, dag_id, run_id, entrypoint)
        elapsed = time.monotonic() - since
        if not left:
            if fault:
                TIMINGS[fault] = elapsed
                print(f"\n{fault}: zero processes {elapsed:.1f} s after the fault")
            return elapsed
        if elapsed > bound:
            for proc in left:  # leave nothing behind for the next test
                proc.kill()
            pytest.fail(
                f"{fault or 'after the run'}: {len(left)} process(es) of {dag_id} {run_id} "
                "still running "
                f"{bound:.0f} s after the fault:\n{_describe(left)}\n"
                f"tasks: {_states_or_why(services, dag_id, run_id)}"
            )
        time.sleep(0.1)


def _states_or_why(services: AirflowServices, dag_id: str, run_id: str) -> object:
    try:
        return services.states(dag_id, run_id)
    except OSError as exc:  # the services are gone (killed by the test)
        return f"unknown ({exc})"


def settle(services: AirflowServices, dag_id: str, run_id: str, entrypoint: str) -> None:
    """Zero processes of a finished run, allowing its last task processes a moment to exit."""
    wait_zero(services, dag_id, run_id, entrypoint, time.monotonic(), 30, "")


def wait_ready(signals: Path, name: str, services: AirflowServices, dag_id: str, run_id: str):
    """The job's note that it reached the fault's moment (its pid and whatever it adds)."""
    path = signals / f"{name}.json"
    deadline = time.monotonic() + 300
    while not path.exists():
        if time.monotonic() > deadline or services.run(dag_id, run_id)["state"] == "failed":
            pytest.fail(
                f"{dag_id} never got to {name}: tasks {services.states(dag_id, run_id)}"
                + services.tail()
            )
        time.sleep(0.1)
    return json.loads(path.read_text())


def _run_id(name: str) -> str:
    return f"{name}_{time.time_ns()}"


# --- scenarios ---------------------------------------------------------------------------------


def test_entry_point_raises_run_fails_teardown_stops_everything(services):
    dag_id, run_id = "faults_raise", _run_id("raise")
    services.trigger(dag_id, run_id)
    assert services.wait_run(dag_id, run_id) == "failed"
    states = services.states(dag_id, run_id)
    assert states["run"] == "failed", services.explain(dag_id, run_id)
    assert states["teardown"] == "success", services.explain(dag_id, run_id)
    assert "the input is corrupt" in services.task_log(dag_id, run_id, "run")
    settle(services, dag_id, run_id, "fails")


def _entry_point_of(signals, name, services, dag_id, run_id, entrypoint) -> psutil.Process:
    note = wait_ready(signals, name, services, dag_id, run_id)
    found = _entry_points(entrypoint)
    assert [p.pid for p in found] == [note["pid"]], _describe(found)
    return found[0]


def test_sigkill_of_the_task_runner_fails_the_run_and_leaves_nothing(services, signals):
    dag_id, run_id = "faults_kill_runner", _run_id("kill_runner")
    services.trigger(dag_id, run_id)
    entry = _entry_point_of(signals, "kill_runner", services, dag_id, run_id, "kill_runner")
    runner = entry.parent()
    assert services.task_instances(dag_id, run_id)["run"]["id"] in " ".join(runner.cmdline())
    runner.kill()
    fault = time.monotonic()
    wait_zero(services, dag_id, run_id, "kill_runner", fault, 60, "SIGKILL task runner")
    assert services.wait_run(dag_id, run_id) == "failed"
    states = services.states(dag_id, run_id)
    assert states["run"] == "failed", services.explain(dag_id, run_id)
    assert states["teardown"] == "success", services.explain(dag_id, run_id)
    settle(services, dag_id, run_id, "kill_runner")


def test_sigkill_of_the_task_supervisor_is_noticed_and_leaves_nothing(services, signals):
    dag_id, run_id = "faults_kill_supervisor", _run_id("kill_supervisor")
    services.trigger(dag_id, run_id)
    entry = _entry_point_of(signals, "kill_supervisor", services, dag_id, run_id, "kill_supervisor")
    supervisor = entry.parent().parent()
    assert "LocalExecutor" in " ".join(supervisor.cmdline()), supervisor.cmdline()
    supervisor.kill()
    fault = time.monotonic()
    wait_zero(
        services,
        dag_id,
        run_id,
        "kill_supervisor",
        fault,
        HEARTBEAT_TIMEOUT + 60,
        "SIGKILL task supervisor",
    )
    assert services.wait_run(dag_id, run_id) == "failed"
    assert services.states(dag_id, run_id)["run"] == "failed"
    settle(services, dag_id, run_id, "kill_supervisor")


def test_execution_timeout_fails_the_run_and_leaves_nothing(services, signals):
    dag_id, run_id = "faults_timeout", _run_id("timeout")
    services.trigger(dag_id, run_id)
    wait_ready(signals, "timeout", services, dag_id, run_id)
    # The fault is the timeout's expiry, taken as 10 s after the entry point started sleeping
    # (execute() began a little earlier: this slightly flatters the figure).
    since = time.monotonic() + 10
    assert services.wait_run(dag_id, run_id) == "failed"
    wait_zero(services, dag_id, run_id, "times_out", since, 120, "timeout: 10s")
    states = services.states(dag_id, run_id)
    assert states["run"] == "failed" and states["teardown"] == "success", states


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_a_dask_worker_killed_mid_computation_loses_nothing(services, signals):
    dag_id, run_id = "faults_kill_worker", _run_id("kill_worker")
    services.trigger(dag_id, run_id)
    note = wait_ready(signals, "kill_worker", services, dag_id, run_id)
    (worker,) = note["workers"]
    marked = {p.pid for p in marked_processes(run_key(dag_id, run_id))}
    assert worker in marked  # a process of this run's cluster, nothing else
    os.kill(worker, signal.SIGKILL)
    assert services.wait_run(dag_id, run_id) == "success", services.explain(dag_id, run_id)
    result = services.xcom(dag_id, run_id, "run")
    assert result["total"] == SQUARES
    assert result["workers_before"] == [worker] and worker not in result["workers_after"]
    settle(services, dag_id, run_id, "squares")


def test_a_killed_dask_scheduler_is_replaced_by_the_retry(services, signals):
    dag_id, run_id = "faults_kill_scheduler", _run_id("kill_scheduler")
    services.trigger(dag_id, run_id)
    note = wait_ready(signals, "kill_scheduler", services, dag_id, run_id)
    port = note["scheduler"].rsplit(":", 1)[1]
    (scheduler,) = [
        p
        for p in marked_processes(run_key(dag_id, run_id))
        if "dask_scheduler" in " ".join(p.cmdline()) and port in p.cmdline()
    ]
    scheduler.kill()
    fault = time.monotonic()
    state = services.wait_run(dag_id, run_id)
    healed = time.monotonic() - fault
    tis = services.task_instances(dag_id, run_id)
    assert state == "success", services.explain(dag_id, run_id)
    assert tis["run"]["try_number"] == 2
    first = services.xcom(dag_id, run_id, "cluster_up")["scheduler_address"]
    replacement = services.xcom(dag_id, run_id, "run", key="cluster")
    result = services.xcom(dag_id, run_id, "run")
    assert result["total"] == sum(i * i for i in range(20))
    assert first == note["scheduler"] != result["scheduler"]
    assert replacement["scheduler_address"] == result["scheduler"]
    print(f"\nDask scheduler SIGKILL: run green {healed:.1f} s after the fault")
    wait_zero(services, dag_id, run_id, "heals", fault, 120, "SIGKILL Dask scheduler (retry)")
    assert tis["teardown"]["state"] == "success"


def test_dagrun_timeout_stops_the_cluster_long_before_its_idle_timeout(services, signals):
    dag_id, run_id = "faults_dagrun_timeout", _run_id("dagrun_timeout")
    services.trigger(dag_id, run_id)
    wait_ready(signals, "dagrun_timeout", services, dag_id, run_id)
    started = services.run(dag_id, run_id)["start_date"]
    assert services.wait_run(dag_id, run_id, timeout=120) == "failed"
    since = time.monotonic() - (time.time() - (_epoch(started) + 30))
    # idle_timeout is 10 minutes: only the DAG's failure callback gets it stopped this soon
    wait_zero(services, dag_id, run_id, "dagrun_times_out", since, 120, "dagrun_timeout: 30s")
    print(f"dagrun_timeout: tasks {services.states(dag_id, run_id)}")


def test_two_runs_of_one_pipeline_at_once_get_separate_clusters(services):
    dag_id = "faults_twice"
    runs = [services.trigger(dag_id, _run_id(f"twice{i}")) for i in (1, 2)]
    for run_id in runs:
        assert services.wait_run(dag_id, run_id) == "success", services.explain(dag_id, run_id)
    results = [services.xcom(dag_id, r, "run") for r in runs]
    handles = [services.xcom(dag_id, r, "cluster_up") for r in runs]
    assert [r["total"] for r in results] == [sum(i * i for i in range(20))] * 2
    assert handles[0]["scheduler_address"] != handles[1]["scheduler_address"]
    assert [r["scheduler"] for r in results] == [h["scheduler_address"] for h in handles]
    for run_id in runs:
        settle(services, dag_id, run_id, "quick")


def test_two_pipelines_bootstrapping_one_commit_at_once_share_one_cache_entry(
    services, same_commit_repo
):
    from dagfactory.run.workspace import dagfactory_home

    repo, marker = same_commit_repo
    runs = {d: services.trigger(d, _run_id(d)) for d in ("faults_commit_a", "faults_commit_b")}
    for dag_id, run_id in runs.items():
        assert services.wait_run(dag_id, run_id) == "success", services.explain(dag_id, run_id)
        assert services.xcom(dag_id, run_id, "run")["total"] == sum(i * i for i in range(20))
        settle(services, dag_id, run_id, "quick")
    commit = repo.head()
    home = dagfactory_home()
    checkouts = [p.name for p in (home / "checkouts").iterdir() if commit in p.name]
    assert checkouts == [commit]
    assert (home / "checkouts" / commit / "fault_jobs.py").read_text() == textwrap.dedent(JOBS)
    venvs = [
        p
        for p in (home / "venvs").iterdir()
        if p.is_dir() and marker in _read(p / ".dagfactory-complete")
    ]
    assert len(venvs) == 1
    assert [
        p
        for p in (home / "venvs").iterdir()
        if p.is_dir() and p not in venvs and not (p / ".dagfactory-complete").exists()
    ] == []


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


# --- all of Airflow killed: its own services ---------------------------------------------------


def test_whole_airflow_killed_after_cluster_up_the_cluster_stops_itself(
    tmp_path, jobs_repo, signals
):
    pipelines = tmp_path / "pipelines"
    idle = 20
    _write(
        pipelines, "faults_whole_tree", jobs_repo.path,
        _pipeline("whole_tree", {"signal_dir": str(signals), "name": "whole_tree"}),
        cluster=f", idle_timeout: {idle}s",
    )  # fmt: skip
    dag_id, run_id = "faults_whole_tree", _run_id("whole_tree")
    with airflow_services(tmp_path / "airflow", pipelines, SERVICES_ENV) as services:
        services.wait_parsed(dag_id)
        services.trigger(dag_id, run_id)
        services.wait_task(dag_id, run_id, "cluster_up", ("success",))
        services.kill(signal.SIGKILL)
        fault = time.monotonic()
        assert marked_processes(run_key(dag_id, run_id))  # the cluster outlived Airflow
        wait_zero(
            services,
            dag_id,
            run_id,
            "whole_tree",
            fault,
            idle + 60,
            f"SIGKILL all Airflow services (idle_timeout {idle}s)",
        )
