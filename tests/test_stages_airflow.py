"""Multi-stage pipelines under real Airflow services: one cluster per stage, results between
steps, nested defaults and a profile, a stage's teardown as soon as it is done, prewarm, an
asset-triggered downstream pipeline, and a step retry that heals a killed Dask scheduler.

One Airflow instance (api-server, scheduler with the LocalExecutor, DAG processor) serves the
module. Two runs of one three-stage pipeline go at once: a plain one, and one whose first stage
loses its Dask scheduler (SIGKILL) during its second step. The steps report what Dask itself
says of the cluster they run on (`client.scheduler_info()`), and they wait for the events the
tests assert on (the previous stage's scheduler stopping, the next stage's prewarmed cluster,
the other step of a parallel group) with bounded waits, so the assertions compare orders and
values, never durations.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from dagfactory.backends import scheduler_answers
from tests.airflow_services import FINISHED, AirflowServices, airflow_services
from tests.conftest import cluster_processes, make_repo, marked_processes, run_key, write_pipeline

pytestmark = pytest.mark.e2e

DAG_ID = "stages_e2e"
DOWNSTREAM = "stages_e2e_down"
OUTLET = "x-test://stages-e2e/published"
MIB = 2**20
STAGES = {
    "ingest": ("extract", "clean"),
    "transform": ("aggregate", "watch", "summarize"),
    "report": ("publish",),
}
ROWS = 1000
KEPT = [i * i for i in range(ROWS) if i * i % 2 == 0]  # what clean keeps of extract's rows

JOBS = '''
"""Steps of the staged test pipeline. Each reports the cluster it ran on, as Dask sees it."""

import json
import os
import pathlib
import socket
import time

from distributed import Event

BOUND = 120  # seconds any step waits for what it waits for


def _cluster(client):
    info = client.scheduler_info()
    return {
        "scheduler_id": info["id"],
        "address": client.scheduler.address,
        "workers": len(info["workers"]),
        "memory": sorted(w["memory_limit"] for w in info["workers"].values()),
    }


def _square(i):
    return i * i


def _answers(address):
    """Whether anything listens at a tcp://host:port address."""
    host, port = address.split("://", 1)[1].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        return False
    return True


def _until(condition):
    """Whether condition() came true within BOUND seconds."""
    deadline = time.monotonic() + BOUND
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _meet(client, me, other):
    """Whether the step `other` ran at the same time: each sets its event, waits for the
    other's, on the cluster they share."""
    Event(f"{me}-running", client=client).set()
    return Event(f"{other}-running", client=client).wait(timeout=BOUND)


def extract(client, rows):
    squares = client.gather(client.map(_square, range(rows)))
    return {**_cluster(client), "rows": rows, "parts": [1, 2, 3], "total": sum(squares)}


def clean(client, rows, parts, text, label, day, kill_dir):
    if kill_dir and not (pathlib.Path(kill_dir) / "clean.json").exists():
        # The recovery run's first try: say so, then keep the cluster busy until the test
        # kills its scheduler.
        note = pathlib.Path(kill_dir) / "clean.json"
        tmp = note.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "address": client.scheduler.address}))
        tmp.rename(note)
        address = client.scheduler.address
        deadline = time.monotonic() + BOUND
        while time.monotonic() < deadline:
            try:
                client.submit(_square, 3, pure=False).result(timeout=1)
            except Exception:
                pass
            # Fail as soon as the scheduler is gone, not after the client's reconnect timeout.
            if not _answers(address):
                raise RuntimeError(f"lost the scheduler at {address}")
            time.sleep(0.1)
        raise RuntimeError("the scheduler was never killed")
    kept = [v for v in client.gather(client.map(_square, range(rows))) if v % 2 == 0]
    types = {name: type(value).__name__ for name, value in
             {"rows": rows, "parts": parts, "text": text, "label": label, "day": day}.items()}
    return {**_cluster(client), "rows": len(kept), "total": sum(kept), "types": types,
            "parts": parts, "text": text, "label": label, "day": day}


def aggregate(client, rows):
    met = _meet(client, "aggregate", "watch")
    total = sum(client.gather(client.map(_square, range(rows))))
    return {**_cluster(client), "total": total, "rows_type": type(rows).__name__, "met": met}


def watch(client, address):
    """Until the scheduler at address (the previous stage's) stops answering."""
    met = _meet(client, "watch", "aggregate")
    return {**_cluster(client), "saw_stop": _until(lambda: not _answers(address)), "met": met}


def summarize(client, total, prewarmed):
    """Until the cluster of the stage `prewarmed` is up: it starts while this step runs."""
    # This step's marker is <clusters>/<run key>__<its stage>; the other stage's is beside it.
    mine = pathlib.Path(os.environ["DAGFACTORY_CLUSTER_KEY"])
    handle = mine.with_name(f"{mine.name.rsplit('__', 1)[0]}__{prewarmed}") / "handle.json"
    return {**_cluster(client), "total": total, "saw_prewarmed": _until(handle.exists)}


def publish(client, total):
    return {**_cluster(client), "total": total}


def downstream(client):
    return _cluster(client)
'''

ROOT_DEFAULTS = """
owner: platform
retries: 1
retry_delay: 1s
cluster: {workers: 2, memory: 600MiB, idle_timeout: 10m}
profiles:
  ci:
    cluster: {memory: 700MiB}
"""

# Nearest wins: memory 800MiB over the root's 600MiB and its profile's 700MiB; the profile of
# this folder sets the owner and one worker.
TEAM_DEFAULTS = """
cluster: {memory: 800MiB}
profiles:
  ci:
    owner: team-ci
    cluster: {workers: 1}
"""

PIPELINE = """
source: {{git: {repo}}}
params: {{label: "{{{{ ds }}}}", kill_dir: ""}}
stages:
  ingest:
    steps:
      - extract: {{entrypoint: stage_jobs:extract, params: {{rows: {rows}}}}}
      - clean:
          entrypoint: stage_jobs:clean
          params:
            rows: "{{{{ steps.extract.rows }}}}"
            parts: "{{{{ steps.extract.parts }}}}"
            text: "rows={{{{ steps.extract.rows }}}}"
            label: "{{{{ params.label }}}}"
            day: "{{{{ ds }}}}"
            kill_dir: "{{{{ params.kill_dir }}}}"
  transform:
    depends_on: [ingest]
    cluster: {{workers: 2, memory: 900MiB}}
    steps:
      - parallel:
          - aggregate:
              entrypoint: stage_jobs:aggregate
              params: {{rows: "{{{{ steps.clean.rows }}}}"}}
          - watch:
              entrypoint: stage_jobs:watch
              params: {{address: "{{{{ steps.extract.address }}}}"}}
      - summarize:
          entrypoint: stage_jobs:summarize
          params: {{total: "{{{{ steps.aggregate.total }}}}", prewarmed: report}}
  report:
    depends_on: [transform]
    prewarm: true
    cluster: {{workers: 3}}
    steps:
      - publish:
          entrypoint: stage_jobs:publish
          params: {{total: "{{{{ steps.summarize.total }}}}"}}
          outlets: ["{outlet}"]
"""

DOWNSTREAM_PIPELINE = """
source: {{git: {repo}}}
entrypoint: stage_jobs:downstream
schedule: {{assets: ["{outlet}"]}}
cluster: {{workers: 1}}
"""

# Every task of the staged DAG and its upstream tasks. Besides the order the stages ask for,
# a step waits for bootstrap and its stage's cluster_up (it takes their XComs), and a teardown
# for its cluster_up (its setup).
UPSTREAM = {
    "bootstrap": set(),
    "ingest.cluster_up": {"bootstrap"},
    "ingest.extract": {"bootstrap", "ingest.cluster_up"},
    "ingest.clean": {"bootstrap", "ingest.cluster_up", "ingest.extract"},
    "ingest.teardown": {"ingest.cluster_up", "ingest.clean"},
    "transform.cluster_up": {"bootstrap", "ingest.clean"},
    "transform.aggregate": {"bootstrap", "transform.cluster_up", "ingest.clean"},
    "transform.watch": {"bootstrap", "transform.cluster_up", "ingest.clean"},
    "transform.summarize": {
        "bootstrap",
        "transform.cluster_up",
        "transform.aggregate",
        "transform.watch",
    },
    "transform.teardown": {"transform.cluster_up", "transform.summarize"},
    # prewarm: after the second-to-last group of the stage before, not its last step
    "report.cluster_up": {"bootstrap", "transform.aggregate", "transform.watch"},
    "report.publish": {"bootstrap", "report.cluster_up", "transform.summarize"},
    "report.teardown": {"report.cluster_up", "report.publish"},
}


# --- the module's Airflow and its two runs ----------------------------------------------------


@dataclass
class Run:
    """What a finished run of the staged pipeline left: task instances, XComs, its keys."""

    run_id: str
    state: str
    tis: dict[str, dict[str, Any]]  # by full task id ("ingest.extract")
    results: dict[str, Any]  # step name -> the JSON its entry point returned
    handles: dict[str, Any]  # stage -> the handle its cluster_up pushed
    explain: str  # task states and the logs of the tasks that did not succeed

    def key(self, stage: str) -> str:
        return f"{run_key(DAG_ID, self.run_id)}__{stage}"


@dataclass
class Runs:
    plain: Run
    recovered: Run
    note: dict[str, Any]  # what the recovery run's clean step wrote before the kill
    killed: int  # pid of the scheduler the test killed


def _task_instances(services: AirflowServices, dag_id: str, run_id: str) -> dict[str, dict]:
    found = services.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
    return {ti["task_id"]: ti for ti in found["task_instances"]}


def _xcom(
    services: AirflowServices, dag_id: str, run_id: str, task_id: str, key: str = "return_value"
) -> Any:
    path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
    entry = services.api("GET", f"{path}?deserialize=true", missing_ok=True)
    return None if entry is None else entry["value"]


def _log(services: AirflowServices, dag_id: str, run_id: str, task_id: str) -> str:
    """Every attempt's log of one task of the run, oldest first."""
    folder = services.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
    paths = sorted(folder.glob(f"task_id={task_id}/**/*.log"))
    return "".join(
        f"\n--- {p.relative_to(folder)} ---\n{p.read_text(errors='replace')}" for p in paths
    )


def _explain(services: AirflowServices, dag_id: str, run_id: str) -> str:
    tis = _task_instances(services, dag_id, run_id)
    logs = "".join(
        _log(services, dag_id, run_id, task_id)[-4000:]
        for task_id, ti in tis.items()
        if ti["state"] != "success"
    )
    states = {task_id: ti["state"] for task_id, ti in tis.items()}
    return f"{dag_id} {run_id}: {states}{logs}"


def _finished(services: AirflowServices, run_id: str) -> Run:
    state = services.wait_run(DAG_ID, run_id, timeout=420)
    return Run(
        run_id=run_id,
        state=state,
        tis=_task_instances(services, DAG_ID, run_id),
        results={
            step: _xcom(services, DAG_ID, run_id, f"{stage}.{step}")
            for stage, steps in STAGES.items()
            for step in steps
        },
        handles={stage: _xcom(services, DAG_ID, run_id, f"{stage}.cluster_up") for stage in STAGES},
        explain=_explain(services, DAG_ID, run_id),
    )


def _wait_note(services: AirflowServices, path: Path, run_id: str) -> dict[str, Any]:
    """The note the recovery run's clean step writes once it runs (its first try)."""
    deadline = time.monotonic() + 300
    while not path.exists():
        if time.monotonic() > deadline or services.run(DAG_ID, run_id)["state"] == "failed":
            pytest.fail(f"clean never started: {_explain(services, DAG_ID, run_id)}")
        time.sleep(0.1)
    return json.loads(path.read_text())


def _runs(services: AirflowServices, dag_id: str) -> list[dict[str, Any]]:
    return services.api("GET", f"/dags/{dag_id}/dagRuns")["dag_runs"]


def _consumed(services: AirflowServices) -> dict[str, str]:
    """Run id of the staged pipeline -> the downstream run its asset event started."""
    found = {}
    for down in _runs(services, DOWNSTREAM):
        path = f"/dags/{DOWNSTREAM}/dagRuns/{down['dag_run_id']}/upstreamAssetEvents"
        for event in services.api("GET", path)["asset_events"]:
            found[event["source_run_id"]] = down["dag_run_id"]
    return found


def _settle(services: AirflowServices, bound: float = 300) -> None:
    """Until every run of the module's DAGs has finished, the downstream runs the staged
    runs' asset events start included: a cluster started by a run that the services' stop
    cuts short would outlive them. (Pausing is no way out: a paused DAG's running run
    schedules no further task, its teardown included.)"""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        runs = _runs(services, DAG_ID) + _runs(services, DOWNSTREAM)
        if all(r["state"] in FINISHED for r in runs):
            path = f"/assets/events?source_dag_id={DAG_ID}"
            emitted = {e["source_run_id"] for e in services.api("GET", path)["asset_events"]}
            if emitted <= set(_consumed(services)):
                return
        time.sleep(1)


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages-airflow")
    repo = make_repo(root / "remotes" / "jobs", {"stage_jobs.py": JOBS})
    pipelines = root / "pipelines"
    write_pipeline(pipelines, "defaults", ROOT_DEFAULTS)
    write_pipeline(pipelines / "team", "defaults", TEAM_DEFAULTS)
    write_pipeline(
        pipelines / "team", DAG_ID, PIPELINE.format(repo=repo.path, rows=ROWS, outlet=OUTLET)
    )
    write_pipeline(pipelines, DOWNSTREAM, DOWNSTREAM_PIPELINE.format(repo=repo.path, outlet=OUTLET))
    with airflow_services(root / "airflow", pipelines, {"DAGFACTORY_PROFILE": "ci"}) as started:
        try:
            started.wait_parsed(DAG_ID, DOWNSTREAM)
            # Created paused; an asset event queues runs of an unpaused DAG only.
            started.api("PATCH", f"/dags/{DOWNSTREAM}", {"is_paused": False})
            yield started
        finally:
            _settle(started)


@pytest.fixture(scope="module")
def runs(services, tmp_path_factory) -> Runs:
    """A plain run and a recovery run of the staged pipeline, at once; the recovery run's
    first stage loses its Dask scheduler (SIGKILL) while its second step runs."""
    kill_dir = tmp_path_factory.mktemp("kill")
    stamp = time.time_ns()
    plain = services.trigger(DAG_ID, f"plain_{stamp}")
    recovered = services.trigger(DAG_ID, f"recovered_{stamp}", {"kill_dir": str(kill_dir)})
    note = _wait_note(services, kill_dir / "clean.json", recovered)
    handle = _xcom(services, DAG_ID, recovered, "ingest.cluster_up")
    key = f"{run_key(DAG_ID, recovered)}__ingest"
    scheduler = psutil.Process(handle["details"]["pids"][0])
    # the scheduler of this run's first stage, the one clean talks to, and nothing else
    assert scheduler.pid in {p.pid for p in marked_processes(key)}
    assert "distributed.cli.dask_scheduler" in scheduler.cmdline()
    assert note["address"] == handle["scheduler_address"]
    scheduler.send_signal(signal.SIGKILL)
    return Runs(
        plain=_finished(services, plain),
        recovered=_finished(services, recovered),
        note=note,
        killed=scheduler.pid,
    )


def _at(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


# --- 1. the DAG and the order its tasks ran in ------------------------------------------------


def test_a_task_group_per_stage_holds_its_cluster_up_steps_and_teardown(services):
    tasks = services.api("GET", f"/dags/{DAG_ID}/tasks")["tasks"]
    upstream: dict[str, set[str]] = {t["task_id"]: set() for t in tasks}
    for task in tasks:
        for downstream in task["downstream_task_ids"]:
            upstream[downstream].add(task["task_id"])
    assert upstream == UPSTREAM
    operators = {
        "bootstrap": "BootstrapOperator",
        "cluster_up": "ClusterUpOperator",
        "teardown": "TeardownOperator",
    }
    for task in tasks:
        name = task["task_id"].rsplit(".", 1)[-1]
        assert task["operator_name"] == operators.get(name, "RunOperator"), task["task_id"]
        # a stage's teardown runs whatever its steps did, once its setup (cluster_up) succeeded
        rule = "all_done_setup_success" if name == "teardown" else "all_success"
        assert task["trigger_rule"] == rule, task["task_id"]


def test_every_task_starts_after_its_upstream_tasks_ended(runs):
    for run in (runs.plain, runs.recovered):
        assert run.state == "success", run.explain
        tis = run.tis
        for task_id, before in UPSTREAM.items():
            for earlier in before:
                assert _at(tis[earlier]["end_date"]) <= _at(tis[task_id]["start_date"]), (
                    f"{run.run_id}: {task_id} started before {earlier} ended"
                )


def test_the_steps_of_a_parallel_group_run_at_once(runs):
    tis = runs.plain.tis
    # each waited on the shared cluster for the other to be running
    assert runs.plain.results["aggregate"]["met"] is True
    assert runs.plain.results["watch"]["met"] is True
    aggregate, watch = tis["transform.aggregate"], tis["transform.watch"]
    assert _at(aggregate["start_date"]) < _at(watch["end_date"])
    assert _at(watch["start_date"]) < _at(aggregate["end_date"])


def test_a_prewarmed_stage_starts_its_cluster_during_the_last_step_before_it(runs):
    tis = runs.plain.tis
    # summarize, the last step of transform, waited until report's cluster was up
    assert runs.plain.results["summarize"]["saw_prewarmed"] is True
    assert _at(tis["report.cluster_up"]["start_date"]) < _at(tis["transform.summarize"]["end_date"])
    # report's own step still waits for transform's last one
    assert _at(tis["transform.summarize"]["end_date"]) <= _at(tis["report.publish"]["start_date"])
    # a stage without prewarm starts its cluster after the stage before it is done
    assert _at(tis["ingest.clean"]["end_date"]) <= _at(tis["transform.cluster_up"]["start_date"])


# --- 2. one cluster per stage, sized as the merged defaults and profile say -------------------


def test_each_stage_has_one_cluster_that_all_its_steps_use(runs):
    run = runs.plain
    results, handles = run.results, run.handles
    ids = {}
    for stage, steps in STAGES.items():
        handle = handles[stage]
        seen = {(results[s]["scheduler_id"], results[s]["address"]) for s in steps}
        assert seen == {(handle["details"]["scheduler_id"], handle["scheduler_address"])}, stage
        ids[stage] = handle["details"]["scheduler_id"]
    assert len(set(ids.values())) == len(STAGES), ids


def test_each_stage_cluster_has_the_size_the_defaults_profile_and_stage_give(runs, services):
    results = runs.plain.results
    # ingest: the pipeline's cluster: workers 1 from the team's profile, memory from the
    # nearest defaults file (the team's 800MiB, not the root's 600MiB nor its profile's 700MiB)
    assert (results["extract"]["workers"], results["extract"]["memory"]) == (1, [800 * MIB])
    # transform: its own cluster over that
    assert (results["aggregate"]["workers"], results["aggregate"]["memory"]) == (
        2,
        [900 * MIB] * 2,
    )
    # report: 3 workers of its own, the rest inherited
    assert (results["publish"]["workers"], results["publish"]["memory"]) == (3, [800 * MIB] * 3)
    assert services.api("GET", f"/dags/{DAG_ID}")["owners"] == ["team-ci"]
    assert {t["retries"] for t in services.api("GET", f"/dags/{DAG_ID}/tasks")["tasks"]} == {1}


# --- 3. results between steps ----------------------------------------------------------------


def test_results_pass_between_steps_and_stages_keeping_their_json_types(runs):
    results = runs.plain.results
    extract, clean = results["extract"], results["clean"]
    assert (extract["rows"], extract["total"]) == (ROWS, sum(i * i for i in range(ROWS)))
    # a value that is exactly one {{ ... }} keeps its type; text around it makes text
    assert clean["types"] == {
        "rows": "int",
        "parts": "list",
        "text": "str",
        "label": "str",
        "day": "str",
    }
    assert (clean["parts"], clean["text"]) == ([1, 2, 3], f"rows={ROWS}")
    assert datetime.strptime(clean["day"], "%Y-%m-%d")
    assert (clean["rows"], clean["total"]) == (len(KEPT), sum(KEPT))
    # across stages: transform gets ingest's results, report gets transform's
    aggregate = results["aggregate"]
    assert aggregate["rows_type"] == "int"
    assert aggregate["total"] == sum(i * i for i in range(len(KEPT)))
    assert results["summarize"]["total"] == aggregate["total"] == results["publish"]["total"]


def test_a_dag_param_renders_in_a_steps_params(runs):
    clean = runs.plain.results["clean"]
    # the DAG param label is "{{ ds }}": a step that passes it on gets the run's day
    assert clean["label"] == clean["day"], clean


# --- 4. a stage's cluster stops as soon as the stage is done ----------------------------------


def test_a_stage_is_torn_down_while_the_next_stage_runs(runs, services):
    run = runs.plain
    tis = run.tis
    ingest = run.handles["ingest"]
    # watch (stage transform) saw ingest's scheduler stop while it ran ...
    assert run.results["watch"]["saw_stop"] is True
    assert run.results["watch"]["met"] is True
    # ... which ingest's teardown did: it began before watch ended and shut that scheduler
    assert _at(tis["ingest.teardown"]["start_date"]) < _at(tis["transform.watch"]["end_date"])
    log = _log(services, DAG_ID, run.run_id, "ingest.teardown")
    assert f"asked the Dask scheduler at {ingest['scheduler_address']} to shut down" in log, log


# --- 5. assets --------------------------------------------------------------------------------


def test_the_last_steps_outlet_starts_the_downstream_pipeline(runs, services):
    run_id = runs.plain.run_id
    events = services.api("GET", f"/assets/events?source_dag_id={DAG_ID}")["asset_events"]
    assert {(e["uri"], e["source_run_id"], e["source_task_id"]) for e in events} == {
        (OUTLET, run_id, "report.publish"),
        (OUTLET, runs.recovered.run_id, "report.publish"),
    }
    deadline = time.monotonic() + 240
    while run_id not in (consumed := _consumed(services)) and time.monotonic() < deadline:
        time.sleep(1)
    assert run_id in consumed, services.tail()
    down = consumed[run_id]
    assert services.run(DOWNSTREAM, down)["run_type"] == "asset_triggered"
    state = services.wait_run(DOWNSTREAM, down)
    assert state == "success", _explain(services, DOWNSTREAM, down)
    result = services.xcom(DOWNSTREAM, down, "run")
    # outside team/: the root defaults and the root's profile (700MiB), not the team's
    assert (result["workers"], result["memory"]) == (1, [700 * MIB])
    assert services.api("GET", f"/dags/{DOWNSTREAM}")["owners"] == ["platform"]


# --- 6. a step's retry heals a lost scheduler ------------------------------------------------


def test_a_killed_scheduler_is_replaced_by_the_retry_of_the_step_that_lost_it(runs, services):
    run = runs.recovered
    assert run.state == "success", run.explain
    tis, results = run.tis, run.results
    assert tis["ingest.extract"]["try_number"] == 1  # the step before is not run again
    assert tis["ingest.clean"]["try_number"] == 2
    first = run.handles["ingest"]
    replacement = _xcom(services, DAG_ID, run.run_id, "ingest.clean", key="cluster")
    assert runs.killed == first["details"]["pids"][0]
    assert results["extract"]["address"] == first["scheduler_address"] == runs.note["address"]
    # the retry ran on a new cluster under the same key, and said so in XCom
    assert replacement["key"] == first["key"]
    assert replacement["scheduler_address"] != first["scheduler_address"]
    assert results["clean"]["scheduler_id"] == replacement["details"]["scheduler_id"]
    assert results["clean"]["scheduler_id"] != first["details"]["scheduler_id"]
    assert results["clean"]["rows"] == len(KEPT)
    assert results["clean"]["workers"] == 1
    # ingest's teardown stopped both: nothing of the key is left, the replacement is gone
    log = _log(services, DAG_ID, run.run_id, "ingest.teardown")
    assert f"cluster {run.key('ingest')} stopped" in log, log
    assert marked_processes(run.key("ingest")) == []
    assert not scheduler_answers(replacement["scheduler_address"])
    # the stages after it ran as usual
    assert results["publish"]["total"] == runs.plain.results["publish"]["total"]


# --- 7. nothing left --------------------------------------------------------------------------


def test_no_process_of_any_stage_of_any_run_is_left(runs, services):
    _settle(services)
    for run in (runs.plain, runs.recovered):
        for stage in STAGES:
            assert marked_processes(run.key(stage)) == [], (run.run_id, stage)
            assert not scheduler_answers(run.handles[stage]["scheduler_address"]), (
                run.run_id,
                stage,
            )
    # the downstream pipeline's runs included
    assert [_described(p) for p in cluster_processes(DAG_ID)] == []


def _described(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"{proc.pid} {' '.join(proc.cmdline())[:160]}"
    return f"{proc.pid} (gone)"
