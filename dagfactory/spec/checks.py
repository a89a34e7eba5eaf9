"""Rules a spec must follow that JSON Schema cannot express.

Each rule looks at a typed PipelineSpec and yields (field path, message) pairs; the loader turns
them into located problems. Messages say what is wrong and what to write instead.
"""

from __future__ import annotations

import copy
import difflib
import keyword
import posixpath
import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from dagfactory.spec.pipeline import (
    ASSET_URI_MAX_LENGTH,
    RESERVED_STAGE_NAMES,
    RESERVED_STEP_NAMES,
    AssetCondition,
    ClusterSpec,
    PipelineSpec,
    ScheduleSpec,
    StageSpec,
    StepSpec,
    parse_duration,
    parse_size,
    template_references,
)

FieldPath = tuple[str | int, ...]
Finding = tuple[FieldPath, str]

SCHEDULE_PRESETS = (
    "@once",
    "@continuous",
    "@hourly",
    "@daily",
    "@weekly",
    "@monthly",
    "@quarterly",
    "@yearly",
    "@annually",
)
# Refs as git-check-ref-format allows them, minus a leading '-' (it would read as an option).
_REF_RULES = (
    (re.compile(r"^-"), "it starts with '-' and would be read as an option"),
    (re.compile(r"[\x00-\x20\x7f]"), "it contains a space or a control character"),
    (re.compile(r"\.\."), "it contains '..'"),
    (re.compile(r"@\{"), "it contains '@{'"),
    (re.compile(r"[~^:?*\[\\]"), "it contains one of ~ ^ : ? * [ \\"),
    (re.compile(r"^/|/$|//"), "it has an empty part between '/'"),
    (re.compile(r"(^|/)\.|\.lock(/|$)|\.$"), "a part starts with '.' or ends with '.' or '.lock'"),
    (re.compile(r"^@$"), "'@' alone is not a ref"),
)


def check_data(data: dict[str, Any]) -> Iterator[Finding]:
    """Rules on the raw document: what the typed spec can no longer tell (was a key written?)."""
    params = data.get("params")
    if isinstance(params, dict):
        yield from _check_json(("params",), params)
        yield from _check_param_forms(params)
    stages = data.get("stages")
    if "entrypoint" in data and stages is not None:
        yield (
            ("entrypoint",),
            "a pipeline has one entrypoint or stages, not both; move the entry point into a "
            "stage's steps, e.g. steps: [{main: {entrypoint: " + str(data["entrypoint"]) + "}}]",
        )
    elif "entrypoint" not in data and stages is None:
        yield (
            ("entrypoint",),
            "missing required key 'entrypoint'; add e.g. entrypoint: wordcount.job:main, or "
            "stages: {...} for several steps and clusters",
        )
    cluster = data.get("cluster") if isinstance(data.get("cluster"), dict) else {}
    if "cluster" in data:
        yield from _check_cluster_data(("cluster",), cluster)
    for name, stage in (stages or {}).items() if isinstance(stages, dict) else ():
        if not isinstance(stage, dict):
            continue
        own = stage.get("cluster")
        yield from _check_cluster_data(
            ("stages", name, "cluster"),
            stage_cluster(cluster, own if isinstance(own, dict) else {}),
        )
        for path, step in _raw_steps(("stages", name, "steps"), stage.get("steps")):
            if isinstance(step.get("params"), dict):
                yield from _check_json((*path, "params"), step["params"])


def _raw_steps(path: FieldPath, items: Any) -> Iterator[tuple[FieldPath, dict[str, Any]]]:
    """(path, mapping) of every step written as a mapping in a stage's raw steps list."""
    for index, item in enumerate(items if isinstance(items, list) else ()):
        if not isinstance(item, dict) or len(item) != 1:
            continue
        ((name, value),) = item.items()
        if name == "parallel" and isinstance(value, list):
            for inner, sub in enumerate(value):
                if isinstance(sub, dict) and len(sub) == 1:
                    ((sub_name, sub_value),) = sub.items()
                    if isinstance(sub_value, dict):
                        yield (*path, index, "parallel", inner, sub_name), sub_value
        elif isinstance(value, dict):
            yield (*path, index, name), value


def _check_cluster_data(path: FieldPath, cluster: dict[str, Any]) -> Iterator[Finding]:
    yield from _check_backend_fields(path, cluster)
    if cluster.get("backend") == "existing":
        for key in SIZING_FIELDS:
            if key in cluster:
                yield (
                    (*path, key),
                    f"the 'existing' backend uses the cluster as it is; '{key}' has no effect "
                    "there: remove it, or size the cluster where it is started",
                )


def merge_mappings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of mappings; the override wins, lists are replaced, not concatenated."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_mappings(merged[key], value)
        else:
            merged[key] = value
    return merged


def stage_cluster(pipeline: dict[str, Any], own: dict[str, Any] | None) -> dict[str, Any]:
    """A stage's cluster: its own settings merged over the pipeline's.

    A stage that switches to another backend inherits only the settings that still mean
    something there, so that a pipeline's `listen` or `subnets` does not make every stage on
    another backend invalid.
    """
    own = own or {}
    merged = merge_mappings(pipeline, own)
    backend = own.get("backend")
    if backend is not None and backend != pipeline.get("backend", "local"):
        for name in list(merged):
            if name not in own and not applies(name, backend):
                del merged[name]
    return merged


def applies(name: str, backend: Any) -> bool:
    """Whether a cluster setting means something to a backend (to a third-party one: all do)."""
    if not isinstance(backend, str) or backend not in BACKEND_FIELDS:
        return True
    if backend == "existing" and name in SIZING_FIELDS:
        return False
    return not any(name in names for owner, names in BACKEND_FIELDS.items() if owner != backend)


# Settings of the clusters dagfactory starts; the 'existing' backend uses a cluster as it is.
SIZING_FIELDS = ("workers", "cpu", "memory", "adaptive")


# Cluster settings that mean something to one built-in backend only.
BACKEND_FIELDS = {
    "local": ("listen",),
    "existing": ("address",),
    "fargate": (
        "spot", "region", "aws_conn_id", "image", "subnets", "security_groups", "allow_from",
        "public_ip", "ecs_cluster", "scheduler_cpu", "scheduler_memory", "execution_role",
        "task_role", "log_group", "tags",
    ),
}  # fmt: skip


def _check_backend_fields(path: FieldPath, cluster: dict[str, Any]) -> Iterator[Finding]:
    """A setting of another backend is a mistake worth a word: it would silently do nothing."""
    backend = cluster.get("backend", "local")
    if not isinstance(backend, str) or backend not in BACKEND_FIELDS:
        return  # a third-party backend: its settings are its own business
    for owner, names in BACKEND_FIELDS.items():
        if owner == backend:
            continue
        for name in names:
            if name in cluster:
                yield (
                    (*path, name),
                    f"'{name}' applies to the '{owner}' backend only, and this cluster's backend "
                    f"is '{backend}'; remove it (or set backend: {owner})",
                )


def _check_param_forms(params: dict[str, Any]) -> Iterator[Finding]:
    from dagfactory.spec.params import is_long_form, param_spec, schema_problems

    for name, value in params.items():
        if not isinstance(name, str):
            continue
        if not name.isidentifier() or keyword.iskeyword(name):
            yield (
                ("params", name),
                f"{name!r} cannot be a keyword argument of the entry point; use letters, "
                "digits and '_', not starting with a digit",
            )
        if not is_long_form(value) or not isinstance(value.get("type", "string"), (str, list)):
            continue
        try:
            spec = param_spec(value)
        except TypeError:
            continue  # an unknown keyword: the schema reports it, with a suggestion
        for field, message in schema_problems(name, spec):
            yield (("params", name, field) if field else ("params", name)), message


def _check_json(path: FieldPath, value: Any) -> Iterator[Finding]:
    """Params travel as JSON (Airflow params, XCom, the entry point's kwargs)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                yield (
                    (*path, key),
                    f"the name {key!r} is not text; put it in quotes: '{key}'",
                )
            else:
                yield from _check_json((*path, key), item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _check_json((*path, index), item)
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        yield (
            path,
            f"{type(value).__name__} values cannot be params; use text, numbers, true/false, "
            "null, lists and mappings",
        )


def check_spec(spec: PipelineSpec) -> Iterator[Finding]:
    """Every rule below, in the order a reader meets the fields."""
    yield from _check_source(spec)
    yield from _check_schedule(spec)
    yield from _check_outlets(spec)
    yield from _check_durations(spec)
    yield from _check_params(spec)
    yield from _check_cluster(("cluster",), spec.cluster)
    yield from _check_stages(spec)


def _check_source(spec: PipelineSpec) -> Iterator[Finding]:
    git = spec.source.git.strip()
    if git.startswith("-"):
        yield (
            ("source", "git"),
            f"{git!r} starts with '-' and would be read as an option; write a URL or a path",
        )
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*::", git):
        yield (
            ("source", "git"),
            (
                f"{git!r} uses a git remote helper ('{git.split('::')[0]}::'), which can run "
                "commands; use an https://, ssh://, file:// URL or a path"
            ),
        )
    elif "://" in git:
        yield from _check_url(git)
    elif (scp := re.match(r"^(?:([^@/:]*)@)?([^@/:]+):", git)) and scp.group(2).startswith("-"):
        yield (
            ("source", "git"),
            f"host {scp.group(2)!r} starts with '-' and would be read as an ssh option",
        )
    ref = spec.source.ref
    reason = "it is empty" if ref is not None and not ref.strip() else None
    for rule, why in _REF_RULES if ref and not reason else ():
        if rule.search(ref):
            reason = why
            break
    if reason:
        yield (
            ("source", "ref"),
            (
                f"{ref!r} is not a valid git ref name ({reason}); write a branch, a tag or a "
                "commit sha, e.g. main or v1.2.0"
            ),
        )
    yield from _check_relative(("source", "subdir"), spec.source.subdir)
    if isinstance(spec.source.requirements, str):
        yield from _check_relative(("source", "requirements"), spec.source.requirements)


def _check_url(git: str) -> Iterator[Finding]:
    try:
        url = urlsplit(git)
        url.port  # noqa: B018 - raises ValueError for a malformed host:port
        host = url.netloc.rpartition("@")[2]
    except ValueError as exc:
        yield ("source", "git"), f"{git!r} is not a valid URL ({exc}); check the host part"
        return
    if url.scheme not in ("https", "http", "ssh", "git", "file"):
        yield (
            ("source", "git"),
            (
                f"URL scheme {url.scheme!r} is not supported; use https://, ssh://, git://, "
                "file:// or a path"
            ),
        )
        return
    if host.startswith("-"):
        yield (
            ("source", "git"),
            f"host {host!r} starts with '-' and would be read as an option; write a real host",
        )
    # An ssh user name ("git@") is not a secret; anything before '@' in an http(s) URL is
    # a token or a password in practice.
    secret = url.password or (url.username if url.scheme in ("https", "http") else None)
    if secret:
        yield (
            ("source", "git"),
            (
                "the URL contains credentials; remove them and put them in an Airflow "
                "connection named by 'source.connection' (its login and password are used "
                "for https:// remotes)"
            ),
        )


def _check_relative(path: FieldPath, value: str) -> Iterator[Finding]:
    if not value:
        return
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", value):
        yield path, f"{value!r} is absolute; write a path relative to the repository"
    elif posixpath.normpath(value.replace("\\", "/")).split("/")[0] == "..":
        yield path, f"{value!r} leaves the repository ('..'); write a path inside it"


def _check_schedule(spec: PipelineSpec) -> Iterator[Finding]:
    schedule = spec.schedule
    if isinstance(schedule, ScheduleSpec):
        if schedule.cron is not None:
            yield from _check_cron(("schedule", "cron"), schedule.cron, with_assets=True)
        yield from _check_assets(("schedule", "assets"), schedule.assets)
    elif schedule is not None:
        yield from _check_cron(("schedule",), schedule)


def _check_cron(path: FieldPath, schedule: str, with_assets: bool = False) -> Iterator[Finding]:
    if schedule.strip().startswith("@"):
        if with_assets and schedule in ("@once", "@continuous"):
            yield (
                path,
                f"{schedule!r} does not combine with assets; write a cron expression or a "
                "preset such as @daily, or leave cron out to run on the assets alone",
            )
        elif schedule not in SCHEDULE_PRESETS:
            close = difflib.get_close_matches(schedule.strip().lower(), SCHEDULE_PRESETS, n=1)
            presets = ", ".join(SCHEDULE_PRESETS)
            hint = f"did you mean {close[0]!r}?" if close else f"use one of {presets}"
            yield path, f"unknown preset {schedule!r}; {hint}"
        return
    from croniter import croniter

    fields = len(schedule.split())
    if fields != 5 or not croniter.is_valid(schedule):
        why = (
            f"it has {fields} fields, but Airflow's cron has no seconds or year field"
            if fields in (6, 7)
            else "it does not parse as cron"
        )
        yield (
            path,
            (
                f"{schedule!r} is not a cron expression: {why}; write five fields "
                "'minute hour day-of-month month day-of-week', e.g. '0 6 * * 1-5', or a preset "
                "such as @daily"
            ),
        )


def _check_assets(path: FieldPath, assets: str | tuple | AssetCondition) -> Iterator[Finding]:
    """Every URI of an asset condition, and conditions that could never start a run."""
    if isinstance(assets, str):
        if problem := asset_uri_problem(assets):
            yield path, f"{assets!r} is not a valid asset URI: {problem}"
        return
    if isinstance(assets, AssetCondition):
        if assets.any and assets.all:
            yield (
                (*path, "all"),
                "a condition is either any or all, not both; to combine them, nest one in the "
                "other, e.g. {all: [s3://a/x, {any: [s3://a/y, s3://a/z]}]}",
            )
        elif not assets.items:
            yield (
                path,
                "this condition names no asset, so it would never start a run; write "
                "{any: [URI, ...]} or {all: [URI, ...]} with at least one asset URI",
            )
        for kind in ("any", "all"):
            for index, item in enumerate(getattr(assets, kind)):
                yield from _check_assets((*path, kind, index), item)
        return
    if not assets:
        yield (
            path,
            "an empty list of assets would never start a run; name at least one asset, "
            "e.g. [s3://bucket/sales], or write schedule: null to run only when triggered",
        )
    for index, item in enumerate(assets):
        yield from _check_assets((*path, index), item)


def _check_outlets(spec: PipelineSpec) -> Iterator[Finding]:
    places = [(("outlets",), spec.outlets)]
    for name, stage in spec.stages.items():
        places += [((*path, "outlets"), step.outlets) for path, _, step in step_paths(name, stage)]
    for path, outlets in places:
        for index, uri in enumerate(outlets):
            if problem := asset_uri_problem(uri):
                yield (*path, index), f"{uri!r} is not a valid asset URI: {problem}"


def asset_uri_problem(uri: str) -> str | None:
    """Why `uri` cannot name an Airflow asset, in words; None when it can.

    Pure, so that `dagfactory validate` needs no Airflow. It refuses what Airflow 3's
    `Asset(uri=...)` refuses (its own rules and those of the providers' URI normalizers
    dagfactory knows: s3, redshift), and, stricter, what Airflow would accept but quietly
    change or mistake: whitespace (Airflow strips it from the URI and keeps it in the name),
    credentials (dropped with a warning; they belong in a connection), and a scheme-less text
    with '/' or ':' (most likely a URI whose scheme lost its '://'). tests/test_assets.py holds
    this against Airflow's own `Asset` on a list of URIs.
    """
    if not uri.strip():
        return "it is empty; write a URI such as s3://bucket/sales"
    if len(uri) > ASSET_URI_MAX_LENGTH:
        return f"it is {len(uri)} characters long, and Airflow allows {ASSET_URI_MAX_LENGTH}"
    if re.search(r"[\s\x00-\x1f\x7f]", uri):
        return "it contains a space or a control character; write a space in a path as %20"
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        return f"it does not parse as a URI ({exc})"
    scheme = parts.scheme.lower()
    if not scheme:
        if "/" in uri or ":" in uri:
            return (
                "it has no scheme; write scheme://..., e.g. s3://bucket/sales, "
                "file:///data/sales or x-warehouse://sales"
            )
        if uri in ("self", "context"):
            return f"Airflow reserves the name {uri!r}; choose another"
        return None
    if scheme == "airflow":
        return "Airflow reserves the airflow:// scheme; use another, e.g. x-airflow://"
    if parts.password is not None:
        return (
            "it contains a password; remove it (an asset names data, it does not open it: "
            "credentials belong in an Airflow connection)"
        )
    if scheme == "s3" and not parts.netloc:
        return "an s3:// URI needs a bucket: s3://bucket/key"
    if scheme == "redshift":
        try:
            parts.port  # noqa: B018 - raises ValueError for a malformed host:port
        except ValueError:
            return "its port is not a number; write redshift://host:5439/database/schema/table"
        if not parts.netloc or len(parts.path.rstrip("/").split("/")) != 4:
            return "write a redshift:// URI as redshift://host:5439/database/schema/table"
    return None


def _check_durations(spec: PipelineSpec) -> Iterator[Finding]:
    checks = [
        (("timeout",), spec.timeout),
        (("cluster", "idle_timeout"), spec.cluster.idle_timeout),
    ]
    for name, stage in spec.stages.items():
        checks.append((("stages", name, "cluster", "idle_timeout"), stage.cluster.idle_timeout))
        for path, _, step in step_paths(name, stage):
            checks.append(((*path, "timeout"), step.timeout))
    for path, value in checks:
        if value is not None and parse_duration(value).total_seconds() == 0:
            yield path, f"{value!r} is zero; write a duration longer than that, e.g. 30m"


def _check_params(spec: PipelineSpec) -> Iterator[Finding]:
    if "client" in spec.params:
        yield (
            ("params", "client"),
            (
                "'client' is the Dask client the entry point gets as its first argument; "
                "give the param another name"
            ),
        )


def _check_cluster(path: FieldPath, cluster: ClusterSpec) -> Iterator[Finding]:
    from dagfactory.backends import backend_exists, backend_names

    if not backend_exists(cluster.backend):
        names = backend_names()
        close = difflib.get_close_matches(cluster.backend, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(names)}"
        yield (*path, "backend"), f"unknown backend {cluster.backend!r}; {hint}"
    if cluster.backend == "existing" and not cluster.address:
        yield (
            (*path, "backend"),
            (
                "the 'existing' backend needs the scheduler's address; add "
                "'address: tcp://HOST:8786' under cluster"
            ),
        )
    if cluster.address and not re.match(r"^(tcp|tls|ucx|ws|wss)://[^\s/]+:\d+/?$", cluster.address):
        yield (
            (*path, "address"),
            (f"{cluster.address!r} is not a scheduler address; write e.g. tcp://host:8786"),
        )
    if parse_size(cluster.memory) == 0:
        yield (*path, "memory"), f"{cluster.memory!r} is zero; write e.g. 2GiB"
    if cluster.backend == "fargate":
        from dagfactory.backends.fargate import task_size_problem

        sizes = (
            ("cpu", "memory", cluster.cpu, cluster.memory),
            ("scheduler_cpu", "scheduler_memory", cluster.scheduler_cpu, cluster.scheduler_memory),
        )
        for cpu_field, memory_field, cpu, memory in sizes:
            problem = task_size_problem(cpu, parse_size(memory))
            if problem:
                yield (*path, memory_field if "memory" in problem else cpu_field), problem
    if cluster.adaptive is not None:
        bounds = cluster.adaptive
        if cluster.backend not in ("local", "fargate"):
            yield (
                (*path, "adaptive"),
                f"adaptive scaling works on the local and fargate backends, and this cluster's "
                f"backend is '{cluster.backend}'; remove adaptive and set workers",
            )
        if cluster.backend == "fargate" and not cluster.task_role:
            yield (
                (*path, "adaptive"),
                "adaptive scaling on fargate needs cluster.task_role: the scheduler starts and "
                "stops its worker tasks with that role (it needs the permissions in "
                "deploy/aws/scheduler-task-role.json); set task_role, or remove adaptive and "
                "set workers",
            )
        if bounds.minimum > bounds.maximum:
            yield (
                (*path, "adaptive", "minimum"),
                f"minimum ({bounds.minimum}) is above maximum ({bounds.maximum}); the cluster "
                "could never be within both",
            )


def step_paths(stage_name: str, stage: StageSpec) -> Iterator[tuple[FieldPath, str, StepSpec]]:
    """(where it is written, name, step) of every step of a stage, in order."""
    for index, item in enumerate(stage.steps):
        ((name, value),) = item.items()
        base: FieldPath = ("stages", stage_name, "steps", index)
        if isinstance(value, tuple):
            for inner, sub in enumerate(value):
                ((sub_name, sub_step),) = sub.items()
                yield (*base, "parallel", inner, sub_name), sub_name, sub_step
        else:
            yield (*base, name), name, value


def _check_stages(spec: PipelineSpec) -> Iterator[Finding]:
    """Names, the stage graph, and what step params may refer to."""
    stages = spec.stages
    for name, stage in stages.items():
        if name in RESERVED_STAGE_NAMES:
            yield (
                ("stages", name),
                f"{name!r} is the name of a task of every pipeline; name the stage otherwise",
            )
        yield from _check_cluster(("stages", name, "cluster"), stage.cluster)
        for index, dependency in enumerate(stage.depends_on):
            where = ("stages", name, "depends_on", index)
            if dependency == name:
                yield where, f"stage {name!r} cannot depend on itself"
            elif dependency not in stages:
                yield (
                    where,
                    f"no stage is called {dependency!r}; {_choices(dependency, list(stages))}",
                )
        if stage.prewarm and not stage.depends_on:
            yield (
                ("stages", name, "prewarm"),
                "prewarm starts the cluster while the stages this one depends on finish, and "
                "this stage depends on none; remove prewarm (its cluster starts with the run)",
            )
        if stage.prewarm and stage.cluster.pool:
            yield (
                ("stages", name, "prewarm"),
                "with cluster.pool the cluster starts in the stage's first step, which holds "
                "the pool's slot, so it cannot start early; remove prewarm or the pool",
            )
    cycle = _stage_cycle(spec)
    if cycle:
        yield (
            ("stages", cycle[0], "depends_on"),
            "stages depend on each other in a cycle ("
            + " -> ".join([*cycle, cycle[0]])
            + "); none of them could ever start: remove one of these depends_on",
        )
        return
    yield from _check_steps(spec)
    sinks = spec.final_stages()
    if not sinks:
        return
    if spec.outlets and len(sinks) > 1:
        yield (
            ("outlets",),
            f"with several final stages ({', '.join(sinks)}) a run has no one last step to "
            "update the pipeline's outlets; put the outlets on the steps that write them",
        )
    elif spec.outlets and len(stages[sinks[0]].groups[-1]) > 1:
        yield (
            ("outlets",),
            f"stage {sinks[0]!r} ends with parallel steps, so a run has no one last step to "
            "update the pipeline's outlets; put the outlets on the steps that write them",
        )


def _stage_cycle(spec: PipelineSpec) -> list[str]:
    """One cycle of stages through depends_on, in order ([] when there is none)."""
    stages = spec.stages
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str]:
        state[name] = 1
        path.append(name)
        for dependency in stages[name].depends_on:
            if dependency not in stages or dependency == name:
                continue
            if state.get(dependency) == 1:
                return path[path.index(dependency) :]
            if dependency not in state and (found := visit(dependency)):
                return found
        path.pop()
        state[name] = 2
        return []

    for name in stages:
        if name not in state and (found := visit(name)):
            return list(reversed(found))
    return []


def _check_steps(spec: PipelineSpec) -> Iterator[Finding]:
    """Step names are unique and free; {{ steps.X }} names a step that runs before."""
    stages = spec.stages
    upstream = {name: _upstream_stages(spec, name) for name in stages}
    where: dict[str, tuple[str, int]] = {}  # step -> (stage, group index)
    for stage_name, stage in stages.items():
        for group_index, group in enumerate(stage.groups):
            for step_name, _ in group:
                where.setdefault(step_name, (stage_name, group_index))
    seen: set[str] = set()
    for stage_name, stage in stages.items():
        group_of = {n: i for i, g in enumerate(stage.groups) for n, _ in g}
        for path, step_name, step in step_paths(stage_name, stage):
            if step_name in RESERVED_STEP_NAMES:
                yield (
                    path,
                    f"{step_name!r} is the name of a task of every stage; name the step otherwise",
                )
            elif step_name in seen:
                first = where[step_name][0]
                yield (
                    path,
                    (
                        f"there is already a step {step_name!r} (stage {first!r}); step names are "
                        "unique in a pipeline, as {{ steps.<name> }} refers to them"
                    ),
                )
            seen.add(step_name)
            for param, kind, ref in template_references(step.params):
                if kind == "steps":
                    problem = _reference_problem(
                        ref, step_name, stage_name, group_of[step_name], where, upstream
                    )
                elif ref not in spec.params:
                    hint = (
                        _choices(ref, list(spec.params))
                        if spec.params
                        else "declare it under params: at the top of the file"
                    )
                    problem = f"params.{ref}: the pipeline has no param {ref!r}; {hint}"
                else:
                    problem = None
                if problem:
                    yield (*path, "params", *param), problem


def _upstream_stages(spec: PipelineSpec, name: str) -> set[str]:
    found: set[str] = set()
    todo = list(spec.stages[name].depends_on)
    while todo:
        stage = todo.pop()
        if stage in spec.stages and stage not in found:
            found.add(stage)
            todo.extend(spec.stages[stage].depends_on)
    return found


def _reference_problem(
    ref: str,
    step: str,
    stage: str,
    group: int,
    where: dict[str, tuple[str, int]],
    upstream: dict[str, set[str]],
) -> str | None:
    if ref not in where:
        return f"steps.{ref}: no step is called {ref!r}; {_choices(ref, list(where))}"
    if ref == step:
        return f"steps.{ref}: a step cannot use its own result"
    ref_stage, ref_group = where[ref]
    if ref_stage == stage and ref_group < group:
        return None
    if ref_stage != stage and ref_stage in upstream[stage]:
        return None
    if ref_stage == stage:
        return (
            f"steps.{ref}: step {ref!r} does not run before {step!r} (it comes "
            f"{'at the same time' if ref_group == group else 'after it'} in stage {stage!r}); "
            f"move {ref!r} above {step!r}"
        )
    return (
        f"steps.{ref}: step {ref!r} is in stage {ref_stage!r}, which does not run before "
        f"stage {stage!r}; add {ref_stage!r} to the depends_on of stage {stage!r}"
    )


def _choices(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"there are: {', '.join(names)}" if names else "there are none"
