"""`dagfactory validate | schema | render | run`.

`run` goes through the same steps as the Airflow tasks (`steps.py`), so a pipeline that runs on a
laptop runs the same way in Airflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from dagfactory.errors import DagfactoryError, SpecError, SpecProblem
from dagfactory.load import (
    SUFFIXES,
    LoadResult,
    load_file,
    load_files,
    pipeline_files,
    read_defaults,
)

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- validate ---------------------------------------------------------------------------------


def _collect(paths: list[str]) -> LoadResult:
    """Load every file named, and every pipeline file of every folder named."""
    files: list[tuple[Path, str]] = []
    defaults_by_dir: dict[Path, dict[str, Any]] = {}
    problems: list[SpecProblem] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            files += [(p, os.path.join(given, p.name)) for p in pipeline_files(path)]
        elif path.is_file():
            files.append((path, given))
        else:
            raise FileNotFoundError(given)
    specs = []
    for folder in sorted({p.parent for p, _ in files}):
        try:
            defaults_by_dir[folder] = read_defaults(folder)
        except SpecError as exc:
            problems.extend(exc.problems)
            defaults_by_dir[folder] = {}
    for folder, defaults in defaults_by_dir.items():
        result = load_files([f for f in files if f[0].parent == folder], defaults)
        specs += result.specs
        problems += result.problems
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.dag_id in seen:
            problems.append(
                SpecProblem(
                    spec.origin,
                    f"DAG id {spec.dag_id!r} is also used by {seen[spec.dag_id]}",
                    1,
                    1,
                    "dag_id",
                )
            )
        seen.setdefault(spec.dag_id, spec.origin)
    return LoadResult(tuple(specs), tuple(problems))


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        result = _collect(args.paths or ["pipelines"])
    except FileNotFoundError as exc:
        _err(f"dagfactory validate: no such file or folder: {exc.args[0]}")
        return EXIT_USAGE
    problems = sorted(result.problems, key=lambda p: (p.file, p.line, p.column))
    if args.format == "json":
        print(json.dumps([p.__dict__ for p in problems], indent=2))
    else:
        for p in problems:
            if args.format == "github":
                print(
                    f"::error file={p.file},line={p.line or 1},col={p.column or 1}::"
                    f"{(p.field + ': ') if p.field else ''}{p.message}"
                )
            else:
                print(p)
        files = len(result.specs) + len({p.file for p in problems})
        summary = (
            f"{len(problems)} error(s) in {len({p.file for p in problems})} of {files} file(s)"
        )
        print(
            summary if problems else f"{len(result.specs)} pipeline file(s) valid", file=sys.stderr
        )
    return EXIT_INVALID if problems else EXIT_OK


# --- schema / render -------------------------------------------------------------------------


def cmd_schema(args: argparse.Namespace) -> int:
    from dagfactory.schema import schema_text

    if args.write:
        Path(args.write).write_text(schema_text())
    else:
        sys.stdout.write(schema_text())
    return EXIT_OK


def _load_one(path: str) -> Any:
    file = Path(path)
    if not file.is_file() or file.suffix not in SUFFIXES:
        raise FileNotFoundError(path)
    return load_file(file, read_defaults(file.parent), shown_as=path)


def cmd_render(args: argparse.Namespace) -> int:
    """Print the spec as the DAG will see it: defaults merged, every field filled in."""
    import dataclasses

    spec = _load_one(args.file)
    print(json.dumps(dataclasses.asdict(spec), indent=2, default=str))
    return EXIT_OK


# --- run -------------------------------------------------------------------------------------


def _parse_params(pairs: list[str]) -> dict[str, Any]:
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise DagfactoryError(f"-p {pair!r}: write -p name=value")
        params[name] = yaml.safe_load(value) if value else ""
    return params


def _render(params: dict[str, Any], dag_id: str, run_id: str) -> dict[str, Any]:
    """The Jinja rendering Airflow does at run time, with the macros a laptop run can know."""
    import jinja2

    now = datetime.now(UTC)
    context = {
        "ds": now.strftime("%Y-%m-%d"),
        "ds_nodash": now.strftime("%Y%m%d"),
        "ts": now.isoformat(),
        "logical_date": now,
        "run_id": run_id,
        "dag": {"dag_id": dag_id},
        "params": params,
    }
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)

    def render(value: Any) -> Any:
        if isinstance(value, str):
            return env.from_string(value).render(context)
        if isinstance(value, dict):
            return {k: render(v) for k, v in value.items()}
        if isinstance(value, list):
            return [render(v) for v in value]
        return value

    return render(params)


def cmd_run(args: argparse.Namespace) -> int:
    from dagfactory import steps
    from dagfactory.workspace import credentials_from_env

    spec = _load_one(args.file)
    overrides = _parse_params(args.param or [])
    unknown = sorted(set(overrides) - set(spec.params))
    if unknown:
        raise DagfactoryError(
            f"-p {', '.join(unknown)}: not a param of {args.file}; "
            f"declared params: {', '.join(spec.params) or 'none'}"
        )
    run_id = f"cli_{datetime.now(UTC):%Y%m%dT%H%M%S}_{os.getpid()}"
    key = f"{spec.dag_id}__{run_id}"
    params = _render({**spec.params, **overrides}, spec.dag_id, run_id)
    credentials = credentials_from_env(spec.source.connection)
    started = time.monotonic()

    def step(name: str) -> None:
        _err(f"[dagfactory] {name} ({time.monotonic() - started:.1f}s)")

    step("bootstrap")
    commit = steps.bootstrap(spec, credentials, _err)["commit"]
    step("cluster_up")
    handle = steps.cluster_up(spec, commit, key, credentials, _err)
    try:
        step("run")
        result = steps.run(spec, commit, handle, params, credentials, _err)
    finally:
        step("teardown")
        steps.teardown(spec, handle, key)
        step("done")
    print(json.dumps(result), flush=True)
    return EXIT_OK


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dagfactory", description="Data pipelines from YAML on Airflow 3 and Dask."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check pipeline files; exit 1 if any is invalid")
    p.add_argument("paths", nargs="*", help="files or folders (default: pipelines/)")
    p.add_argument("--format", choices=["text", "github", "json"], default="text")
    p.set_defaults(func=cmd_validate)
    p = sub.add_parser("schema", help="print the JSON Schema of a pipeline file")
    p.add_argument("--write", metavar="FILE", help="write it to FILE instead")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("render", help="print a pipeline's spec with defaults filled in")
    p.add_argument("file")
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("run", help="run a pipeline end to end on this machine, no Airflow needed")
    p.add_argument("file")
    p.add_argument("-p", "--param", action="append", metavar="NAME=VALUE", help="override a param")
    p.set_defaults(func=cmd_run)
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
    except DagfactoryError as exc:
        _err(f"dagfactory {args.command}: error: {exc}")
        return EXIT_INVALID
    except KeyboardInterrupt:
        _err(f"dagfactory {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
