"""The Airflow tasks of a pipeline: thin wrappers that call `steps.py` with the task's context.

Each operator holds the PipelineSpec as a plain attribute (not a template field): the spec is
rebuilt from the YAML when the task runs, so it is never serialized into the metadata DB.
Values between tasks travel as XComArgs in template fields, which Airflow resolves at run time.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import BaseOperator, BaseOperatorLink

from dagfactory.spec import PipelineSpec
from dagfactory.workspace import Credentials

log = logging.getLogger(__name__)


def run_key(context: Any) -> str:
    """Unique per DAG run; names the run's cluster so any later task can find it."""
    from dagfactory.steps import run_key

    return run_key(context["dag"].dag_id, context["run_id"])


def _with_run_dates(context: Any) -> Any:
    """The context, with ds/ts taken from run_after when the run has no logical date.

    Airflow 3 triggers runs without a logical date by default, which leaves "{{ ds }}"
    undefined; a pipeline author means "the day of this run" by it.
    """
    if context.get("logical_date") is not None:
        return context
    when = context["dag_run"].run_after
    return {
        **context,
        "logical_date": when,
        "ds": when.strftime("%Y-%m-%d"),
        "ds_nodash": when.strftime("%Y%m%d"),
        "ts": when.isoformat(),
        "ts_nodash": when.strftime("%Y%m%dT%H%M%S"),
    }


def _credentials(spec: PipelineSpec) -> Credentials | None:
    if not spec.source.connection:
        return None
    from airflow.sdk import Connection

    conn = Connection.get(spec.source.connection)
    # login/password for https; an SSH connection's key and host key live in its extra
    return Credentials.from_connection(conn.login, conn.password, conn.port, conn.extra_dejson)


class DaskDashboardLink(BaseOperatorLink):
    """'Dask dashboard' button on the cluster_up and run tasks of a run.

    Airflow 3 stores the link in XCom when the task finishes (the web server never imports
    this class), so get_link runs in the task process, where the handle is at hand.
    """

    name = "Dask dashboard"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        handle = getattr(operator, "cluster_handle", None) or {}
        return handle.get("dashboard_link", "") if isinstance(handle, dict) else ""


class _PipelineOperator(BaseOperator):
    """What the four tasks share. The subclasses define no __init__ of their own: Airflow
    wraps every __init__ of an operator class, and each level deep-copies the DAG's params
    again, which DAG parsing pays for every task of every pipeline."""

    ui_color = "#e8f0fe"

    def __init__(
        self, *, spec: PipelineSpec, workspace: Any = None, cluster: Any = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.workspace = workspace  # bootstrap's XCom: {"commit": sha, "pins": {...}}
        self.cluster = cluster  # cluster_up's XCom: the cluster handle


class BootstrapOperator(_PipelineOperator):
    """Check the run's params; pin the git ref to one commit; prepare checkout and virtualenv."""

    def execute(self, context: Any) -> dict[str, Any]:
        from dagfactory import steps
        from dagfactory.params import check_values

        # Airflow checks values against each param's schema when a run is triggered, but keeps
        # quiet about conf keys that are no param; refuse those too, before anything starts,
        # with the words `dagfactory run` uses.
        conf = context["dag_run"].conf or {}
        check_values(self.spec.param_specs, conf, self.spec.origin)
        return steps.bootstrap(self.spec, _credentials(self.spec), self.log.info)


class ClusterUpOperator(_PipelineOperator):
    """Setup task: start the run's Dask cluster and push its handle."""

    template_fields = ("workspace",)
    ui_color = "#d5f5e3"
    operator_extra_links = (DaskDashboardLink(),)
    cluster_handle: dict[str, Any] | None = None

    def execute(self, context: Any) -> dict[str, Any] | None:
        from dagfactory import steps

        if self.spec.cluster.pool:
            self.log.info(
                "pool %s: the cluster starts in the run task, which holds the pool's slot",
                self.spec.cluster.pool,
            )
            return None
        self.cluster_handle = steps.cluster_up(
            self.spec, self.workspace, run_key(context), _credentials(self.spec), self.log.info
        )
        return self.cluster_handle


REPLACEMENT_KEY = "cluster"
"""XCom key under which the run task records a cluster it started to replace a lost one."""


class RunOperator(_PipelineOperator):
    """Call the entry point with a client of the run's cluster; its result becomes the XCom.

    A retry first ensures the cluster: a lost one is replaced under the same run key, and the
    replacement's handle is pushed so that teardown stops it too.
    """

    template_fields = ("workspace", "cluster")
    ui_color = "#fdebd0"
    operator_extra_links = (DaskDashboardLink(),)
    cluster_handle: dict[str, Any] | None = None

    def execute(self, context: Any) -> Any:
        from dagfactory import steps

        key = run_key(context)
        credentials = _credentials(self.spec)
        self.cluster_handle = steps.ensure_cluster(
            self.spec, self.workspace, key, self.cluster, credentials, self.log.info
        )
        if self.cluster_handle is not self.cluster:
            context["ti"].xcom_push(key=REPLACEMENT_KEY, value=self.cluster_handle)
        # context["params"] holds trigger-time overrides; strings are Jinja-rendered here so
        # that "{{ ds }}" in a YAML param becomes the run's date.
        declared = {name: context["params"][name] for name in self.spec.params}
        params = self.render_template(declared, _with_run_dates(context))
        return steps.run(
            self.spec, self.workspace, self.cluster_handle, params, key, credentials, self.log.info
        )


class TeardownOperator(_PipelineOperator):
    """Teardown task: scale the run's cluster to zero, whatever happened before."""

    template_fields = ("cluster",)
    ui_color = "#fadbd8"

    def execute(self, context: Any) -> None:
        from dagfactory import steps

        ti = context["ti"]
        run_task = f"{self.task_id.rsplit('.', 1)[0]}.run" if "." in self.task_id else "run"
        replacement = ti.xcom_pull(task_ids=run_task, key=REPLACEMENT_KEY)
        steps.teardown(self.spec, run_key(context), self.cluster, replacement)
        self.log.info("cluster %s stopped", run_key(context))


def release_cluster(spec: PipelineSpec, context: Any) -> None:
    """The DAG's failure callback: stop the run's cluster by its key, from wherever it runs.

    Airflow marks an unfinished teardown task SKIPPED when a run times out (dagrun_timeout) and
    fails a run whose task lost its supervisor only after the heartbeat timeout; this gets the
    cluster stopped then, not after its idle timeout. It runs in the DAG processor.
    """
    from dagfactory import steps

    key = run_key(context)
    try:
        steps.teardown(spec, key)
    except Exception:  # a callback that raises is only logged; say what it could not do
        log.exception("could not stop the cluster of %s", key)
        raise
    log.info("cluster %s stopped by the DAG's failure callback", key)


class InvalidSpecOperator(BaseOperator):
    """The one task of a broken pipeline file's DAG: fails with the file's errors."""

    ui_color = "#f5b7b1"

    def __init__(self, *, message: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.message = message

    def execute(self, context: Any) -> None:
        from dagfactory.errors import SpecError

        raise SpecError.from_text(self.message)
