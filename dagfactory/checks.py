"""Rules a spec must follow that JSON Schema cannot express.

Each rule looks at a typed PipelineSpec and yields (field path, message) pairs; the loader turns
them into located problems. Messages say what is wrong and what to write instead.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from urllib.parse import urlsplit

from dagfactory.spec import PipelineSpec

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
_BAD_REF = re.compile(
    r"(^-)|(^/)|(/$)|(\.\.)|(//)|(@\{)|([\x00-\x20\x7f~^:?*\[\\])|(\.lock$)|(\.$)"
)


def check_spec(spec: PipelineSpec) -> Iterator[Finding]:
    """Every rule below, in the order a reader meets the fields."""
    yield from _check_source(spec)
    yield from _check_schedule(spec)
    yield from _check_cluster(spec)


def _check_source(spec: PipelineSpec) -> Iterator[Finding]:
    git = spec.source.git.strip()
    if git.startswith("-"):
        yield ("source", "git"), f"{git!r} starts with '-' and would be read as an option"
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*::", git):
        yield (
            ("source", "git"),
            (
                f"{git!r} uses a git remote helper ('{git.split('::')[0]}::'), which can run "
                "commands; use an https://, ssh://, file:// URL or a path"
            ),
        )
    elif "://" in git:
        url = urlsplit(git)
        if url.scheme not in ("https", "http", "ssh", "git", "file"):
            yield (
                ("source", "git"),
                (
                    f"URL scheme {url.scheme!r} is not supported; use https://, ssh://, git://, "
                    "file:// or a path"
                ),
            )
        if url.username or url.password:
            yield (
                ("source", "git"),
                (
                    "the URL contains credentials; remove them and put them in an Airflow "
                    "connection (see 'source.connection' in the README)"
                ),
            )
    ref = spec.source.ref
    if ref is not None and (not ref.strip() or _BAD_REF.search(ref)):
        yield (
            ("source", "ref"),
            (f"{ref!r} is not a valid git ref name; write a branch, a tag or a full commit sha"),
        )
    yield from _check_relative(("source", "subdir"), spec.source.subdir)
    if isinstance(spec.source.requirements, str):
        yield from _check_relative(("source", "requirements"), spec.source.requirements)


def _check_relative(path: FieldPath, value: str) -> Iterator[Finding]:
    if not value:
        return
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:[\\/]", value):
        yield path, f"{value!r} is absolute; write a path relative to the repository"
    elif posixpath.normpath(value.replace("\\", "/")).split("/")[0] == "..":
        yield path, f"{value!r} leaves the repository ('..'); write a path inside it"


def _check_schedule(spec: PipelineSpec) -> Iterator[Finding]:
    schedule = spec.schedule
    if schedule is None:
        return
    if schedule.startswith("@"):
        if schedule not in SCHEDULE_PRESETS:
            yield (
                ("schedule",),
                (f"unknown preset {schedule!r}; use one of {', '.join(SCHEDULE_PRESETS)}"),
            )
        return
    from croniter import croniter

    if len(schedule.split()) != 5 or not croniter.is_valid(schedule):
        yield (
            ("schedule",),
            (
                f"{schedule!r} is not a cron expression; write five fields "
                "'minute hour day-of-month month day-of-week', e.g. '0 6 * * 1-5', or a preset "
                "such as @daily"
            ),
        )


def _check_cluster(spec: PipelineSpec) -> Iterator[Finding]:
    from dagfactory.backends import backend_exists, backend_names

    cluster = spec.cluster
    if not backend_exists(cluster.backend):
        yield (
            ("cluster", "backend"),
            (f"unknown backend {cluster.backend!r}; use one of {', '.join(backend_names())}"),
        )
    if cluster.backend == "existing" and not cluster.address:
        yield (
            ("cluster", "address"),
            ("the 'existing' backend needs the scheduler's address, e.g. tcp://10.0.0.5:8786"),
        )
    if cluster.address and not re.match(r"^(tcp|tls|ucx|ws|wss)://[^\s/]+:\d+/?$", cluster.address):
        yield (
            ("cluster", "address"),
            (f"{cluster.address!r} is not a scheduler address; write e.g. tcp://host:8786"),
        )
