"""What the Airflow UI says about a pipeline: the DAG page's docs and the link to a commit.

The docs are where a person decides whether to trust a pipeline, so they say in words what the
YAML file asks for: where the code comes from, what runs on which cluster, when, and with which
params. They are built for every pipeline at every parse, so they are plain string work, with
the one costly part (a cron in words) cached by expression.
"""

from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlsplit, urlunsplit

from dagfactory.spec.params import json_schema
from dagfactory.spec.pipeline import AssetCondition, PipelineSpec, ScheduleSpec

SOURCE_URL_VARIABLE = "DAGFACTORY_SOURCE_URL"
"""A URL template with {path} (the YAML file's path in the pipelines folder): a link to the file
in the forge that holds the pipelines folder. Airflow config: [dagfactory] source_url."""

PRESETS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@quarterly": "0 0 1 */3 *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
TIME = re.compile(r"\b\d{2}:\d{2}\b")
SCP_LIKE = re.compile(r"^(?:[^@/:]+@)?(?P<host>[^/:]+):(?P<path>[^/].*)$")
COMMIT_PATHS = {
    "github.com": "{repo}/commit/{sha}",
    "gitlab.com": "{repo}/-/commit/{sha}",
    "bitbucket.org": "{repo}/commits/{sha}",
}


def source_url_template() -> str:
    """The file link template: $DAGFACTORY_SOURCE_URL, else Airflow's [dagfactory] source_url.

    Read once per parse of the pipelines folder, not per pipeline.
    """
    template = os.environ.get(SOURCE_URL_VARIABLE)
    if template is None:
        from airflow.configuration import conf

        template = conf.get("dagfactory", "source_url", fallback="") or ""
    return template


def doc_md(spec: PipelineSpec, folder: str | Path | None = None, source_url: str = "") -> str:
    """The DAG page's docs: a table of what the pipeline is and does, then its params.

    folder: the pipelines folder, for the file's path in it; source_url: a template with
    {path} that makes that path a link.
    """
    source = spec.source
    reqs = source.requirements
    rows = [
        ("owner", spec.owner),
        ("file", _file(spec.origin, folder, source_url)),
        ("git", _code(safe_url(source.git))),
        ("ref", _code(source.ref or "HEAD") + " (resolved to one commit at the start of each run)"),
    ]
    if source.subdir:
        rows.append(("subdir", _code(source.subdir)))
    if reqs:
        rows.append(("requirements", _code(reqs if isinstance(reqs, str) else " ".join(reqs))))
    if spec.staged:
        for name in spec.stage_order():
            rows.append((f"stage {name}", _stage(spec, name)))
    else:
        rows.append(("entry point", f"`{spec.entrypoint}(client, **params)`"))
        rows.append(("cluster", _cluster(spec)))
    rows.append(("schedule", schedule_words(spec)))
    if spec.outlets:
        updates = ", ".join(_code(uri) for uri in spec.outlets)
        rows.append(("outlets", f"a successful run updates {updates}"))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    text = f"{spec.description}\n\n| | |\n|---|---|\n{table}\n".lstrip()
    params = _params_table(spec)
    return f"{text}\n{params}" if params else text


def _file(origin: str, folder: str | Path | None, source_url: str) -> str:
    path = Path(origin)
    try:
        relative = PurePosixPath(path.relative_to(folder)) if folder else PurePosixPath(path.name)
    except ValueError:  # a file outside the folder (a test's, say): its name says enough
        relative = PurePosixPath(path.name)
    if not source_url:
        return _code(str(relative))
    return f"[{_code(str(relative))}]({source_url.replace('{path}', quote(str(relative)))})"


def safe_url(url: str) -> str:
    """A git URL without what may be a secret: user and password, query and fragment.

    Credentials belong in an Airflow connection, but a URL with a token in it must not end
    up on a page everyone with read access sees. scp-like addresses (git@host:path) keep
    their user, which names an SSH account, not a secret.
    """
    if "://" not in url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def commit_url(git: str, commit: str) -> str:
    """The commit's page on a known forge (github.com, gitlab.com, bitbucket.org), else ''."""
    if "://" in git:
        parts = urlsplit(git)
        if parts.scheme not in ("https", "http", "ssh", "git"):
            return ""
        host, path = (parts.hostname or "").lower(), parts.path
    else:
        match = SCP_LIKE.match(git)
        if not match:
            return ""
        host, path = match["host"].lower(), match["path"]
    repo = path.strip("/").removesuffix(".git")
    if host not in COMMIT_PATHS or not repo or not re.fullmatch(r"[0-9a-fA-F]{7,64}", commit):
        return ""
    return f"https://{host}/" + COMMIT_PATHS[host].format(repo=repo, sha=commit)


def _stage(spec: PipelineSpec, name: str) -> str:
    stage = spec.stages[name]
    cluster = spec.for_stage(name).cluster
    after = f" after {', '.join(stage.depends_on)}" if stage.depends_on else ""
    calls = " then ".join(
        " and ".join(f"`{step}` ({s.entrypoint})" for step, s in group) for group in stage.groups
    )
    return (
        f"a {cluster.backend} cluster of {_workers(spec.for_stage(name))}{after}: {calls}; "
        f"workers of {cluster.cpu} cpu, {cluster.memory}"
    )


def _workers(spec: PipelineSpec) -> str:
    cluster = spec.cluster
    if cluster.adaptive:
        return f"{cluster.adaptive.minimum}-{cluster.adaptive.maximum} workers (adaptive)"
    return f"{cluster.workers} worker{'s' if cluster.workers != 1 else ''}"


def _cluster(spec: PipelineSpec) -> str:
    cluster = spec.cluster
    return f"{cluster.backend}: {_workers(spec)} x {cluster.cpu} cpu, {cluster.memory}"


def schedule_words(spec: PipelineSpec) -> str:
    """When the pipeline runs, as a person says it ("every day at 03:00 UTC")."""
    schedule = spec.schedule
    if schedule is None:
        return "only when triggered"
    if isinstance(schedule, ScheduleSpec):
        when = f"when {_condition_words(schedule.asset_condition)} updated"
        if schedule.cron is None:
            return when
        return f"{cron_words(schedule.cron, _timezone(spec))}, and also {when}"
    return cron_words(schedule, _timezone(spec))


def _timezone(spec: PipelineSpec) -> str:
    """The timezone Airflow gives a cron written as a string (build._schedule): UTC for a start
    date, which dagfactory writes in UTC, else the deployment's default_timezone."""
    if spec.start_date:
        return "UTC"
    from airflow import settings

    return getattr(settings.TIMEZONE, "name", None) or str(settings.TIMEZONE)


@lru_cache(maxsize=1024)
def cron_words(expression: str, timezone: str) -> str:
    """A cron or preset in words, with its times in `timezone`, and as written."""
    if expression == "@once":
        return "once"
    if expression == "@continuous":
        return "continuously: a new run as soon as the last one ends"
    from cron_descriptor import CasingTypeEnum, ExpressionDescriptor

    cron = PRESETS.get(expression, expression)
    try:
        words = ExpressionDescriptor(
            expression=cron, casing_type=CasingTypeEnum.Sentence, use_24hour_time_format=True
        ).get_description()
    except Exception:  # validation accepted it, Airflow runs it: show it as written
        return f"on `{expression}`"
    words = words[0].lower() + words[1:]
    fields = cron.split()
    if words.startswith("at ") and len(fields) == 5 and fields[2:] == ["*", "*", "*"]:
        words = "every day " + words
    words = TIME.sub(lambda m: f"{m.group()} {timezone}", words)
    return f"{words} (`{expression}`)"


def _condition_words(condition: AssetCondition, nested: bool = False) -> str:
    """`a` and (`b` or `c`): the condition as a person reads it (top level ends in a verb)."""
    words = [
        _code(item) if isinstance(item, str) else _condition_words(item, nested=True)
        for item in condition.items
    ]
    if len(words) == 1:
        return words[0] + ("" if nested else " is")
    text = f" {'or' if condition.kind == 'any' else 'and'} ".join(words)
    if nested:
        return f"({text})"
    return text + (" is" if condition.kind == "any" else " are")


def _params_table(spec: PipelineSpec) -> str:
    params = spec.param_specs
    if not params:
        return ""
    rows = []
    for name, param in params.items():
        kinds = json_schema(param).get("type", "")
        kind = " or ".join(kinds) if isinstance(kinds, list) else kinds
        if param.minimum is not None or param.maximum is not None:
            low, high = (_number(v) for v in (param.minimum, param.maximum))
            kind += (
                f", {low} to {high}"
                if low and high
                else f", {'at least ' + low if low else 'at most ' + high}"
            )
        default = json.dumps(param.default, sort_keys=True, default=str)
        about = ": ".join(filter(None, (param.title, param.description)))
        if param.enum:
            about = f"{about} One of {', '.join(json.dumps(v) for v in param.enum)}.".lstrip()
        rows.append(f"| {_code(name)} | {kind} | {_code(default)} | {_cell(about)} |")
    return (
        "**Params** (a run triggered with a config can set other values)\n\n"
        "| param | type | default | description |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else str(value)


def _code(text: str) -> str:
    """Inline code in a markdown table cell (a '|' would end the cell)."""
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _cell(text: str) -> str:
    """Plain text in a markdown table cell: one line, no cell end."""
    return " ".join(text.split()).replace("|", "\\|")
