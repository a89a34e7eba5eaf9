"""`dagfactory validate | schema | render | run | new | clusters | teardown | prune`.

`run` goes through the same steps as the Airflow tasks (`steps.py`), so a pipeline that runs on a
laptop runs the same way in Airflow.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dagfactory.errors import DagfactoryError, SpecError, SpecProblem
from dagfactory.spec.load import (
    DEFAULTS_FILE,
    SUFFIXES,
    Defaults,
    LoadResult,
    declared_dag_id,
    is_pipeline_name,
    load_files,
    load_pipeline,
    pipeline_files,
    pipeline_folders,
    pipeline_tree,
    pipelines_root,
    selected_profile,
    shown_folder,
)
from dagfactory.spec.pipeline import PipelineSpec

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- validate ---------------------------------------------------------------------------------


class UsageError(Exception):
    """The command line names something that cannot be validated (exit 2, not 1)."""


@dataclass
class _Selection:
    """What validate checks, by real path, shown as given: pipeline files, and the folders
    whose defaults file is checked even if no pipeline file named needs it."""

    files: dict[Path, str] = field(default_factory=dict)
    defaults: dict[Path, str] = field(default_factory=dict)
    unreadable: list[SpecProblem] = field(default_factory=list)


def _collect(paths: list[str]) -> _Selection:
    """Every pipeline file named or below a folder named, shown as given.

    A defaults file named on its own (as pre-commit does when only it changed) brings in every
    pipeline below its folder: they are what a change to it can break.
    """
    chosen = _Selection()

    def add_tree(folder: Path, shown_dir: str) -> int:
        count = 0
        for sub, names in pipeline_folders(folder, chosen.unreadable):
            relative = sub.relative_to(folder)
            shown_sub = os.path.join(shown_dir, relative) if relative.parts else shown_dir
            if DEFAULTS_FILE in names:
                chosen.defaults.setdefault(sub.resolve(), os.path.join(shown_sub, DEFAULTS_FILE))
            for name in filter(is_pipeline_name, names):
                chosen.files.setdefault((sub / name).resolve(), os.path.join(shown_sub, name))
                count += 1
        return count

    for given in paths:
        path = Path(given)
        try:
            if path.is_dir():
                if not add_tree(path, given):
                    raise UsageError(f"no pipeline files (*.yml, *.yaml) in {given}")
            elif path.is_file() and path.name == DEFAULTS_FILE:
                chosen.defaults[path.parent.resolve()] = given
                add_tree(path.parent, os.path.dirname(given))
            elif path.is_file():
                chosen.files[path.resolve()] = given
            else:
                raise UsageError(f"no such file or folder: {given}")
        except OSError as exc:
            raise UsageError(f"cannot read {given}: {exc.strerror}") from None
    return chosen


def _validate(chosen: _Selection, defaults: Defaults) -> LoadResult:
    """Load every chosen file with its defaults files; DAG ids must be unique across all of them
    and the other files of their pipelines folders."""
    for folder, shown in chosen.defaults.items():
        with contextlib.suppress(SpecError):  # kept in defaults.problems
            defaults.check(folder, shown)
    # Files not named (pre-commit passes only changed ones) still claim their DAG ids.
    taken: dict[str, str] = {}
    tops: set[Path] = set()
    for path, shown in chosen.files.items():
        root = pipelines_root(path)
        top = root or path.parent
        if top in tops:
            continue
        tops.add(top)
        shown_top = shown_folder(shown, len(path.parent.relative_to(top).parts))
        for other in pipeline_tree(top) if root else pipeline_files(top):
            if other.resolve() not in chosen.files and (dag_id := declared_dag_id(other)):
                taken.setdefault(dag_id, os.path.join(shown_top, other.relative_to(top)))
    result = load_files(chosen.files.items(), defaults, taken)
    return LoadResult(result.specs, (*chosen.unreadable, *result.problems))


def _github_annotation(problem: SpecProblem) -> str:
    """A GitHub Actions error annotation; its data and properties have their own escaping."""

    def data(text: str) -> str:
        return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")

    def prop(text: str) -> str:
        return data(text).replace(":", "%3A").replace(",", "%2C")

    message = f"{problem.field}: {problem.message}" if problem.field else problem.message
    return (
        f"::error file={prop(problem.file)},line={problem.line or 1},col={problem.column or 1},"
        f"title={prop('dagfactory validate')}::{data(message)}"
    )


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        chosen = _collect(args.paths or ["pipelines"])
    except UsageError as exc:
        _err(f"dagfactory validate: {exc}")
        return EXIT_USAGE
    result = _validate(chosen, Defaults(selected_profile(args.profile)))
    problems = sorted(result.problems, key=lambda p: (p.file, p.line, p.column))
    if args.format == "json":
        print(json.dumps([dataclasses.asdict(p) for p in problems], indent=2))
    else:
        for p in problems:
            print(_github_annotation(p) if args.format == "github" else p)
        checked = len(chosen.files)
        bad = len({p.file for p in problems})
        summary = f"{len(problems)} error(s) in {bad} file(s); {checked} pipeline file(s) checked"
        _err(summary if problems else f"{checked} pipeline file(s) valid")
    return EXIT_INVALID if problems else EXIT_OK


# --- schema / render -------------------------------------------------------------------------


def cmd_schema(args: argparse.Namespace) -> int:
    from dagfactory.spec.schema import installed_schema_path, schema_text

    if args.path:
        print(installed_schema_path())
    elif args.write:
        Path(args.write).write_text(schema_text())
    else:
        sys.stdout.write(schema_text())
    return EXIT_OK


def _pipeline_file(path: str) -> Path:
    file = Path(path)
    if not file.is_file() or file.suffix not in SUFFIXES:
        raise FileNotFoundError(path)
    return file


def _load_one(path: str, profile: str | None = None) -> PipelineSpec:
    """One pipeline file with its defaults files and profile, as Airflow builds it."""
    return load_pipeline(_pipeline_file(path), path, Defaults(selected_profile(profile)))


def cmd_render(args: argparse.Namespace) -> int:
    """Print the spec as the DAG will see it: defaults merged, every field filled in."""
    file = _pipeline_file(args.file)
    defaults = Defaults(selected_profile(args.profile))
    spec = load_pipeline(file, args.file, defaults)
    applied = ", ".join(d.shown for d in defaults.chain(file, args.file)) or "none"
    chosen = f"; profile: {defaults.profile.name}" if defaults.profile else ""
    _err(f"defaults files: {applied}{chosen}")
    try:
        print(json.dumps(dataclasses.asdict(spec), indent=2, default=str), flush=True)
    except BrokenPipeError:  # `dagfactory render ... | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


# --- run -------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from dagfactory.run.command import run_pipeline

    spec = _load_one(args.file, args.profile)
    return run_pipeline(spec, args.param or [], worktree=args.worktree)


# --- new -------------------------------------------------------------------------------------

_NEW_TEMPLATE = """\
{schema_line}description: {description}
schedule: null                # cron, a preset such as "@daily", null: only when triggered,
                              # or {{assets: [s3://bucket/path]}}: when another pipeline updates it
source:
  git: {git}
  # ref: main                 # branch, tag or commit; default: the remote's HEAD
  # requirements: requirements.txt
entrypoint: {entrypoint}
params: {{}}                    # keyword arguments of the entry point
cluster:
  backend: local              # local | existing (with address: tcp://host:8786) | fargate
  workers: 2
  cpu: 1
  memory: 2GiB
  # adaptive: {{minimum: 1, maximum: 8}}   # let Dask scale the workers with the work
# Several steps and clusters: replace entrypoint with stages (README: "Stages"):
# stages:
#   prepare:
#     cluster: {{workers: 8}}
#     steps:
#       - extract: {{entrypoint: jobs.extract:main, params: {{day: "{{{{ ds }}}}"}}}}
#       - clean: {{entrypoint: jobs.clean:main, params: {{rows: "{{{{ steps.extract.rows }}}}"}}}}
#   model:
#     depends_on: [prepare]
#     prewarm: true
#     steps:
#       - train: {{entrypoint: jobs.train:main}}
"""


def cmd_new(args: argparse.Namespace) -> int:
    """Write a commented pipeline file that validates as it is, and that editors check."""
    from dagfactory.spec.schema import locate_schema, write_schema

    folder = Path(args.dir)
    target = folder / f"{args.name}.yml"
    if target.exists():
        raise UsageError(f"{target} exists already; pick another name or edit it")
    schema = locate_schema(folder)
    text = _NEW_TEMPLATE.format(
        schema_line=f"# yaml-language-server: $schema={schema.reference}\n",
        description=json.dumps(args.description or f"The {args.name} pipeline"),
        git=json.dumps(args.git),
        entrypoint=args.entrypoint,
    )
    folder.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    try:
        load_pipeline(target, str(target))
    except SpecError:
        target.unlink()
        raise
    if not schema.exists:
        write_schema(schema.path)
        _err(f"wrote {schema.path}: the schema editors check pipeline files against")
    elif schema.stale:
        _err(
            f"note: {schema.path} differs from this dagfactory's schema; to update it: "
            f"dagfactory schema --write {schema.path}"
        )
    print(target)
    return EXIT_OK


# --- clusters / prune / teardown ------------------------------------------------------------


def cmd_teardown(args: argparse.Namespace) -> int:
    """Stop one run's cluster by its run id (or key), from any host: what the teardown task
    does, for a run whose teardown never ran (a SIGKILLed `dagfactory run`, a lost host)."""
    from dagfactory.run import steps

    spec = _load_one(args.file, args.profile)
    key = args.key or steps.run_key(spec.dag_id, args.run_id)
    steps.teardown_run(spec, key)
    for stage, cluster in spec.cluster_specs().items():
        print(f"cluster {steps.stage_key(key, stage)} ({cluster.backend}) stopped")
    return EXIT_OK


def cmd_clusters(args: argparse.Namespace) -> int:
    """List this home's clusters on this host; stop one or all of them through their backend."""
    from dagfactory.backends import census

    if args.stop or args.stop_all:
        if args.stop_all:
            stopped = census.stop_all()
        else:
            info = census.stop(args.stop)
            if info is None:
                known = ", ".join(c.key for c in census.census()) or "none"
                raise UsageError(f"no cluster {args.stop!r} on this host; clusters here: {known}")
            stopped = [info]
        if args.format == "json":
            print(json.dumps([c.to_json() for c in stopped], indent=2))
        for c in stopped if args.format == "text" else []:
            print(f"stopped {c.key} ({c.state}, {c.processes} process(es))")
        if not stopped and args.format == "text":
            _err("no clusters to stop")
        return EXIT_OK
    clusters = census.census()
    if args.format == "json":
        print(json.dumps([c.to_json() for c in clusters], indent=2))
    elif clusters:
        print(census.table(clusters))
    else:
        _err(f"no clusters of {census.clusters_root().parent} on this host")
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    """Remove checkouts, virtualenvs, git mirrors and Dask performance reports older than --days
    days."""
    import time

    from dagfactory.run.prune import prune, report_lines

    now = time.time()
    report = prune(args.days, dry_run=args.dry_run, now=now)
    for line in report_lines(report, args.days, args.dry_run, now):
        print(line)
    return EXIT_OK


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _profile_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile",
        metavar="NAME",
        help="apply this profile of the defaults files (default: $DAGFACTORY_PROFILE)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dagfactory", description="Data pipelines from YAML on Airflow 3 and Dask."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check pipeline files; exit 1 if any is invalid")
    p.add_argument("paths", nargs="*", help="files or folders (default: pipelines/)")
    p.add_argument("--format", choices=["text", "github", "json"], default="text")
    _profile_option(p)
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("schema", help="print the JSON Schema of a pipeline file")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--write", metavar="FILE", help="write it to FILE instead")
    what.add_argument("--path", action="store_true", help="print the installed schema file's path")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("render", help="print a pipeline's spec with defaults filled in")
    p.add_argument("file")
    _profile_option(p)
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("run", help="run a pipeline end to end on this machine, no Airflow needed")
    p.add_argument("file")
    p.add_argument(
        "-p", "--param", action="append", metavar="NAME=VALUE",
        help="a param's value, read by its type: text as it is, numbers, true/false, JSON lists",
    )  # fmt: skip
    p.add_argument(
        "--worktree",
        action="store_true",
        help="run a local repository's working tree as it is, uncommitted changes included",
    )
    _profile_option(p)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("new", help="write a new pipeline file to start from")
    p.add_argument("name", help="the file name, and so the DAG id")
    p.add_argument("--git", required=True, help="URL or path of the code's git repository")
    p.add_argument("--entrypoint", required=True, metavar="MODULE:FUNCTION")
    p.add_argument("--description", default="")
    p.add_argument("--dir", default="pipelines", help="the pipelines folder (default: pipelines)")
    p.set_defaults(func=cmd_new)
    p = sub.add_parser("clusters", help="list the clusters started from here; stop them")
    p.add_argument("--stop", metavar="KEY", help="stop the cluster with this key")
    p.add_argument("--stop-all", action="store_true", help="stop every cluster listed")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=cmd_clusters)
    p = sub.add_parser("teardown", help="stop one run's cluster by its run id, from anywhere")
    p.add_argument("file", help="the pipeline file")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="the Airflow run id (or dagfactory run's cli_... id)")
    which.add_argument("--key", help="the run key, as the run's log shows it")
    _profile_option(p)
    p.set_defaults(func=cmd_teardown)
    p = sub.add_parser(
        "prune", help="remove cached checkouts, virtualenvs, git mirrors and Dask reports unused"
    )
    p.add_argument(
        "--days", type=float, default=30, help="not used for this many days (default 30)"
    )
    p.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    p.set_defaults(func=cmd_prune)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except SpecError as exc:
        _err(str(exc))
        return EXIT_INVALID
    except FileNotFoundError as exc:
        _err(f"dagfactory {args.command}: no such pipeline file: {exc.args[0]}")
        return EXIT_USAGE
    except UsageError as exc:
        _err(f"dagfactory {args.command}: {exc}")
        return EXIT_USAGE
    except DagfactoryError as exc:
        _err(f"dagfactory {args.command}: error: {exc}")
        return EXIT_INVALID
    except KeyboardInterrupt:
        _err(f"dagfactory {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
