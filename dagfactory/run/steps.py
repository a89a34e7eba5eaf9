"""The four steps of a pipeline run, with no Airflow in sight.

The Airflow tasks (`operators.py`) and `dagfactory run` both call these, so a pipeline behaves
the same on a laptop and in production. Between steps only plain JSON travels (a commit sha, the
versions pinned for the cluster, a cluster handle), because under Celery or Kubernetes executors
each step may run on another host.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dagfactory.backends import ClusterContext, ClusterHandle, get_backend
from dagfactory.run.runner import check_entrypoint, run_entrypoint
from dagfactory.run.workspace import Credentials, Workspace, checkout_dir, prepare, resolve_commit
from dagfactory.spec.pipeline import PipelineSpec

log = logging.getLogger(__name__)
Output = Callable[[str], None]


def run_key(dag_id: str, run_id: str) -> str:
    """The key of one run of a pipeline: it names the run's cluster and everything the cluster's
    backend makes, so that any later task, or an operator with `dagfactory teardown`, finds it."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dag_id}__{run_id}")


def stage_key(run_key: str, stage: str | None) -> str:
    """The key of a stage's cluster in a run (a pipeline with no stages: the run's key)."""
    return run_key if stage is None else f"{run_key}__{stage}"


def bootstrap(
    spec: PipelineSpec, credentials: Credentials | None = None, output: Output = log.info
) -> dict[str, Any]:
    """Pin the run to one commit, make its checkout and virtualenv ready, and check that the
    entry point imports there, before any cluster is started for it."""
    commit = resolve_commit(spec, credentials)
    output(f"{spec.source.ref or 'HEAD'} is commit {commit}")
    pins = _pins(spec)
    if pins:
        output(f"pinned to the cluster's versions: {pins}")
    workspace = prepare(spec, commit, credentials, output, pins=pins)
    output(f"code in {workspace.code_dir}, python {workspace.python}")
    for entrypoint in spec.entrypoints:
        check_entrypoint(workspace, entrypoint)
        output(f"{entrypoint} imports")
    return {"commit": commit, "pins": pins}


def bootstrap_worktree(spec: PipelineSpec, output: Output = log.info) -> dict[str, Any]:
    """Like bootstrap, for the working tree of a local repository as it is (`run --worktree`)."""
    from dagfactory.run.workspace import prepare_worktree

    pins = _pins(spec)
    workspace = prepare_worktree(spec, output, pins=pins)
    output(f"running the working tree {workspace.code_dir} as it is ({workspace.commit})")
    for entrypoint in spec.entrypoints:
        check_entrypoint(workspace, entrypoint)
    return {"commit": workspace.commit, "pins": pins, "worktree": True}


def local_changes(spec: PipelineSpec) -> list[str]:
    """Uncommitted changes of a local repository that a run of its commit would not see."""
    from dagfactory.run.workspace import local_changes

    return local_changes(spec)


def _pins(spec: PipelineSpec) -> dict[str, str]:
    """Versions the virtualenv must have to talk to the clusters (an existing one's, say)."""
    found: dict[str, str] = {}
    for stage, cluster in spec.cluster_specs().items():
        pins = getattr(get_backend(cluster.backend), "pins", None)
        for name, version in (pins(cluster) if pins else {}).items():
            if found.setdefault(name, version) != version:
                from dagfactory.errors import ClusterError

                raise ClusterError(
                    f"stage {stage!r} needs {name}=={version} and another stage "
                    f"{name}=={found[name]}: one virtualenv runs every step; align the clusters"
                )
    return found


def _workspace(
    spec: PipelineSpec, boot: dict[str, Any], credentials: Credentials | None, output: Output
) -> Workspace:
    if boot.get("worktree"):
        from dagfactory.run.workspace import prepare_worktree

        return prepare_worktree(spec, output, pins=boot.get("pins") or {})
    # Cheap when bootstrap ran on this host; a full checkout when it ran on another one.
    if not checkout_dir(boot["commit"]).is_dir():
        output(
            f"commit {boot['commit'][:12]} is not on this host ({socket.gethostname()}) yet: "
            "bootstrapping here at the same commit"
        )
    return prepare(spec, boot["commit"], credentials, output, pins=boot.get("pins") or {})


def cluster_up(
    spec: PipelineSpec,
    boot: dict[str, Any],
    key: str,
    credentials: Credentials | None = None,
    output: Output = log.info,
) -> dict[str, Any]:
    """Start the run's cluster; returns its handle as JSON."""
    workspace = _workspace(spec, boot, credentials, output)
    context = ClusterContext(key, str(workspace.python), str(workspace.code_dir))
    backend = get_backend(spec.cluster.backend)
    handle = backend.up(spec.cluster, context)
    output(f"Dask scheduler at {handle.scheduler_address}")
    if adaptive := handle.details.get("adaptive"):
        output(f"adaptive: {adaptive['minimum']} to {adaptive['maximum']} workers")
    describe = getattr(backend, "describe", None)
    if describe:  # where the dashboard and the logs are, in the backend's words
        for line in describe(handle):
            output(line)
    elif handle.dashboard_link:
        output(f"Dask dashboard: {handle.dashboard_link}")
    return handle.to_json()


def ensure_cluster(
    spec: PipelineSpec,
    boot: dict[str, Any],
    key: str,
    handle: dict[str, Any] | None,
    credentials: Credentials | None = None,
    output: Output = log.info,
) -> dict[str, Any]:
    """The run's cluster: `handle`'s when it still answers, else a new one under the same key.

    This is what makes a retry heal: a scheduler lost to a killed host or a reclaimed spot
    instance is replaced by the retry itself, with no one clearing tasks by hand.
    """
    backend = get_backend(spec.cluster.backend)
    if handle is not None and backend.alive(ClusterHandle.from_json(handle)):
        return handle
    with cluster_lock(key):
        # Steps of a stage that run at the same time may all find the cluster lost: the first
        # one starts the new cluster, the others find it here.
        find = getattr(backend, "find", None)
        found = find(key) if find else None
        if found is not None and found.to_json() != handle:
            output(f"using the cluster {found.scheduler_address} another step started under {key}")
            return found.to_json()
        return _replace_cluster(spec, boot, key, handle, credentials, output)


@contextlib.contextmanager
def cluster_lock(key: str) -> Iterator[None]:
    """One task at a time starts the cluster of a key, among the tasks of this host."""
    import fcntl

    from dagfactory.run.workspace import dagfactory_home

    folder = dagfactory_home() / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _replace_cluster(
    spec: PipelineSpec,
    boot: dict[str, Any],
    key: str,
    handle: dict[str, Any] | None,
    credentials: Credentials | None,
    output: Output,
) -> dict[str, Any]:
    lost = ""
    if handle:
        host = handle.get("details", {}).get("host")
        where = f", started on {host}" if host and host != socket.gethostname() else ""
        lost = f" ({handle['scheduler_address']}{where})"
    if handle is None:
        output(f"starting the cluster of this run under {key}")
    else:
        output(f"the cluster of this run{lost} does not answer; starting a new one under {key}")
    return cluster_up(spec, boot, key, credentials, output)


def run(
    spec: PipelineSpec,
    boot: dict[str, Any],
    handle: dict[str, Any],
    params: dict[str, Any],
    key: str,
    credentials: Credentials | None = None,
    output: Output = print,
    entrypoint: str = "",
    report: Path | None = None,
    progress_every: float | None = None,
) -> Any:
    """Call the entry point (a step's, else the pipeline's) with a client of the cluster;
    returns its JSON result. `report`: where Dask's performance report of the call goes
    (`reports.report_path`); `progress_every`: seconds between Dask progress lines in
    `output` (None: the runner's default)."""
    entrypoint = entrypoint or spec.entrypoint
    workspace = _workspace(spec, boot, credentials, output)
    cluster = ClusterHandle.from_json(handle)
    output(f"calling {entrypoint}(client, **{params!r}) at commit {boot['commit'][:12]}")
    # A third of the cluster's idle timeout: the entry point keeps its own cluster busy.
    keepalive = cluster.details.get("idle_timeout", 0) / 3
    backend = get_backend(cluster.backend)
    for line in getattr(backend, "describe", lambda handle: [])(cluster):
        output(line)  # the dashboard and the cluster's logs, in the run task's log too
    client_env = getattr(backend, "client_env", None)
    return run_entrypoint(
        workspace,
        entrypoint,
        params,
        cluster.scheduler_address,
        output,
        key,
        keepalive,
        client_env(cluster) if client_env else None,
        report,
        progress_every,
    )


def teardown(spec: PipelineSpec, key: str, *handles: dict[str, Any] | None) -> None:
    """Stop the cluster(s) of a key. Idempotent; works from the key alone when no handle is
    left. `spec` is as the stage sees it (`PipelineSpec.for_stage`)."""
    backend = get_backend(spec.cluster.backend)
    known = [ClusterHandle.from_json(h) for h in dict.fromkeys(map(_frozen, handles)) if h]
    # Newest first: a live replacement is shut down through Dask before the stop by key that
    # comes with the lost cluster's handle finds its processes.
    for handle in known[::-1] or [ClusterHandle(spec.cluster.backend, key, "")]:
        backend.down(handle, spec.cluster)


def teardown_run(spec: PipelineSpec, run_key: str) -> None:
    """Stop every cluster of a run (each stage's), from the run's key alone."""
    failures = []
    for stage in spec.cluster_specs():
        try:
            teardown(spec.for_stage(stage), stage_key(run_key, stage))
        except Exception as exc:  # one stage's failure must not keep the others running
            log.exception("could not stop the cluster of stage %s", stage)
            failures.append(exc)
    if failures:
        raise failures[0]


def _frozen(handle: dict[str, Any] | None) -> Any:
    """A handle as a hashable value, so the same cluster is stopped once (JSON round trip)."""
    import json

    return json.dumps(handle, sort_keys=True) if handle else None
