"""Spec -> Airflow DAG. Pure and deterministic: the same YAML gives the same serialized DAG.

No network, no database and no subprocess here: this runs in Airflow's DAG processor for every
pipeline file, and again (for one DAG only) every time a task starts.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from airflow.sdk import (
    DAG,
    Asset,
    AssetAll,
    AssetAny,
    AssetOrTimeSchedule,
    CronTriggerTimetable,
    Param,
    TaskGroup,
    cross_downstream,
    get_parsing_context,
)

from dagfactory.dag.docs import doc_md, source_url_template
from dagfactory.dag.operators import (
    BootstrapOperator,
    ClusterUpOperator,
    InvalidSpecOperator,
    RunOperator,
    TeardownOperator,
    release_cluster,
)
from dagfactory.errors import SpecProblem
from dagfactory.spec.load import (
    PIPELINES_DIR_VARIABLE,
    Defaults,
    Profile,
    files_named,
    load_files,
    load_folder,
    selected_profile,
)
from dagfactory.spec.params import json_schema
from dagfactory.spec.pipeline import (
    AssetCondition,
    PipelineSpec,
    ScheduleSpec,
    parse_duration,
)

GROUP = "pipeline"
INVALID_TAG = "dagfactory:invalid"


def build_dag(spec: PipelineSpec, folder: str | Path | None = None, source_url: str = "") -> DAG:
    """The DAG of one pipeline: bootstrap -> cluster_up (setup) -> run -> teardown, or with
    stages, bootstrap -> for each stage: cluster_up (setup) -> steps -> teardown.

    folder and source_url only shape the docs (`docs.doc_md`): the file's path in the
    pipelines folder, and a link to it.
    """
    start = spec.start_date
    with DAG(
        dag_id=spec.dag_id,
        description=spec.description or None,
        schedule=_schedule(spec),
        start_date=datetime(start.year, start.month, start.day, tzinfo=UTC) if start else None,
        catchup=spec.catchup,
        tags=sorted({"dagfactory", *spec.tags}),
        params={
            name: Param(param.default, **json_schema(param))
            for name, param in spec.param_specs.items()
        },
        doc_md=doc_md(spec, folder, source_url),
        default_args={
            "owner": spec.owner,
            "retries": spec.retries,
            "retry_delay": parse_duration(spec.retry_delay),
            "retry_exponential_backoff": spec.retry_exponential_backoff,
        },
        dagrun_timeout=parse_duration(spec.dagrun_timeout) if spec.dagrun_timeout else None,
        on_failure_callback=partial(release_cluster, spec),
        max_active_tasks=4 if not spec.staged else max(4, _widest(spec) + len(spec.stages)),
    ) as dag:
        if spec.staged:
            _stages(spec)
        else:
            _one_entrypoint(spec)
    return dag


def _one_entrypoint(spec: PipelineSpec) -> None:
    with TaskGroup(GROUP, tooltip=f"{spec.entrypoint} on a {spec.cluster.backend} cluster"):
        bootstrap = BootstrapOperator(task_id="bootstrap", spec=spec)
        cluster_up = ClusterUpOperator(
            task_id="cluster_up",
            spec=spec,
            workspace=bootstrap.output,
            **_drives_cluster(spec, pooled=False),
        )
        run = RunOperator(
            task_id="run",
            spec=spec,
            workspace=bootstrap.output,
            cluster=cluster_up.output,
            execution_timeout=parse_duration(spec.timeout) if spec.timeout else None,
            # Emitted when the entry point succeeds.
            outlets=[asset(uri) for uri in spec.outlets],
            **_drives_cluster(spec, pooled=True),
        )
        teardown = TeardownOperator(
            task_id="teardown", spec=spec, cluster=cluster_up.output, earlier=(run.task_id,)
        )
        # Not on_failure_fail_dagrun: with it, Airflow judges the run by the teardown alone
        # and a failed entry point would leave the DAG run green.
        bootstrap >> cluster_up >> run >> teardown.as_teardown(setups=cluster_up)


def _stages(spec: PipelineSpec) -> None:
    """One task group per stage: its cluster_up (setup), its steps, its teardown.

    A stage's first steps wait for the last steps of the stages it depends on; its cluster_up
    waits for them too, or (prewarm) only for the steps before them. Its teardown waits for
    its own last steps only, so each cluster stops as soon as its stage is done.
    """
    bootstrap = BootstrapOperator(task_id="bootstrap", spec=spec)
    task_ids = {
        step: f"{name}.{step}" for name, stage in spec.stages.items() for step, _ in stage.all_steps
    }
    built: dict[str, tuple[ClusterUpOperator, list[list[RunOperator]]]] = {}
    final = _final_step(spec)
    for name in spec.stage_order():
        stage = spec.stages[name]
        staged = spec.for_stage(name)
        with TaskGroup(name, tooltip=_stage_words(name, staged)):
            cluster_up = ClusterUpOperator(
                task_id="cluster_up",
                spec=spec,
                stage=name,
                workspace=bootstrap.output,
                **_drives_cluster(staged, pooled=False),
            )
            groups: list[list[RunOperator]] = []
            earlier: tuple[str, ...] = ()
            for group in stage.groups:
                tasks = []
                for step_name, step in group:
                    timeout = step.timeout or spec.timeout
                    outlets = [*step.outlets, *(spec.outlets if step_name == final else ())]
                    tasks.append(
                        RunOperator(
                            task_id=step_name,
                            spec=spec,
                            stage=name,
                            step=step,
                            workspace=bootstrap.output,
                            cluster=cluster_up.output,
                            earlier=earlier,
                            results={ref: task_ids[ref] for ref in step.results_used},
                            execution_timeout=parse_duration(timeout) if timeout else None,
                            outlets=[asset(uri) for uri in outlets],
                            doc_md=f"`{step.entrypoint}(client, **params)` on the cluster of "
                            f"stage `{name}`",
                            **({"retries": step.retries} if step.retries is not None else {}),
                            **_drives_cluster(staged, pooled=True),
                        )
                    )
                earlier += tuple(t.task_id for t in tasks)
                groups.append(tasks)
            teardown = TeardownOperator(
                task_id="teardown",
                spec=spec,
                stage=name,
                cluster=cluster_up.output,
                earlier=earlier,
            )
        bootstrap >> cluster_up >> groups[0]
        for before, after in itertools.pairwise(groups):
            cross_downstream(before, after)  # every step of a group before every one of the next
        groups[-1] >> teardown.as_teardown(setups=cluster_up)
        for dependency in stage.depends_on:
            up, dependency_groups = built[dependency]
            cross_downstream(dependency_groups[-1], groups[0])
            if not stage.prewarm:
                dependency_groups[-1] >> cluster_up
            elif len(dependency_groups) > 1:
                dependency_groups[-2] >> cluster_up
            else:
                up >> cluster_up
        built[name] = (cluster_up, groups)


def _final_step(spec: PipelineSpec) -> str | None:
    """The step that emits the pipeline's outlets: the one last step of the one final stage
    (validation makes sure there is one when the pipeline has outlets)."""
    finals = spec.final_stages()
    if len(finals) != 1 or len(spec.stages[finals[0]].groups[-1]) != 1:
        return None
    return spec.stages[finals[0]].groups[-1][0][0]


def _widest(spec: PipelineSpec) -> int:
    return max(len(group) for stage in spec.stages.values() for group in stage.groups)


def _stage_words(name: str, staged: PipelineSpec) -> str:
    cluster = staged.cluster
    size = f"{cluster.workers} workers"
    if cluster.adaptive:
        size = f"{cluster.adaptive.minimum}-{cluster.adaptive.maximum} workers (adaptive)"
    return f"stage {name}: a {cluster.backend} cluster of {size}"


def asset(uri: str) -> Asset:
    """The Airflow asset of a URI, named by its normalized URI.

    Airflow identifies an asset by name and URI, and `Asset(uri)` takes the name as written
    while it normalizes the URI (lower-case scheme, no trailing '/', providers' rules). Naming
    it by the normalized URI makes `s3://b/sales/` in one pipeline's outlets and `s3://b/sales`
    in another's schedule the same asset, as they are the same URI.
    """
    try:
        normalized = Asset(uri=uri).uri
    except ValueError as exc:  # a provider's rules for its scheme, which validate cannot know
        raise AssetUriError(f"asset {uri!r}: {exc}") from None
    return Asset(name=normalized, uri=normalized)


class AssetUriError(ValueError):
    """An asset URI that Airflow (or a provider installed in it) refuses."""


def _asset_condition(value: str | tuple | AssetCondition) -> Asset | AssetAll | AssetAny:
    if isinstance(value, str):
        return asset(value)
    if isinstance(value, AssetCondition):
        combine = AssetAny if value.kind == "any" else AssetAll
        return combine(*(_asset_condition(item) for item in value.items))
    return AssetAll(*(_asset_condition(item) for item in value))


def _schedule(
    spec: PipelineSpec,
) -> str | Asset | AssetAll | AssetAny | AssetOrTimeSchedule | None:
    """The DAG's schedule: a cron or preset string as written, or the assets (and a cron)."""
    schedule = spec.schedule
    if not isinstance(schedule, ScheduleSpec):
        return schedule
    assets = _asset_condition(schedule.asset_condition)
    if schedule.cron is None:
        return assets
    # The timezone Airflow gives a cron written as a string (DAG._extract_tz): the start date's,
    # which dagfactory writes in UTC, else the deployment's default_timezone.
    from airflow import settings

    timezone = "UTC" if spec.start_date else settings.TIMEZONE
    return AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(schedule.cron, timezone=timezone), assets=assets
    )


def _drives_cluster(spec: PipelineSpec, pooled: bool) -> dict[str, object]:
    """Queue (and, for the run task, pool) of the tasks that start and use a cluster.

    With a pool, the cluster starts inside the run task, which holds the slot: an Airflow slot
    is held only while one task runs, so a cluster started by cluster_up would be up, unpaid
    for by any slot, while its run waits for one (and another run's cluster_up could take the
    slot in between). Teardown takes no slot: stopping a cluster never waits for a quota.
    """
    options: dict[str, object] = {}
    if spec.queue:
        options["queue"] = spec.queue
    if pooled and spec.cluster.pool:
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


def pipelines_dir(default: str | Path) -> Path:
    return Path(os.environ.get(PIPELINES_DIR_VARIABLE) or default)


def build_dags(default_dir: str | Path) -> dict[str, DAG]:
    """Every DAG of the pipelines folder and its subfolders, keyed by DAG id, broken files
    included as such, with the profile $DAGFACTORY_PROFILE names.

    When a task starts, Airflow tells us which DAG it needs (the parsing context); then only
    that pipeline's file and its defaults files are read and built, if its name gives it away.
    """
    folder = pipelines_dir(default_dir)
    profile = selected_profile()
    source_url = source_url_template()
    wanted = get_parsing_context().dag_id
    if wanted:
        dag = _build_one(folder, wanted, profile, source_url)
        if dag is not None:
            return {wanted: dag}
    result = load_folder(folder, profile=profile)
    dags: dict[str, DAG] = {}
    problems = list(result.problems)
    for spec in result.specs:
        try:
            dags[spec.dag_id] = build_dag(spec, folder, source_url)
        except AssetUriError as exc:  # the user's mistake, in the provider's words
            problems.append(SpecProblem(spec.origin, str(exc), 1, 1))
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
        # Named after the file; when that id is taken (the file repeats another file's DAG id,
        # or a broken file of the same name sits in another subfolder), marked and numbered.
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(file).name.rsplit(".", 1)[0])
        numbered = (f"{name}__invalid_{n}" for n in itertools.count(2))
        dag_id = next(
            c for c in itertools.chain([name, f"{name}__invalid"], numbered) if c not in dags
        )
        dags[dag_id] = build_invalid_dag(dag_id, problems)
    return dags


def _build_one(folder: Path, dag_id: str, profile: Profile | None, source_url: str) -> DAG | None:
    """The DAG of the one file named after dag_id, if that file alone gives it; else None.

    Lists the tree's folders but reads only that file and the defaults files above it. Two
    files of that name (in different subfolders) leave the choice to the full load.
    """
    paths = files_named(folder, dag_id)
    if len(paths) != 1:
        return None
    result = load_files([(paths[0], str(paths[0]))], Defaults(profile, root=folder))
    if result.problems or [s.dag_id for s in result.specs] != [dag_id]:
        return None
    return build_dag(result.specs[0], folder, source_url)
