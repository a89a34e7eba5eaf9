"""The Airflow tasks of a pipeline: thin wrappers that call `steps.py` with the task's context.

Each operator holds the PipelineSpec as a plain attribute (not a template field): the spec is
rebuilt from the YAML when the task runs, so it is never serialized into the metadata DB.
Values between tasks travel as XComArgs in template fields, which Airflow resolves at run time.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import BaseOperator, BaseOperatorLink

from dagfactory.run.workspace import Credentials
from dagfactory.spec.pipeline import PipelineSpec, StepSpec

log = logging.getLogger(__name__)


def run_key(context: Any) -> str:
    """Unique per DAG run; names the run's clusters so any later task can find them."""
    from dagfactory.run.steps import run_key

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


class CommitLink(BaseOperatorLink):
    """'Commit' button on bootstrap: the commit the run pinned, on its forge.

    Only for forges whose commit pages have a known address (github.com, gitlab.com,
    bitbucket.org); elsewhere the commit is in bootstrap's log and XCom, and no button shows.
    """

    name = "Commit"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        from dagfactory.dag.docs import commit_url

        commit = getattr(operator, "commit", None)
        spec = getattr(operator, "spec", None)
        return commit_url(spec.source.git, commit) if commit and spec else ""


class DaskReportLink(BaseOperatorLink):
    """'Dask report' button on every run task: the try's Dask performance report, served by
    the dagfactory plugin of the api-server (`plugin.py`) from a file, so it keeps working
    after the cluster is gone."""

    name = "Dask report"

    def get_link(self, operator: BaseOperator, *, ti_key: Any) -> str:
        from dagfactory.dag.plugin import report_url

        return report_url(ti_key.dag_id, ti_key.run_id, ti_key.task_id, ti_key.try_number)


class _PipelineOperator(BaseOperator):
    """What the four tasks share. The subclasses define no __init__ of their own: Airflow
    wraps every __init__ of an operator class, and each level deep-copies the DAG's params
    again, which DAG parsing pays for every task of every pipeline."""

    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        spec: PipelineSpec,
        workspace: Any = None,
        cluster: Any = None,
        stage: str | None = None,
        step: StepSpec | None = None,
        earlier: tuple[str, ...] = (),
        results: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.workspace = workspace  # bootstrap's XCom: {"commit": sha, "pins": {...}}
        self.cluster = cluster  # cluster_up's XCom: the cluster handle
        self.stage = stage  # None: the one cluster of a pipeline with no stages
        self.step = step  # a stage's step (None: the pipeline's one entry point)
        # Tasks of the stage that may have replaced its cluster before this one (steps) or
        # at all (teardown), newest last.
        self.earlier = earlier
        self.results = results or {}  # step name -> task id, for {{ steps.<name> }}

    def cluster_key(self, context: Any) -> str:
        from dagfactory.run.steps import stage_key

        return stage_key(run_key(context), self.stage)

    def stage_spec(self) -> PipelineSpec:
        return self.spec.for_stage(self.stage)

    def latest_cluster(self, context: Any) -> Any:
        """The stage's cluster as the newest task to start one left it."""
        for task_id in reversed(self.earlier):
            handle = context["ti"].xcom_pull(task_ids=task_id, key=REPLACEMENT_KEY)
            if handle:
                return handle
        return self.cluster


class BootstrapOperator(_PipelineOperator):
    """Check the run's params; pin the git ref to one commit; prepare checkout and virtualenv."""

    operator_extra_links = (CommitLink(),)
    commit: str | None = None

    def execute(self, context: Any) -> dict[str, Any]:
        from dagfactory.run import steps
        from dagfactory.spec.params import check_values

        # Airflow checks values against each param's schema when a run is triggered, but keeps
        # quiet about conf keys that are no param; refuse those too, before anything starts,
        # with the words `dagfactory run` uses.
        conf = context["dag_run"].conf or {}
        check_values(self.spec.param_specs, conf, self.spec.origin)
        boot = steps.bootstrap(self.spec, _credentials(self.spec), self.log.info)
        self.commit = boot["commit"]
        return boot


class ClusterUpOperator(_PipelineOperator):
    """Setup task: start the run's Dask cluster and push its handle."""

    template_fields = ("workspace",)
    ui_color = "#d5f5e3"
    operator_extra_links = (DaskDashboardLink(),)
    cluster_handle: dict[str, Any] | None = None

    def execute(self, context: Any) -> dict[str, Any] | None:
        from dagfactory.run import steps

        spec = self.stage_spec()
        if spec.cluster.pool:
            self.log.info(
                "pool %s: the cluster starts in the first task that uses it, which holds the "
                "pool's slot",
                spec.cluster.pool,
            )
            return None
        self.cluster_handle = steps.cluster_up(
            spec, self.workspace, self.cluster_key(context), _credentials(spec), self.log.info
        )
        return self.cluster_handle


REPLACEMENT_KEY = "cluster"
"""XCom key under which the run task records a cluster it started to replace a lost one."""


class RunOperator(_PipelineOperator):
    """Call an entry point with a client of its cluster; its result becomes the XCom.

    The pipeline's one entry point (task `run`) or a step of a stage (a task named after the
    step). It first ensures the cluster: a lost one is replaced under the same key, and the
    replacement's handle is pushed so that the stage's later steps use it and teardown stops it.
    """

    template_fields = ("workspace", "cluster")
    ui_color = "#fdebd0"
    operator_extra_links = (DaskDashboardLink(), DaskReportLink())
    cluster_handle: dict[str, Any] | None = None

    def execute(self, context: Any) -> Any:
        from dagfactory.run import steps
        from dagfactory.run.reports import report_path

        spec = self.stage_spec()
        key = self.cluster_key(context)
        credentials = _credentials(spec)
        known = self.latest_cluster(context)
        self.cluster_handle = steps.ensure_cluster(
            spec, self.workspace, key, known, credentials, self.log.info
        )
        if self.cluster_handle is not known:
            context["ti"].xcom_push(key=REPLACEMENT_KEY, value=self.cluster_handle)
        params = self.params_of_run(context)
        ti = context["ti"]
        return steps.run(
            spec,
            self.workspace,
            self.cluster_handle,
            params,
            key,
            credentials,
            self.log.info,
            entrypoint=self.step.entrypoint if self.step else "",
            report=report_path(ti.dag_id, ti.run_id, ti.task_id, ti.try_number),
        )

    def params_of_run(self, context: Any) -> dict[str, Any]:
        """The keyword arguments of the entry point, rendered for this run.

        context["params"] holds trigger-time overrides of the DAG's params: the pipeline's one
        entry point gets them all; a step gets its own params, which may use them
        ({{ params.day }}) and the results of earlier steps ({{ steps.clean.rows }}).
        """
        context = _with_run_dates(context)
        declared = {name: context["params"][name] for name in self.spec.params}
        rendered = self.render_template(declared, context)
        if self.step is None:
            return rendered
        from dagfactory.spec.params import render_step_params

        results = {
            name: context["ti"].xcom_pull(task_ids=task_id)
            for name, task_id in self.results.items()
        }
        # The DAG's params as the one-entry-point form passes them: rendered ({{ ds }}) first.
        step_context = {**context, "params": rendered, "steps": results}
        return render_step_params(self.step.params, step_context, self.get_template_env())


class TeardownOperator(_PipelineOperator):
    """Teardown task: scale the cluster (the run's, or its stage's) to zero, whatever happened."""

    template_fields = ("cluster",)
    ui_color = "#fadbd8"

    def execute(self, context: Any) -> None:
        from dagfactory.run import steps

        ti = context["ti"]
        replacements = [ti.xcom_pull(task_ids=t, key=REPLACEMENT_KEY) for t in self.earlier]
        key = self.cluster_key(context)
        steps.teardown(self.stage_spec(), key, self.cluster, *replacements)
        self.log.info("cluster %s stopped", key)


def release_cluster(spec: PipelineSpec, context: Any) -> None:
    """The DAG's failure callback: stop the run's cluster by its key, from wherever it runs.

    Airflow marks an unfinished teardown task SKIPPED when a run times out (dagrun_timeout) and
    fails a run whose task lost its supervisor only after the heartbeat timeout; this gets the
    cluster stopped then, not after its idle timeout. It runs in the DAG processor.
    """
    from dagfactory.run import steps

    key = run_key(context)
    try:
        steps.teardown_run(spec, key)
    except Exception:  # a callback that raises is only logged; say what it could not do
        log.exception("could not stop the clusters of %s", key)
        raise
    log.info("clusters of %s stopped by the DAG's failure callback", key)


class InvalidSpecOperator(BaseOperator):
    """The one task of a broken pipeline file's DAG: fails with the file's errors."""

    ui_color = "#f5b7b1"

    def __init__(self, *, message: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.message = message

    def execute(self, context: Any) -> None:
        from dagfactory.errors import SpecError

        raise SpecError.from_text(self.message)
