"""The Airflow tasks of a pipeline: thin wrappers that call `steps.py` with the task's context.

Each operator holds the PipelineSpec as a plain attribute (not a template field): the spec is
rebuilt from the YAML when the task runs, so it is never serialized into the metadata DB.
Values between tasks travel as XComArgs in template fields, which Airflow resolves at run time.
"""

from __future__ import annotations

import re
from typing import Any

from airflow.sdk import BaseOperator, BaseOperatorLink

from dagfactory.spec import PipelineSpec
from dagfactory.workspace import Credentials


def run_key(context: Any) -> str:
    """Unique per DAG run; names the run's cluster so any later task can find it."""
    raw = f"{context['dag'].dag_id}__{context['run_id']}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


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
    return Credentials(conn.login, conn.password)


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
        self.workspace = workspace  # bootstrap's XCom: {"commit": sha}
        self.cluster = cluster  # cluster_up's XCom: the cluster handle


class BootstrapOperator(_PipelineOperator):
    """Resolve the git ref to one commit for the whole run; prepare checkout and virtualenv."""

    def execute(self, context: Any) -> dict[str, Any]:
        from dagfactory import steps

        return steps.bootstrap(self.spec, _credentials(self.spec), self.log.info)


class ClusterUpOperator(_PipelineOperator):
    """Setup task: start the run's Dask cluster and push its handle."""

    template_fields = ("workspace",)
    ui_color = "#d5f5e3"
    operator_extra_links = (DaskDashboardLink(),)
    cluster_handle: dict[str, Any] | None = None

    def execute(self, context: Any) -> dict[str, Any]:
        from dagfactory import steps

        self.cluster_handle = steps.cluster_up(
            self.spec,
            self.workspace["commit"],
            run_key(context),
            _credentials(self.spec),
            self.log.info,
        )
        return self.cluster_handle


class RunOperator(_PipelineOperator):
    """Call the entry point with a client of the run's cluster; its result becomes the XCom."""

    template_fields = ("workspace", "cluster")
    ui_color = "#fdebd0"
    operator_extra_links = (DaskDashboardLink(),)

    @property
    def cluster_handle(self) -> Any:
        return self.cluster

    def execute(self, context: Any) -> Any:
        from dagfactory import steps

        # context["params"] holds trigger-time overrides; strings are Jinja-rendered here so
        # that "{{ ds }}" in a YAML param becomes the run's date.
        declared = {name: context["params"][name] for name in self.spec.params}
        params = self.render_template(declared, _with_run_dates(context))
        return steps.run(
            self.spec,
            self.workspace["commit"],
            self.cluster,
            params,
            _credentials(self.spec),
            self.log.info,
        )


class TeardownOperator(_PipelineOperator):
    """Teardown task: scale the run's cluster to zero, whatever happened before."""

    template_fields = ("cluster",)
    ui_color = "#fadbd8"

    def execute(self, context: Any) -> None:
        from dagfactory import steps

        steps.teardown(self.spec, self.cluster, run_key(context))
        self.log.info("cluster %s stopped", run_key(context))


class InvalidSpecOperator(BaseOperator):
    """The one task of a broken pipeline file's DAG: fails with the file's errors."""

    ui_color = "#f5b7b1"

    def __init__(self, *, message: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.message = message

    def execute(self, context: Any) -> None:
        from dagfactory.errors import SpecError

        raise SpecError.from_text(self.message)
