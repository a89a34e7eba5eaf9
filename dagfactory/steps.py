"""The four steps of a pipeline run, with no Airflow in sight.

The Airflow tasks (`operators.py`) and `dagfactory run` both call these, so a pipeline behaves
the same on a laptop and in production. Between steps only plain JSON travels (a commit sha, a
cluster handle), because under Celery or Kubernetes executors each step may run on another host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dagfactory.backends import ClusterContext, ClusterHandle, get_backend
from dagfactory.runner import run_entrypoint
from dagfactory.spec import PipelineSpec
from dagfactory.workspace import Credentials, prepare, resolve_commit

log = logging.getLogger(__name__)
Output = Callable[[str], None]


def bootstrap(
    spec: PipelineSpec, credentials: Credentials | None = None, output: Output = log.info
) -> dict[str, Any]:
    """Pin the run to one commit and make its checkout and virtualenv ready."""
    commit = resolve_commit(spec, credentials)
    output(f"{spec.source.ref or 'HEAD'} is commit {commit}")
    workspace = prepare(spec, commit, credentials, output)
    output(f"code in {workspace.code_dir}, python {workspace.python}")
    return {"commit": commit}


def cluster_up(
    spec: PipelineSpec,
    commit: str,
    key: str,
    credentials: Credentials | None = None,
    output: Output = log.info,
) -> dict[str, Any]:
    """Start the run's cluster; returns its handle as JSON."""
    # Cheap when bootstrap ran on this host; a full checkout when it ran on another one.
    workspace = prepare(spec, commit, credentials, output)
    context = ClusterContext(key, str(workspace.python), str(workspace.code_dir))
    handle = get_backend(spec.cluster.backend).up(spec.cluster, context)
    output(f"Dask scheduler at {handle.scheduler_address}")
    if handle.dashboard_link:
        output(f"Dask dashboard: {handle.dashboard_link}")
    return handle.to_json()


def run(
    spec: PipelineSpec,
    commit: str,
    handle: dict[str, Any],
    params: dict[str, Any],
    credentials: Credentials | None = None,
    output: Output = print,
) -> Any:
    """Call the entry point with a client of the run's cluster; returns its JSON result."""
    workspace = prepare(spec, commit, credentials, output)
    address = ClusterHandle.from_json(handle).scheduler_address
    output(f"calling {spec.entrypoint}(client, **{params!r}) at commit {commit[:12]}")
    return run_entrypoint(workspace, spec.entrypoint, params, address, output)


def teardown(spec: PipelineSpec, handle: dict[str, Any] | None, key: str) -> None:
    """Stop the run's cluster. Idempotent; works from the key alone when the handle was lost."""
    backend = get_backend(spec.cluster.backend)
    if handle is None:
        handle = ClusterHandle(spec.cluster.backend, key, "").to_json()
    backend.down(ClusterHandle.from_json(handle))
