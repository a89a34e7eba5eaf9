"""Spec -> Airflow DAG. Pure and deterministic: the same YAML gives the same serialized DAG.

No network, no database and no subprocess here: this runs in Airflow's DAG processor for every
pipeline file, and again (for one DAG only) every time a task starts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from airflow.sdk import DAG, Param, TaskGroup, get_parsing_context

from dagfactory.errors import SpecError, SpecProblem
from dagfactory.load import SUFFIXES, load_files, load_folder, read_defaults
from dagfactory.operators import (
    BootstrapOperator,
    ClusterUpOperator,
    InvalidSpecOperator,
    RunOperator,
    TeardownOperator,
    release_cluster,
)
from dagfactory.params import json_schema
from dagfactory.spec import PipelineSpec, parse_duration

PIPELINES_DIR_VARIABLE = "DAGFACTORY_PIPELINES_DIR"
GROUP = "pipeline"
INVALID_TAG = "dagfactory:invalid"


def build_dag(spec: PipelineSpec) -> DAG:
    """The DAG of one pipeline: bootstrap -> cluster_up (setup) -> run -> teardown."""
    start = spec.start_date
    with (
        DAG(
            dag_id=spec.dag_id,
            description=spec.description or None,
            schedule=spec.schedule,
            start_date=datetime(start.year, start.month, start.day, tzinfo=UTC) if start else None,
            catchup=spec.catchup,
            tags=sorted({"dagfactory", *spec.tags}),
            params={
                name: Param(param.default, **json_schema(param))
                for name, param in spec.param_specs.items()
            },
            doc_md=_doc(spec),
            default_args={
                "owner": spec.owner,
                "retries": spec.retries,
                "retry_delay": parse_duration(spec.retry_delay),
                "retry_exponential_backoff": spec.retry_exponential_backoff,
            },
            dagrun_timeout=parse_duration(spec.dagrun_timeout) if spec.dagrun_timeout else None,
            on_failure_callback=partial(release_cluster, spec),
            max_active_tasks=4,
        ) as dag,
        TaskGroup(GROUP, tooltip=f"{spec.entrypoint} on a {spec.cluster.backend} cluster"),
    ):
        bootstrap = BootstrapOperator(task_id="bootstrap", spec=spec)
        cluster_up = ClusterUpOperator(
            task_id="cluster_up",
            spec=spec,
            workspace=bootstrap.output,
            **_drives_cluster(spec, priority=1),
        )
        run = RunOperator(
            task_id="run",
            spec=spec,
            workspace=bootstrap.output,
            cluster=cluster_up.output,
            execution_timeout=parse_duration(spec.timeout) if spec.timeout else None,
            **_drives_cluster(spec, priority=2),
        )
        teardown = TeardownOperator(task_id="teardown", spec=spec, cluster=cluster_up.output)
        # Not on_failure_fail_dagrun: with it, Airflow judges the run by the teardown alone
        # and a failed entry point would leave the DAG run green.
        bootstrap >> cluster_up >> run >> teardown.as_teardown(setups=cluster_up)
    return dag


def _drives_cluster(spec: PipelineSpec, priority: int) -> dict[str, object]:
    """Queue, pool and priority of the tasks that start and use a cluster.

    The pool's slot is held from cluster_up until run ends. A run that holds a cluster goes
    first when slots free up (absolute weights: run over cluster_up), so a new cluster does not
    start between another run's cluster_up and its run. Teardown takes no slot: stopping a
    cluster never waits for a quota.
    """
    options: dict[str, object] = {"priority_weight": priority, "weight_rule": "absolute"}
    if spec.queue:
        options["queue"] = spec.queue
    if spec.cluster.pool:
        options["pool"] = spec.cluster.pool
    return options


def build_invalid_dag(dag_id: str, problems: Sequence[SpecProblem]) -> DAG:
    """A DAG that shows a broken file's errors in the UI and fails if anyone runs it."""
    message = "\n".join(str(p) for p in problems)
    with DAG(
        dag_id=dag_id,
        description=f"INVALID pipeline file: {problems[0].message}"[:200],
        schedule=None,
        tags=[INVALID_TAG],
        doc_md=f"## This pipeline file is invalid\n\n```\n{message}\n```\n\n"
        "Fix the file (`dagfactory validate` shows the same errors); the DAG comes back "
        "as soon as it is valid.",
        is_paused_upon_creation=True,
    ) as dag:
        InvalidSpecOperator(task_id="invalid_spec", message=message)
    return dag


def _doc(spec: PipelineSpec) -> str:
    source = spec.source
    reqs = source.requirements
    rows = [
        ("entry point", f"`{spec.entrypoint}(client, **params)`"),
        ("git", f"`{source.git}`"),
        ("ref", f"`{source.ref or 'HEAD'}`"),
        ("subdir", f"`{source.subdir or '.'}`"),
        ("requirements", f"`{reqs if isinstance(reqs, str) else json.dumps(reqs)}`"),
        ("cluster", f"{spec.cluster.backend}: {spec.cluster.workers} workers x "
                    f"{spec.cluster.cpu} cpu, {spec.cluster.memory}"),
        ("params", f"`{json.dumps(spec.param_defaults, sort_keys=True, default=str)}`"),
        ("file", f"`{Path(spec.origin).name}`"),
    ]  # fmt: skip
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"{spec.description}\n\n| | |\n|---|---|\n{table}\n".lstrip()


def pipelines_dir(default: str | Path) -> Path:
    return Path(os.environ.get(PIPELINES_DIR_VARIABLE) or default)


def build_dags(default_dir: str | Path) -> dict[str, DAG]:
    """Every DAG of the pipelines folder, keyed by DAG id, broken files included as such.

    When a task starts, Airflow tells us which DAG it needs (the parsing context); then only
    that pipeline's file is read and built, if its name gives it away.
    """
    folder = pipelines_dir(default_dir)
    wanted = get_parsing_context().dag_id
    if wanted:
        dag = _build_one(folder, wanted)
        if dag is not None:
            return {wanted: dag}
    result = load_folder(folder)
    dags: dict[str, DAG] = {}
    problems = list(result.problems)
    for spec in result.specs:
        try:
            dags[spec.dag_id] = build_dag(spec)
        except Exception as exc:  # one spec must never take every other DAG down with it
            message = (
                f"could not build the DAG ({type(exc).__name__}: {exc}); this is a bug in "
                "dagfactory, please report it"
            )
            problems.append(SpecProblem(spec.origin, message, 1, 1))
    by_file: dict[str, list[SpecProblem]] = {}
    for problem in problems:
        by_file.setdefault(problem.file, []).append(problem)
    for file, problems in by_file.items():
        dag_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(file).name.rsplit(".", 1)[0])
        if dag_id in dags:  # e.g. the file repeats a DAG id that another file defines
            dag_id = f"{dag_id}__invalid"
        dags.setdefault(dag_id, build_invalid_dag(dag_id, problems))
    return dags


def _build_one(folder: Path, dag_id: str) -> DAG | None:
    """The DAG of the file named after dag_id, if that file alone gives it; else None."""
    for suffix in SUFFIXES:
        path = folder / f"{dag_id}{suffix}"
        if path.is_file():
            try:
                defaults = read_defaults(folder)
            except SpecError:
                return None
            result = load_files([(path, str(path))], defaults)
            if [s.dag_id for s in result.specs] == [dag_id]:
                return build_dag(result.specs[0])
    return None
