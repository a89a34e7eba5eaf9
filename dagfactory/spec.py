"""The pipeline spec: frozen dataclasses that are the single source of truth.

`schemas/pipeline.schema.json` is generated from these classes (`dagfactory schema`); the JSON
Schema keywords a field needs beyond its type live in the field's metadata.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

DURATION_PATTERN = r"^\s*(\d+\s*[dhms]\s*)+$"
SIZE_PATTERN = r"^\s*\d+(\.\d+)?\s*([kKMGT]i?B?|B)?\s*$"
ENTRYPOINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"
DAG_ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


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
        "Branch, tag or full commit sha. Resolved to a commit once per run. "
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
        "Airflow connection id whose login and password authenticate to an https:// remote "
        "(for the command line: the AIRFLOW_CONN_<ID> environment variable).",
        None,
        examples=["github_pipelines"],
    )


@dataclass(frozen=True)
class ClusterSpec:
    """The Dask cluster the entry point gets a client for."""

    backend: str = doc(
        "Cluster kind: 'local' starts scheduler and worker processes on this host; 'existing' "
        "connects to a scheduler someone else runs (needs 'address').",
        "local",
        examples=["local", "existing"],
    )
    workers: int = doc("Number of Dask workers.", 2, minimum=1, maximum=1000, examples=[4])
    cpu: int = doc(
        "Threads (local) or vCPUs (cloud) per worker.", 1, minimum=1, maximum=64, examples=[2]
    )
    memory: str = doc(
        "Memory per worker, e.g. 2GiB or 512MiB.",
        "2GiB",
        pattern=SIZE_PATTERN,
        examples=["2GiB", "512MiB"],
    )
    address: str | None = doc(
        "Scheduler address for the 'existing' backend.",
        None,
        examples=["tcp://10.0.0.5:8786"],
    )
    idle_timeout: str = doc(
        "A cluster with no task to run for this long stops itself, so that even a lost "
        "teardown cannot leave it running.",
        "1h",
        pattern=DURATION_PATTERN,
        examples=["30m", "2h"],
    )


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline file: a DAG that runs a git entry point on a Dask cluster."""

    source: SourceSpec = doc("Where the pipeline's code comes from.", _REQUIRED)
    entrypoint: str = doc(
        "The function to call, as module:function; it is called as function(client, **params).",
        _REQUIRED,
        pattern=ENTRYPOINT_PATTERN,
        examples=["wordcount.job:main"],
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
    schedule: str | None = doc(
        "Cron expression or Airflow preset (@daily, @hourly, ...); null runs only when triggered.",
        None,
        examples=["@daily", "0 6 * * 1-5"],
    )
    start_date: date | None = doc(
        "First logical date of the schedule, as YYYY-MM-DD.",
        None,
        format="date",
        examples=["2026-01-01"],
    )
    catchup: bool = doc("Run the intervals between start_date and now.", False)
    retries: int = doc("Retries of each task.", 0, minimum=0, maximum=100, examples=[2])
    timeout: str | None = doc(
        "Execution timeout of the run task, e.g. 1h or 90m.",
        None,
        pattern=DURATION_PATTERN,
        examples=["1h", "30m"],
    )
    params: dict[str, Any] = doc(
        "Keyword arguments of the entry point. They become Airflow DAG params (overridable at "
        "trigger time) and strings are rendered with Airflow's Jinja at run time ({{ ds }}). "
        "Names are text; values are plain JSON data.",
        dict,
        examples=[{"day": "{{ ds }}", "top": 5}],
    )
    cluster: ClusterSpec = doc("The Dask cluster.", ClusterSpec)
    origin: str = field(default="", metadata={"internal": True})
    """The YAML file this spec was read from (set by the loader, not by the user)."""

    @property
    def entry_module(self) -> str:
        return self.entrypoint.partition(":")[0]

    @property
    def entry_function(self) -> str:
        return self.entrypoint.partition(":")[2]


_DURATION_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "ki": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "mi": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "gi": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
    "ti": 1024**4,
}


def parse_duration(text: str) -> timedelta:
    """'1h30m' -> timedelta(hours=1, minutes=30)."""
    if not re.match(DURATION_PATTERN, text):
        raise ValueError(f"{text!r} is not a duration; write e.g. 90s, 30m, 1h or 1h30m")
    seconds = sum(int(n) * _DURATION_UNITS[u] for n, u in re.findall(r"(\d+)\s*([dhms])", text))
    return timedelta(seconds=seconds)


def parse_size(text: str) -> int:
    """'2GiB' -> 2147483648 bytes."""
    match = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size; write e.g. 512MiB or 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])
