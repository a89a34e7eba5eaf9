"""The pipeline spec: frozen dataclasses that are the single source of truth.

`schemas/pipeline.schema.json` is generated from these classes (`dagfactory schema`); the JSON
Schema keywords a field needs beyond its type live in the field's metadata.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Annotated, Any, ClassVar

# Durations and sizes mean what Dask makes of them (`dask.utils.parse_timedelta`,
# `parse_bytes`), so a value a Dask user already writes means the same here. The patterns accept
# exactly what those functions accept, with a unit always written (a test keeps them in step).
DURATION_UNITS = (
    "weeks", "week", "w", "days", "day", "d", "hours", "hour", "h", "minutes", "minute", "m",
    "seconds", "second", "s", "milliseconds", "millisecond", "ms",
)  # fmt: skip
DURATION_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*(" + "|".join(DURATION_UNITS) + r")\s*$"
SIZE_PATTERN = r"^\s*[0-9]+(\.[0-9]+)?\s*([kKmMgGtTpP][iI]?[bB]?|[bB])?\s*$"
IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ENTRYPOINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
DAG_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"
# The part of the asset URI rules an editor can show as you type: not empty, no space or control
# character, not Airflow's reserved scheme. `dagfactory validate` checks every rule, in words
# (checks.asset_uri_problem).
ASSET_URI_PATTERN = r"^(?![Aa][Ii][Rr][Ff][Ll][Oo][Ww]:)[^\s\x00-\x1f\x7f]+$"
ASSET_URI_MAX_LENGTH = 1500  # Airflow's limit for an asset's name and URI


@dataclass(frozen=True, eq=False)  # hashed by identity: typing hashes Annotated metadata
class Keywords:
    """JSON Schema keywords a type carries into every place it is used (`Annotated[type, ...]`),
    in the form of a field's: those under "editor" go into the editor's file only."""

    schema: dict[str, Any]


AssetUri = Annotated[
    str, Keywords({"editor": {"maxLength": ASSET_URI_MAX_LENGTH, "pattern": ASSET_URI_PATTERN}})
]
"""An Airflow asset, named by its URI: s3://bucket/key, file:///path, x-kind://anything."""


def doc(description: str, default: Any = None, **schema: Any) -> Any:
    """A dataclass field carrying its schema description (and extra JSON Schema keywords)."""
    meta = {"description": description, "schema": schema}
    if isinstance(default, (dict, list)):
        raise TypeError("use a tuple or default_factory for mutable defaults")
    if default is _REQUIRED:
        return field(metadata=meta)
    if isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


_REQUIRED: Any = object()


@dataclass(frozen=True)
class SourceSpec:
    """Where the pipeline's code comes from: a git repository at a pinned commit."""

    git: str = doc(
        "Git URL (https://, ssh://, git@host:path, file://) or a path. A relative path is "
        "relative to the YAML file. Credentials belong in an Airflow connection, not here.",
        _REQUIRED,
        minLength=1,
        examples=["https://github.com/acme/pipelines.git", "../examples/wordcount"],
    )
    ref: str | None = doc(
        "Branch, tag, or commit sha (full, or abbreviated when only one commit of the "
        "remote's branches and tags starts with it). Resolved to a commit once per run. "
        "Default: the remote's HEAD.",
        None,
        examples=["main", "v1.2.0"],
    )
    subdir: str = doc(
        "Folder of the repository that holds the code; it is put on sys.path.",
        "",
        examples=["", "jobs/wordcount"],
    )
    requirements: str | tuple[str, ...] | None = doc(
        "A requirements file in the repository (relative to subdir), or a list of requirement "
        "strings. Installed into a virtualenv cached by the hash of the requirements.",
        None,
        examples=["requirements.txt", ["pandas>=2", "pyarrow"]],
    )
    connection: str | None = doc(
        "Airflow connection with the credentials: login and password (a token) for https://, "
        "an SSH connection (private_key or key_file, host_key) for ssh:// and git@host:path. "
        "For the command line: the AIRFLOW_CONN_<ID> environment variable.",
        None,
        examples=["github_pipelines"],
    )


JSON_TYPES = ("string", "integer", "number", "boolean", "array", "object", "null")


@dataclass(frozen=True)
class ParamSpec:
    """A param in its long form: a default and the JSON Schema its values must match.

    These are Airflow's Param keywords: the trigger form shows the type and description, and
    a value that does not match is refused before anything starts, in Airflow and on the
    command line alike. A param written as a plain value has the type of that value.
    """

    default: Any = doc(
        "The value used when a run does not give one (Jinja strings such as '{{ ds }}' are "
        "rendered at run time).",
        _REQUIRED,
        examples=[64, "{{ ds }}"],
    )
    type: str | tuple[str, ...] | None = doc(
        "JSON type of the value, or a list of types. Default: the type of the default value.",
        None,
        anyOf=[
            {"enum": list(JSON_TYPES)},
            {"type": "array", "items": {"enum": list(JSON_TYPES)}, "minItems": 1},
        ],
        examples=["integer", ["string", "null"]],
    )
    description: str = doc(
        "Shown under the param in Airflow's trigger form.", "", examples=["Rows per chunk"]
    )
    title: str = doc("Label of the param in Airflow's trigger form.", "", examples=["Chunk size"])
    enum: tuple[Any, ...] | None = doc("The only values allowed.", None, examples=[["a", "b"]])
    minimum: float | None = doc("Smallest number allowed.", None, examples=[1])
    maximum: float | None = doc("Largest number allowed.", None, examples=[100])
    minLength: int | None = doc("Shortest text allowed.", None, minimum=0, examples=[1])
    maxLength: int | None = doc("Longest text allowed.", None, minimum=0, examples=[64])
    pattern: str | None = doc("Regular expression a text must match.", None, examples=["^[a-z_]+$"])
    items: dict[str, Any] | None = doc(
        "JSON Schema of the items of a list.", None, examples=[{"type": "integer"}]
    )
    examples: tuple[Any, ...] | None = doc("Example values.", None, examples=[[16, 64]])


@dataclass(frozen=True)
class AdaptiveSpec:
    """Dask adaptive scaling: the cluster grows and shrinks with its work, between bounds."""

    maximum: int = doc(
        "Most workers: the cluster never grows above this, however much work waits.",
        _REQUIRED,
        minimum=1,
        maximum=1000,
        examples=[8],
    )

    minimum: int = doc(
        "Fewest workers: the cluster never shrinks below this, even with no work.",
        0,
        minimum=0,
        maximum=1000,
        examples=[1],
    )


@dataclass(frozen=True)
class ClusterSpec:
    """The Dask cluster the entry point gets a client for."""

    backend: str = doc(
        "Cluster kind: 'local' starts scheduler and worker processes on this host; 'existing' "
        "connects to a scheduler someone else runs (needs 'address'); 'fargate' starts the "
        "scheduler and workers as AWS ECS Fargate tasks for the run. Editors offer these "
        "built-in kinds only; dagfactory validate also accepts a backend installed through the "
        "'dagfactory.backends' entry point group.",
        "local",
        examples=["local", "existing", "fargate"],
        # A closed list lets the editor flag a typo; validation checks the installed backends.
        editor={"enum": ["local", "existing", "fargate"]},
    )
    workers: int = doc(
        "Number of Dask workers (with adaptive: how many it starts with).",
        2,
        minimum=1,
        maximum=1000,
        examples=[4],
    )
    adaptive: AdaptiveSpec | None = doc(
        "Let Dask scale the workers between minimum and maximum with the work waiting "
        "(Dask's adaptive deployments): more workers while a step has more tasks than threads, "
        "fewer when they idle. The cluster starts with 'workers' (kept within the bounds). "
        "The local and fargate backends (fargate: needs task_role).",
        None,
        examples=[{"minimum": 1, "maximum": 8}],
    )
    cpu: int = doc(
        "Threads (local) or vCPUs (cloud) per worker.", 1, minimum=1, maximum=64, examples=[2]
    )
    memory: str = doc(
        "Memory per worker, e.g. 2GiB or 512MiB.",
        "2GiB",
        pattern=SIZE_PATTERN,
        examples=["2GiB", "512MiB"],
    )
    spot: bool = doc(
        "Fargate: workers on FARGATE_SPOT capacity (much cheaper; AWS may reclaim a worker, and "
        "a retry of the run replaces a lost cluster); the scheduler always on FARGATE.",
        False,
    )
    region: str | None = doc(
        "Fargate: AWS region. Default: the Airflow connection's, else the standard AWS chain's "
        "(AWS_DEFAULT_REGION, ~/.aws/config).",
        None,
        pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$",
        examples=["eu-west-2"],
    )
    aws_conn_id: str = doc(
        "Fargate: Airflow connection with the AWS credentials (apache-airflow-providers-amazon). "
        "When it does not exist, and in dagfactory run, the standard AWS chain is used "
        "(environment, ~/.aws, instance or task role).",
        "aws_default",
        minLength=1,
        examples=["aws_default"],
    )
    image: str | None = doc(
        "Fargate: container image of the scheduler and workers. Default: the stock Dask image "
        "whose distributed and Python match the pipeline's (ghcr.io/dask/dask:<version>-py<x.y>); "
        "the pipeline's requirements are installed into it at start (EXTRA_PIP_PACKAGES).",
        None,
        minLength=1,
        examples=["ghcr.io/dask/dask:2026.8.0-py3.11"],
    )
    subnets: tuple[str, ...] = doc(
        "Fargate: subnets of the tasks. Default: the default VPC's subnets. Tasks get private IPs "
        "only (see public_ip).",
        tuple,
        items={"type": "string", "pattern": r"^subnet-[0-9a-f]+$", "examples": ["subnet-0a1b2c3d"]},
        examples=[["subnet-0a1b2c3d"]],
    )
    security_groups: tuple[str, ...] = doc(
        "Fargate: security groups of the tasks. Default: a group made for the run that admits the "
        "scheduler and dashboard ports only from allow_from, and itself (workers and scheduler), "
        "deleted at teardown.",
        tuple,
        items={"type": "string", "pattern": r"^sg-[0-9a-f]+$", "examples": ["sg-0a1b2c3d"]},
        examples=[["sg-0a1b2c3d"]],
    )
    allow_from: tuple[str, ...] = doc(
        "Fargate: who may reach the scheduler (8786) and dashboard (8787) of the run's own "
        "security group: CIDR blocks or security group ids (e.g. the Airflow workers'). "
        "Default: the VPC's CIDR block.",
        tuple,
        items={
            "type": "string",
            "pattern": r"^(sg-[0-9a-f]+|[0-9.]+/[0-9]+)$",
            "examples": ["sg-0a1b2c3d", "10.1.0.0/16"],
        },
        examples=[["sg-0a1b2c3d", "10.1.0.0/16"]],
    )
    public_ip: bool = doc(
        "Fargate: give the tasks public IPs. Only for subnets with no NAT gateway, where a task "
        "could not otherwise pull its image; the run's security group still admits only "
        "allow_from.",
        False,
    )
    ecs_cluster: str = doc(
        "Fargate: the ECS cluster the tasks run in; made (with the FARGATE and FARGATE_SPOT "
        "capacity providers) if it does not exist, and never deleted.",
        "dagfactory",
        pattern=r"^[A-Za-z0-9_-]{1,255}$",
        examples=["dagfactory", "data-eng"],
    )
    scheduler_cpu: int = doc(
        "Fargate: vCPUs of the scheduler's task.", 1, minimum=1, maximum=16, examples=[2]
    )
    scheduler_memory: str = doc(
        "Fargate: memory of the scheduler's task.",
        "4GiB",
        pattern=SIZE_PATTERN,
        examples=["4GiB", "8GiB"],
    )
    execution_role: str | None = doc(
        "Fargate: IAM role (name or ARN) ECS uses to pull the image and send the logs to "
        "CloudWatch. Default: ecsTaskExecutionRole.",
        None,
        minLength=1,
        examples=["ecsTaskExecutionRole"],
    )
    task_role: str | None = doc(
        "Fargate: IAM role (name or ARN) of the scheduler and workers, for what the pipeline's "
        "code reads and writes (S3, say); with adaptive, also the scheduler's, which starts and "
        "stops worker tasks with it (deploy/aws/scheduler-task-role.json). Default: none.",
        None,
        minLength=1,
        examples=["pipeline-data-access"],
    )
    log_group: str = doc(
        "Fargate: CloudWatch Logs group of the scheduler and workers (made if missing, with a "
        "30-day retention); each run's streams start with its run id.",
        "/dagfactory",
        pattern=r"^[.\-_/#A-Za-z0-9]{1,512}$",
        examples=["/dagfactory"],
    )
    tags: dict[str, str] = doc(
        "Fargate: tags on every AWS resource of the run, besides dagfactory's own "
        "(dagfactory:run, dagfactory:key).",
        dict,
        additionalProperties={"type": "string"},
        examples=[{"team": "data-eng"}],
    )
    address: str | None = doc(
        "Scheduler address for the 'existing' backend.",
        None,
        examples=["tcp://10.0.0.5:8786"],
    )
    listen: str = doc(
        "Local backend: where the scheduler and workers listen. 'loopback' (127.0.0.1) keeps "
        "the cluster to this host; an interface name (eth0) or an IP address of this host "
        "lets the tasks of a run that land on other hosts (CeleryExecutor) reach it. Dask "
        "has no authentication: listen only on a private network.",
        "loopback",
        minLength=1,
        examples=["loopback", "eth0", "10.0.0.5"],
    )
    pool: str | None = doc(
        "Airflow pool that caps how many clusters run at once across the deployment: "
        "the run task takes one slot of it, and the cluster then starts in the run task (not "
        "in cluster_up), so that a cluster exists only while it holds a slot; a run waits "
        "(queued) for a free slot. "
        "The pool must exist (airflow pools set dagfactory_clusters 4 'running clusters'): "
        "Airflow never schedules a task of a pool that does not. Default: Airflow's "
        "default_pool.",
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        examples=["dagfactory_clusters"],
    )
    idle_timeout: str = doc(
        "A cluster with no task to run for this long stops itself, so that even a lost "
        "teardown cannot leave it running. While the entry point runs, it keeps its cluster "
        "busy, so this only counts when nothing uses the cluster.",
        "5m",
        pattern=DURATION_PATTERN,
        examples=["5m", "30m"],
    )

    @property
    def start_workers(self) -> int:
        """How many workers the cluster starts with: 'workers', within the adaptive bounds."""
        if self.adaptive is None:
            return self.workers
        return max(1, min(max(self.workers, self.adaptive.minimum), self.adaptive.maximum))


@dataclass(frozen=True)
class AssetCondition:
    """Assets combined: 'any' (one of them updated) or 'all' (every one); they nest."""

    any: tuple[AssetUri | AssetCondition, ...] = doc(
        "A run starts when any one of these assets (or combinations) is updated.",
        tuple,
        examples=[["s3://acme/sales/eu", "s3://acme/sales/us"]],
    )
    all: tuple[AssetUri | AssetCondition, ...] = doc(
        "A run starts once every one of these assets (or combinations) has been updated since "
        "the last run.",
        tuple,
        examples=[["s3://acme/sales/", {"any": ["s3://acme/fx/ecb", "s3://acme/fx/fed"]}]],
    )
    SCHEMA: ClassVar[dict[str, Any]] = {"editor": {"minProperties": 1, "maxProperties": 1}}

    @property
    def kind(self) -> str:
        """'any' or 'all' (validation makes sure exactly one of them is written)."""
        return "any" if self.any else "all"

    @property
    def items(self) -> tuple[str | AssetCondition, ...]:
        return self.any or self.all


@dataclass(frozen=True)
class ScheduleSpec:
    """A run whenever these assets are updated (by pipelines' outlets or anything in Airflow)."""

    assets: tuple[AssetUri | AssetCondition, ...] | AssetCondition = doc(
        "The assets whose updates start a run: a list (a run once every one has been updated), "
        "or {any: [...]} / {all: [...]}, which nest. Items are asset URIs.",
        _REQUIRED,
        examples=[
            ["s3://acme/sales/"],
            {"any": ["s3://acme/sales/eu", "s3://acme/sales/us"]},
            {"all": ["s3://acme/sales/", {"any": ["s3://acme/fx/ecb", "s3://acme/fx/fed"]}]},
        ],
    )
    cron: str | None = doc(
        "Also run on this cron expression or preset (@daily, ...), whether or not the assets "
        "were updated: a run at the time or on the assets, whichever comes.",
        None,
        examples=["0 3 * * *", "@daily"],
    )

    @property
    def asset_condition(self) -> AssetCondition:
        """The assets as one condition: a list means all of them."""
        if isinstance(self.assets, AssetCondition):
            return self.assets
        return AssetCondition(all=self.assets)


STEP_REFERENCE = re.compile(r"\bsteps\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)")
"""`steps.<name>` inside a param's {{ ... }}: a step's result, which must be ready before."""
PARAM_REFERENCE = re.compile(r"\bparams\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)")
JINJA_EXPRESSION = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
RESERVED_STAGE_NAMES = ("bootstrap",)


def template_references(value: Any, path: tuple = ()) -> Iterator[tuple[tuple, str, str]]:
    """(path inside the params, "steps" or "params", name) of every `steps.<name>` and
    `params.<name>` inside a {{ ... }} of the strings of a params value."""
    if isinstance(value, str):
        for expression in JINJA_EXPRESSION.findall(value):
            for kind, pattern in (("steps", STEP_REFERENCE), ("params", PARAM_REFERENCE)):
                for name in pattern.findall(expression):
                    yield path, kind, name
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from template_references(item, (*path, key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from template_references(item, (*path, index))


RESERVED_STEP_NAMES = ("cluster_up", "teardown", "parallel")


@dataclass(frozen=True)
class StepSpec:
    """One call of an entry point on its stage's cluster: an Airflow task of its own."""

    entrypoint: str = doc(
        "The function to call, as module:function; it is called as function(client, **params).",
        _REQUIRED,
        pattern=ENTRYPOINT_PATTERN,
        examples=["jobs.extract:main"],
    )
    params: dict[str, Any] = doc(
        "Keyword arguments of this step's entry point. Strings are rendered with Airflow's "
        "Jinja at run time: {{ ds }}, the pipeline's params ({{ params.day }}) and the results "
        "of steps that run before this one ({{ steps.clean.rows }}: the 'rows' of the JSON "
        "step 'clean' returned). A value that is exactly one {{ ... }} keeps its type (a "
        "number stays a number).",
        dict,
        examples=[{"day": "{{ ds }}", "rows": "{{ steps.clean.rows }}"}],
        propertyNames={"pattern": IDENTIFIER_PATTERN},
    )
    outlets: tuple[AssetUri, ...] = doc(
        "Assets (URIs) this step updates: an Airflow asset event for each when the step "
        "succeeds, which starts the pipelines whose schedule names it.",
        tuple,
        examples=[["s3://acme/sales/clean"]],
    )
    timeout: str | None = doc(
        "Execution timeout of this step's task. Default: the pipeline's timeout.",
        None,
        pattern=DURATION_PATTERN,
        examples=["30m"],
    )
    retries: int | None = doc(
        "Retries of this step's task. Default: the pipeline's retries. A retry finds its "
        "stage's cluster again, or starts a new one when it was lost.",
        None,
        minimum=0,
        maximum=100,
        examples=[0, 3],
    )

    @property
    def results_used(self) -> tuple[str, ...]:
        """The steps whose results this step's params use ({{ steps.<name> }}), each once."""
        found = (name for _, kind, name in template_references(self.params) if kind == "steps")
        return tuple(dict.fromkeys(found))


StepGroup = dict[str, StepSpec | tuple[dict[str, StepSpec], ...]]
"""An item of a stage's steps: {name: step}, or {parallel: [{name: step}, ...]}."""

_STEP_ITEM_SCHEMA = {
    "type": "object",
    "minProperties": 1,
    "maxProperties": 1,
    "propertyNames": {"pattern": IDENTIFIER_PATTERN},
    "properties": {
        "parallel": {
            "description": "Steps that run at the same time on the stage's cluster (each its "
            "own task), after the steps above and before the steps below.",
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "minProperties": 1,
                "maxProperties": 1,
                "propertyNames": {"pattern": IDENTIFIER_PATTERN},
                "additionalProperties": {"$ref": "#/$defs/step"},
            },
        }
    },
    "additionalProperties": {"$ref": "#/$defs/step"},
}


@dataclass(frozen=True)
class StageSpec:
    """Steps that run in order on one Dask cluster, started for the stage and stopped as soon
    as its last step is done."""

    steps: tuple[StepGroup, ...] = doc(
        "The stage's steps, in order: each item is {name: {entrypoint: ..., params: ...}}, or "
        "{parallel: [{name: ...}, {name: ...}]} for steps that run at the same time. Every step "
        "uses the stage's cluster.",
        _REQUIRED,
        minItems=1,
        items=_STEP_ITEM_SCHEMA,
        examples=[[{"extract": {"entrypoint": "jobs.extract:main"}}]],
    )
    cluster: ClusterSpec = doc(
        "This stage's cluster, merged key by key over the pipeline's cluster: write only what "
        "differs. A stage that changes the backend keeps none of the other backend's settings.",
        ClusterSpec,
        examples=[{"workers": 8, "memory": "16GiB"}],
    )
    depends_on: tuple[str, ...] = doc(
        "Stages whose steps must all have succeeded before this stage's first step starts.",
        tuple,
        items={"type": "string", "pattern": IDENTIFIER_PATTERN, "examples": ["prepare"]},
        examples=[["prepare"]],
    )
    prewarm: bool = doc(
        "Start this stage's cluster while the last step of the stages it depends on runs, "
        "so that its first step does not wait for a cluster to start.",
        False,
    )
    queue: str | None = doc(
        "Celery queue of this stage's cluster_up and steps. Default: the pipeline's queue.",
        None,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        examples=["big"],
    )

    @property
    def groups(self) -> tuple[tuple[tuple[str, StepSpec], ...], ...]:
        """The steps as groups that run one after the other; the steps of a group run at once."""
        groups = []
        for item in self.steps:
            ((name, value),) = item.items()
            if name == "parallel" and isinstance(value, tuple):
                groups.append(tuple(next(iter(s.items())) for s in value))
            else:
                groups.append(((name, value),))
        return tuple(groups)

    @property
    def all_steps(self) -> tuple[tuple[str, StepSpec], ...]:
        """Every (name, step) of the stage, in order."""
        return tuple(step for group in self.groups for step in group)


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline file: a DAG that runs a git entry point on a Dask cluster."""

    # An entrypoint or stages, not both (`dagfactory validate` says so in words).
    SCHEMA: ClassVar[dict[str, Any]] = {
        "editor": {"oneOf": [{"required": ["entrypoint"]}, {"required": ["stages"]}]}
    }

    source: SourceSpec = doc("Where the pipeline's code comes from.", _REQUIRED)
    entrypoint: str = doc(
        "The function to call, as module:function; it is called as function(client, **params). "
        "A pipeline has an entrypoint (one step on one cluster) or stages, not both.",
        "",
        pattern=ENTRYPOINT_PATTERN,
        examples=["wordcount.job:main"],
    )
    stages: dict[str, StageSpec] = doc(
        "Stages, each with its own cluster and steps, instead of one entrypoint: "
        "{prepare: {cluster: {...}, steps: [...]}, model: {depends_on: [prepare], ...}}. "
        "Stages with no depends_on between them run at the same time.",
        dict,
        propertyNames={"pattern": IDENTIFIER_PATTERN},
        examples=[
            {
                "prepare": {"steps": [{"extract": {"entrypoint": "jobs.extract:main"}}]},
                "model": {
                    "depends_on": ["prepare"],
                    "steps": [{"train": {"entrypoint": "jobs.train:main"}}],
                },
            }
        ],
    )
    dag_id: str = doc(
        "Airflow DAG id: letters, digits, '_', '.' and '-'. Default: the file name without "
        ".yml/.yaml. Must be unique across all pipeline files.",
        "",
        pattern=DAG_ID_PATTERN,
        examples=["sales_rollup"],
    )
    description: str = doc(
        "One line shown in the Airflow DAG list.", "", examples=["Nightly sales rollup"]
    )
    owner: str = doc("Owner shown in Airflow.", "dagfactory", examples=["data-eng"])
    tags: tuple[str, ...] = doc("Airflow tags.", tuple, examples=[["sales", "nightly"]])
    schedule: str | ScheduleSpec | None = doc(
        "Cron expression or Airflow preset (@daily, @hourly, ...); or a mapping {assets: [...]} "
        "to run when other pipelines (their outlets) or anything in Airflow update those "
        "assets, with an optional cron: to also run on a time; null runs only when triggered.",
        None,
        examples=[
            "@daily",
            "0 6 * * 1-5",
            {"assets": ["s3://acme/sales/"]},
            {"cron": "0 3 * * *", "assets": {"any": ["s3://acme/sales/eu", "s3://acme/fx/"]}},
        ],
    )
    outlets: tuple[AssetUri, ...] = doc(
        "Assets (URIs) this pipeline updates: each successful run of the entry point emits an "
        "Airflow asset event for every one of them, which starts the pipelines whose schedule "
        "names it, and the Airflow UI draws the lineage.",
        tuple,
        examples=[["s3://acme/sales/daily"], ["file:///data/sales", "x-warehouse://sales"]],
    )
    start_date: date | None = doc(
        "First logical date of the schedule, as YYYY-MM-DD.",
        None,
        format="date",
        examples=["2026-01-01"],
    )
    catchup: bool = doc("Run the intervals between start_date and now.", False)
    retries: int = doc(
        "Retries of each task. A retry of the run task replaces a cluster that was lost.",
        0,
        minimum=0,
        maximum=100,
        examples=[2],
    )
    retry_delay: str = doc(
        "Wait this long before a retry.", "1m", pattern=DURATION_PATTERN, examples=["30s", "5m"]
    )
    retry_exponential_backoff: bool = doc(
        "Double the wait before each further retry (Airflow's exponential backoff).", False
    )
    timeout: str | None = doc(
        "Execution timeout of the run task, e.g. 1h or 90m.",
        None,
        pattern=DURATION_PATTERN,
        examples=["1h", "30m"],
    )
    dagrun_timeout: str | None = doc(
        "The whole run fails after this long. Airflow then skips the teardown task; the "
        "DAG's failure callback stops the cluster instead.",
        None,
        pattern=DURATION_PATTERN,
        examples=["2h"],
    )
    queue: str | None = doc(
        "Celery queue of the tasks that drive the cluster (cluster_up and run), so that big "
        "clusters are driven from big workers; bootstrap and teardown stay on the default "
        "queue. Only for executors with queues (CeleryExecutor).",
        None,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        examples=["big"],
    )
    params: dict[str, Any] = doc(
        "Keyword arguments of the entry point. They become Airflow DAG params (overridable at "
        "trigger time) and strings are rendered with Airflow's Jinja at run time ({{ ds }}). "
        "Write a plain value (its type becomes the param's type) or the long form, a mapping "
        "with 'default' and JSON Schema keywords: {default: 64, type: integer, minimum: 1, "
        "description: ...}.",
        dict,
        examples=[{"day": "{{ ds }}", "chunks": {"default": 64, "type": "integer", "minimum": 1}}],
        propertyNames={"pattern": IDENTIFIER_PATTERN},
        additionalProperties={
            "if": {"type": "object", "required": ["default"]},
            "then": {"$ref": "#/$defs/param"},
        },
    )
    cluster: ClusterSpec = doc("The Dask cluster.", ClusterSpec)
    origin: str = field(default="", metadata={"internal": True})
    """The YAML file this spec was read from (set by the loader, not by the user)."""

    @property
    def staged(self) -> bool:
        """Written with stages (else: one entry point, one cluster)."""
        return bool(self.stages)

    @property
    def entrypoints(self) -> tuple[str, ...]:
        """Every entry point the pipeline calls, each once, in the order written."""
        if not self.staged:
            return (self.entrypoint,)
        found = [step.entrypoint for stage in self.stages.values() for _, step in stage.all_steps]
        return tuple(dict.fromkeys(found))

    def for_stage(self, stage: str | None) -> PipelineSpec:
        """The spec as a stage's tasks see it: the stage's cluster and queue (None: as is)."""
        if stage is None:
            return self
        own = self.stages[stage]
        return replace(self, cluster=own.cluster, queue=own.queue or self.queue)

    def stage_order(self) -> list[str]:
        """Stage names with every stage after the stages it depends on (validation has ruled
        out cycles), otherwise in the order written."""
        done: list[str] = []
        pending = list(self.stages)
        while pending:
            ready = [n for n in pending if set(self.stages[n].depends_on) <= set(done)]
            if not ready:
                raise ValueError(f"stages depend on each other in a cycle: {pending}")
            done.append(ready[0])
            pending.remove(ready[0])
        return done

    def final_stages(self) -> list[str]:
        """The stages no other stage depends on: a run ends with their last steps."""
        needed = {name for stage in self.stages.values() for name in stage.depends_on}
        return [name for name in self.stages if name not in needed]

    def cluster_specs(self) -> dict[str | None, ClusterSpec]:
        """The cluster of each stage (key None: the one cluster of a pipeline with no stages)."""
        if not self.staged:
            return {None: self.cluster}
        return {name: stage.cluster for name, stage in self.stages.items()}

    @property
    def param_specs(self) -> dict[str, ParamSpec]:
        """Every param in its long form, with the type of a plain value filled in."""
        from dagfactory.spec.params import param_spec

        return {name: param_spec(value) for name, value in self.params.items()}

    @property
    def param_defaults(self) -> dict[str, Any]:
        return {name: spec.default for name, spec in self.param_specs.items()}

    @property
    def entry_module(self) -> str:
        return self.entrypoint.partition(":")[0]

    @property
    def entry_function(self) -> str:
        return self.entrypoint.partition(":")[2]


def parse_duration(text: str) -> timedelta:
    """'90m' -> timedelta(minutes=90), as Dask reads it (`dask.utils.parse_timedelta`)."""
    from dask.utils import parse_timedelta

    if not re.match(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 30m, 1.5h or 2d")
    return timedelta(seconds=parse_timedelta(text.strip()))


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648 bytes, as Dask reads it (`dask.utils.parse_bytes`)."""
    from dask.utils import parse_bytes

    if not re.match(SIZE_PATTERN, text):
        raise ValueError(f"{text!r} is not a size; write e.g. 512MiB or 2GiB")
    return int(parse_bytes(text.strip()))
