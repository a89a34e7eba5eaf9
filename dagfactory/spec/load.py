"""Pipeline files in, typed specs and located errors out.

One bad file never hides another: `load_folder` returns every valid spec *and* every problem,
and no mistake in a file (nor a bug in a check) escapes as an exception, because in Airflow's
DAG processor an exception would hide every pipeline of the folder at once.

A pipelines folder is a tree: every `defaults.yml` from its top down to a pipeline file's folder
applies to that file, outermost first, each followed by its profile if one is chosen.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import dacite
import jsonschema

from dagfactory.errors import SpecError, SpecProblem
from dagfactory.spec.checks import FieldPath, check_data, check_spec, merge_mappings, stage_cluster
from dagfactory.spec.pipeline import PipelineSpec
from dagfactory.spec.schema import pipeline_schema
from dagfactory.spec.yamlfile import YamlFile, read_yaml

DEFAULTS_FILE = "defaults.yml"
SUFFIXES = (".yml", ".yaml")
PIPELINES_DIR_VARIABLE = "DAGFACTORY_PIPELINES_DIR"
PROFILE_VARIABLE = "DAGFACTORY_PROFILE"
# Outside $DAGFACTORY_PIPELINES_DIR, the nearest folder of this name is a file's pipelines folder.
PIPELINES_FOLDER_NAME = "pipelines"
PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

# What a pattern-checked field must look like, in words.
_PATTERN_HINTS = {
    "entrypoint": "must be module:function, e.g. wordcount.job:main",
    "timeout": "must be a duration such as 90s, 30m, 1.5h or 2d (a number, then a unit)",
    "idle_timeout": "must be a duration such as 90s, 30m, 1.5h or 2d (a number, then a unit)",
    "retry_delay": "must be a duration such as 90s, 30m, 1.5h or 2d (a number, then a unit)",
    "dagrun_timeout": "must be a duration such as 90s, 30m, 1.5h or 2d (a number, then a unit)",
    "memory": "must be a size such as 512MiB or 2GiB",
    "dag_id": "may only hold letters, digits, '_', '.' and '-'",
}
_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "boolean": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}
# Names people bring from other tools, and the key that means the same here.
_KNOWN_ALIASES = {
    "branch": "ref",
    "tag": "ref",
    "commit": "ref",
    "sha": "ref",
    "revision": "ref",
    "url": "git",
    "repo": "git",
    "repository": "git",
    "path": "subdir",
    "directory": "subdir",
    "schedule_interval": "schedule",
    "cron": "schedule",
    "entry_point": "entrypoint",
    "function": "entrypoint",
    "callable": "entrypoint",
    "n_workers": "workers",
    "threads": "cpu",
    "threads_per_worker": "cpu",
    "memory_limit": "memory",
    "scheduler": "address",
    "scheduler_address": "address",
    "execution_timeout": "timeout",
    "arguments": "params",
    "kwargs": "params",
    "args": "params",
    "or": "any",
    "and": "all",
}
_EXAMPLE_VALUES = {"source": "{git: https://github.com/acme/pipelines.git}"}
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "y", "n"}


_DACITE = dacite.Config(strict=True, cast=[tuple], type_hooks={date: date.fromisoformat})


@dataclass(frozen=True)
class LoadResult:
    specs: tuple[PipelineSpec, ...]
    problems: tuple[SpecProblem, ...]


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = pipeline_schema()
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def is_pipeline_name(name: str) -> bool:
    """A file of this name in a pipelines folder is a pipeline (not defaults, not hidden)."""
    return name.endswith(SUFFIXES) and name != DEFAULTS_FILE and not name.startswith((".", "_"))


def pipeline_files(folder: Path) -> list[Path]:
    """The pipeline files of one folder (not its subfolders), sorted."""
    return sorted(p for p in folder.iterdir() if is_pipeline_name(p.name) and p.is_file())


def pipeline_folders(
    root: Path, unreadable: list[SpecProblem] | None = None
) -> Iterator[tuple[Path, list[str]]]:
    """Each folder of a pipelines tree with the sorted names of its files: the top first, then
    each subfolder (in name order) with everything below it.

    Folders starting with '.' or '_' are skipped, like such files (drafts, .git, __pycache__),
    and so are symlinked folders (a link back up would never end). A subfolder that cannot be
    listed becomes a problem in `unreadable` (if given) instead of an exception that would hide
    the whole tree; the top folder itself must be readable.
    """
    with os.scandir(root) as listing:
        entries = sorted(listing, key=lambda e: e.name)
    yield root, [e.name for e in entries if e.is_file()]
    for entry in entries:
        if entry.is_dir(follow_symlinks=False) and not entry.name.startswith((".", "_")):
            try:
                yield from pipeline_folders(root / entry.name, unreadable)
            except OSError as exc:
                if unreadable is None:
                    raise
                problem = SpecProblem(str(root / entry.name), f"cannot list: {exc.strerror}")
                unreadable.append(problem)


def pipeline_tree(root: Path) -> list[Path]:
    """Every pipeline file of a pipelines folder and its subfolders, in `pipeline_folders` order."""
    return [
        folder / name
        for folder, names in pipeline_folders(root, [])
        for name in names
        if is_pipeline_name(name)
    ]


def files_named(root: Path, stem: str) -> list[Path]:
    """The pipeline files of a tree (as `pipeline_tree` finds them) named stem.yml or stem.yaml.

    No file is read and only the matches are sorted: this runs at every task start.
    """
    wanted = {stem + suffix for suffix in SUFFIXES if is_pipeline_name(stem + suffix)}
    found: list[Path] = []
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                for entry in listing:
                    if entry.name in wanted and entry.is_file():
                        found.append(folder / entry.name)
                    elif entry.name[0] not in "._" and entry.is_dir(follow_symlinks=False):
                        folders.append(folder / entry.name)
        except OSError:
            if folder == root:
                raise
    return sorted(found)


def pipelines_root(file: Path) -> Path | None:
    """The pipelines folder a file belongs to, whose defaults files apply from the top down.

    $DAGFACTORY_PIPELINES_DIR when it is set and holds the file (as in Airflow), else the
    nearest folder named `pipelines` that holds it. None outside of both: the file then gets
    only the defaults.yml next to it. Airflow's loader needs no rule: its folder is the top.
    """
    folder = file.resolve().parent
    top = os.environ.get(PIPELINES_DIR_VARIABLE)
    if top:
        top_path = Path(top).resolve()
        if top_path == folder or top_path in folder.parents:
            return top_path
    return next((f for f in (folder, *folder.parents) if f.name == PIPELINES_FOLDER_NAME), None)


def shown_folder(shown_file: str, levels: int) -> str:
    """How the folder `levels` above a file's own folder is shown, given how the file is shown."""
    folder = os.path.dirname(shown_file)
    return os.path.normpath(os.path.join(folder, *[".."] * levels)) if levels else folder


@dataclass(frozen=True)
class Profile:
    """The profile chosen for this process, and where the choice came from (for messages)."""

    name: str
    origin: str


def selected_profile(given: str | None = None) -> Profile | None:
    """`--profile NAME` if given, else $DAGFACTORY_PROFILE, else none (empty means none)."""
    if given:
        return Profile(given, "--profile")
    name = os.environ.get(PROFILE_VARIABLE, "").strip()
    return Profile(name, PROFILE_VARIABLE) if name else None


@dataclass(frozen=True)
class DefaultsFile:
    """One checked defaults.yml: the keys it sets, and its profiles (name -> keys)."""

    doc: YamlFile
    data: dict[str, Any]
    profiles: dict[str, dict[str, Any]]

    @property
    def shown(self) -> str:
        return self.doc.path

    def profile_line(self, name: str) -> int:
        return self.doc.locate(("profiles", name), key=True)[0]


def read_defaults_file(folder: Path, shown_as: str | None = None) -> DefaultsFile | None:
    """A folder's `defaults.yml` (None if absent), checked on its own.

    Every key it sets, in itself and in each profile, must be valid; none is required, so that
    a mistake in it is reported at its line in it, not in every pipeline file below it.
    """
    path = folder / DEFAULTS_FILE
    if not path.is_file():
        return None
    doc = read_yaml(path, shown_as)
    data = {k: v for k, v in doc.data.items() if k != "profiles"}
    problems = _partial_problems(doc, data, ())
    profiles: dict[str, dict[str, Any]] = {}
    given = doc.data.get("profiles", {})
    if not isinstance(given, dict):
        problems.append(
            _locate(
                doc,
                ("profiles",),
                f"must be a mapping of profile names to settings, not {_describe(given)}; "
                "write e.g. profiles: {dev: {cluster: {backend: local}}}",
            )
        )
        given = {}
    for name, settings in given.items():
        at = ("profiles", name)
        if not isinstance(name, str) or not PROFILE_NAME.fullmatch(name):
            message = (
                f"{name!r} is not a profile name; use letters, digits, '_', '.' and '-', "
                "starting with a letter or digit"
            )
            problems.append(_locate(doc, at, message, key=True))
        elif not isinstance(settings, dict):
            message = (
                f"a profile must be a mapping of settings, not {_describe(settings)}; "
                f"write {name}: {{}} for a profile that changes nothing"
            )
            problems.append(_locate(doc, at, message, key=True))
        else:
            problems += _partial_problems(doc, settings, at)
            profiles[name] = settings
    if problems:
        raise SpecError(sorted(problems, key=lambda p: (p.line, p.column)))
    return DefaultsFile(doc, data, profiles)


def _partial_problems(doc: YamlFile, data: dict[str, Any], at: FieldPath) -> list[SpecProblem]:
    """Problems of settings that are merged under pipelines (defaults, a profile): no key is
    required, every key given must be valid, and none may set what must differ per pipeline."""
    checked = {k: v for k, v in data.items() if k != "profiles"}
    problems = [
        _problem(doc, f._replace(field=(*at, *f.field)))
        for f in _schema_findings(_jsonable(checked))
        if not f.missing
    ]
    if "dag_id" in data:
        message = (
            "a default dag_id would give every pipeline the same DAG id; set dag_id in "
            "each pipeline file instead"
        )
        problems.append(_locate(doc, (*at, "dag_id"), message, key=True))
    if at and "profiles" in data:
        # At the value: YamlFile.locate would stop at the outer `profiles` key for this path.
        message = "profiles do not nest; put this profile's settings here directly"
        problems.append(_locate(doc, (*at, "profiles"), message))
    return problems


class Defaults:
    """The defaults.yml files that apply to pipeline files, each read and checked once.

    root: the pipelines folder of every file given (Airflow's loader folder, whose files are
    listed from it); None: each file's own, found by `pipelines_root`.
    """

    def __init__(self, profile: Profile | None = None, root: Path | None = None):
        self.profile = profile
        self.root = root
        self.problems: list[SpecProblem] = []
        """The problems of every broken defaults file read so far, each file's once."""
        self._read: dict[Path, DefaultsFile | SpecError | None] = {}

    def check(self, folder: Path, shown_as: str) -> DefaultsFile | None:
        """The folder's defaults file, read once; raises SpecError if it is broken."""
        if folder not in self._read:
            try:
                self._read[folder] = read_defaults_file(folder, shown_as)
            except SpecError as exc:
                self._read[folder] = exc
                self.problems.extend(exc.problems)
        found = self._read[folder]
        if isinstance(found, SpecError):
            raise found
        return found

    def chain(self, path: Path, shown: str) -> list[DefaultsFile]:
        """The defaults files of a pipeline file, outermost first.

        Raises SpecError with one problem of the pipeline file when one of them is broken, so
        that each pipeline below a broken defaults file shows as broken, and only those.
        """
        folders = self._folders(path)
        found = []
        for levels, folder in zip(range(len(folders) - 1, -1, -1), folders, strict=True):
            try:
                defaults = self.check(
                    folder, os.path.join(shown_folder(shown, levels), DEFAULTS_FILE)
                )
            except SpecError as exc:
                raise SpecError(blocked_by_defaults([(path, shown)], exc.problems)) from None
            if defaults is not None:
                found.append(defaults)
        return found

    def merged(self, path: Path, shown: str) -> dict[str, Any]:
        """What a pipeline is merged over: each defaults file, then its profile, outer first."""
        files = self.chain(path, shown)
        merged: dict[str, Any] = {}
        for defaults in files:
            merged = merge_mappings(merged, defaults.data)
            if self.profile and self.profile.name in defaults.profiles:
                merged = merge_mappings(merged, defaults.profiles[self.profile.name])
        if self.profile and not any(self.profile.name in d.profiles for d in files):
            raise SpecError([_unknown_profile(self.profile, files, shown)])
        return merged

    def _folders(self, path: Path) -> list[Path]:
        """The folders from the file's pipelines folder down to its own."""
        if self.root is not None:
            root, folder = self.root, path.parent
        else:
            folder = path.resolve().parent
            root = pipelines_root(path) or folder
        try:
            parts = folder.relative_to(root).parts
        except ValueError:
            return [folder]
        folders = [root]
        for part in parts:
            folders.append(folders[-1] / part)
        return folders


def _unknown_profile(profile: Profile, files: list[DefaultsFile], shown: str) -> SpecProblem:
    """The chosen profile is defined in no defaults file of this pipeline: say which exist.

    It is a problem of each pipeline file it affects (not a silent fallback to no profile,
    which would run a production pipeline with a laptop's settings).
    """
    chosen = f"profile {profile.name!r} (from {profile.origin})"
    unset = "unset DAGFACTORY_PROFILE" if profile.origin == PROFILE_VARIABLE else "drop --profile"
    defined: dict[str, DefaultsFile] = {}
    for defaults in files:
        for name in defaults.profiles:
            defined.setdefault(name, defaults)
    if defined:
        close = difflib.get_close_matches(profile.name, list(defined), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listed = ", ".join(
            f"{name} ({d.shown}:{d.profile_line(name)})" for name, d in sorted(defined.items())
        )
        message = (
            f"{chosen} is defined in no defaults file of this pipeline; {hint}"
            f"profiles defined: {listed}"
        )
    elif files:
        message = (
            f"{chosen} is defined in no defaults file of this pipeline, and none of them "
            f"({', '.join(d.shown for d in files)}) has profiles; add profiles: "
            f"{{{profile.name}: {{...}}}} to one of them, or {unset}"
        )
    else:
        message = (
            f"{chosen} is defined nowhere: no defaults.yml applies to this pipeline; add one "
            f"with profiles: {{{profile.name}: {{...}}}} to its folder, or {unset}"
        )
    return SpecProblem(shown, message, 1, 1)


def load_folder(
    folder: str | Path, shown_as: str | None = None, profile: Profile | None = None
) -> LoadResult:
    """Load every pipeline file of a pipelines folder and its subfolders; never raises for a
    user's mistake. Every defaults file of the tree is checked, even one no pipeline uses."""
    folder = Path(folder)
    shown = Path(shown_as) if shown_as is not None else folder
    defaults = Defaults(profile, root=folder)
    unreadable: list[SpecProblem] = []
    files: list[tuple[Path, str]] = []
    for sub, names in pipeline_folders(folder, unreadable):
        shown_sub = shown / sub.relative_to(folder)
        if DEFAULTS_FILE in names:
            # A broken one is kept in defaults.problems; the files below it say they are blocked.
            with contextlib.suppress(SpecError):
                defaults.check(sub, str(shown_sub / DEFAULTS_FILE))
        files += [(sub / name, str(shown_sub / name)) for name in names if is_pipeline_name(name)]
    result = load_files(files, defaults)
    return LoadResult(result.specs, (*unreadable, *result.problems))


def load_pipeline(
    path: str | Path, shown_as: str | None = None, defaults: Defaults | None = None
) -> PipelineSpec:
    """One pipeline file with the defaults files of its pipelines folder, as Airflow loads it.

    Raises SpecError with every problem: the file's, and those of a broken defaults file.
    """
    path = Path(path)
    result = load_files([(path, shown_as or str(path))], defaults or Defaults(selected_profile()))
    if result.problems:
        raise SpecError(result.problems)
    return result.specs[0]


def blocked_by_defaults(
    files: Iterable[tuple[Path, str]], problems: tuple[SpecProblem, ...]
) -> tuple[SpecProblem, ...]:
    """One problem per pipeline file that cannot be loaded because its defaults file is broken.

    Each file gets its own problem so that Airflow shows every affected pipeline as broken,
    instead of the pipelines silently disappearing.
    """
    first = problems[0]
    return tuple(
        SpecProblem(
            shown,
            f"not loaded because {first.file} is invalid (line {first.line}: {first.message}); "
            "fix that file first",
            1,
            1,
        )
        for _, shown in files
    )


def load_files(
    files: Iterable[tuple[Path, str]],
    defaults: dict[str, Any] | Defaults,
    taken: dict[str, str] | None = None,
) -> LoadResult:
    """Load (path, name shown in messages) pairs, then check DAG ids are unique across them.

    defaults: merged under every file alike, or the defaults files of each file's folders
    (whose own problems then come first in the result). taken: as in `unique_dag_ids`.
    """
    loaded: list[tuple[PipelineSpec, str]] = []
    problems: list[SpecProblem] = []
    for path, shown in files:
        try:
            merged = defaults.merged(path, shown) if isinstance(defaults, Defaults) else defaults
            loaded.append((load_file(path, merged, shown_as=shown), shown))
        except SpecError as exc:
            problems.extend(exc.problems)
        except Exception as exc:  # a bug in a check must not take the other pipelines down
            problems.append(
                SpecProblem(
                    shown,
                    f"dagfactory could not check this file ({type(exc).__name__}: {exc}); "
                    "this is a bug in dagfactory, please report it",
                    1,
                    1,
                )
            )
    specs, duplicates = unique_dag_ids(loaded, taken)
    found = defaults.problems if isinstance(defaults, Defaults) else []
    return LoadResult(tuple(specs), tuple(found + problems + duplicates))


def unique_dag_ids(
    loaded: Iterable[tuple[PipelineSpec, str]], taken: dict[str, str] | None = None
) -> tuple[list[PipelineSpec], list[SpecProblem]]:
    """Keep the first spec of each DAG id; every later one is a problem of its own file.

    taken: DAG ids already claimed by files that are not being loaded (name shown by id).
    """
    first_seen: dict[str, str] = dict(taken or {})
    specs: list[PipelineSpec] = []
    problems: list[SpecProblem] = []
    for spec, shown in loaded:
        if spec.dag_id not in first_seen:
            first_seen[spec.dag_id] = shown
            specs.append(spec)
            continue
        line, column, given = _dag_id_position(spec, shown)
        problems.append(
            SpecProblem(
                shown,
                f"DAG id {spec.dag_id!r} (from {given}) is already used by "
                f"{first_seen[spec.dag_id]}; set a different dag_id or rename the file",
                line,
                column,
                "dag_id",
            )
        )
    return specs, problems


def declared_dag_id(path: Path) -> str | None:
    """The DAG id a pipeline file claims, read cheaply (None if the file cannot be read)."""
    try:
        dag_id = read_yaml(path).data.get("dag_id", path.name.rsplit(".", 1)[0])
    except SpecError:
        return None
    return dag_id if isinstance(dag_id, str) else None


def _dag_id_position(spec: PipelineSpec, shown: str) -> tuple[int, int, str]:
    """(line, column, where the id comes from) of a file's DAG id, read again on this error path."""
    try:
        doc = read_yaml(spec.origin, shown)
    except SpecError:
        return 1, 1, "its file name"
    if "dag_id" not in doc.data:
        return 1, 1, "its file name"
    return (*doc.locate(("dag_id",)), "its dag_id")


def load_file(
    path: str | Path, defaults: dict[str, Any] | None = None, shown_as: str | None = None
) -> PipelineSpec:
    """Read, validate and type one pipeline file. Raises SpecError with every problem found."""
    path = Path(path)
    doc = read_yaml(path, shown_as)
    data = merge_mappings(defaults or {}, doc.data)
    from_file_name = "dag_id" not in data
    data.setdefault("dag_id", path.name.rsplit(".", 1)[0])
    data = _jsonable(data)
    findings = list(_schema_findings(data))
    problems = [_problem(doc, f) for f in findings]
    # The rules beyond the schema run even when the schema found problems, on the document
    # without the fields it refused, so that one pass reports every problem of the file.
    flagged = [f.field for f in findings]

    def unflagged(field: FieldPath) -> bool:
        return not any(field[: len(bad)] == bad or bad[: len(field)] == field for bad in flagged)

    problems += [
        _locate(doc, written_at(data, f), m, key=True) for f, m in check_data(data) if unflagged(f)
    ]
    try:
        typed = with_stage_clusters(_without(data, flagged))
        spec = dacite.from_dict(PipelineSpec, typed, config=_DACITE)
    except (dacite.DaciteError, ValueError) as exc:
        if not problems:  # the schema should have caught it
            field = tuple((getattr(exc, "field_path", None) or "").split("."))
            raise SpecError([_locate(doc, field, f"invalid value: {exc}")]) from None
    else:
        spec = dataclasses.replace(spec, origin=str(path.resolve()))
        problems += [
            _locate(doc, written_at(data, f), m) for f, m in check_spec(spec) if unflagged(f)
        ]
    if from_file_name:
        problems = [_file_name_problem(p, path) if p.field == "dag_id" else p for p in problems]
    if problems:
        # A rule about a cluster setting that every stage inherits is reported once, where it
        # is written.
        unique = dict.fromkeys(problems)
        raise SpecError(sorted(unique, key=lambda p: (p.line, p.column)))
    return spec


# Stand-ins for required values the schema found missing or wrong, so that the other rules can
# still look at the rest of the file; nothing is reported about them.
_STAND_INS = {"source": {"git": "."}, "git": ".", "entrypoint": "module:function"}


def _without(data: dict[str, Any], fields: list[FieldPath]) -> dict[str, Any]:
    """data without the values at `fields` (defaults take their place; stand-ins if required).

    A field inside a list takes the whole list with it.
    """
    data = copy.deepcopy(data)
    for field in fields:
        node: Any = data
        holder: tuple[dict[str, Any], Any] | None = None
        for part in field:
            if not isinstance(node, dict):
                break
            if part not in node:
                if part in _STAND_INS:
                    node[part] = copy.deepcopy(_STAND_INS[part])
                holder = None
                break
            holder, node = (node, part), node[part]
        if holder is not None:
            parent, key = holder
            parent.pop(key)
            if key in _STAND_INS:
                parent[key] = copy.deepcopy(_STAND_INS[key])
    return data


def with_stage_clusters(data: dict[str, Any]) -> dict[str, Any]:
    """data with each stage's cluster merged over the pipeline's: what the stage runs on."""
    stages = data.get("stages")
    if not isinstance(stages, dict):
        return data
    top = data.get("cluster") if isinstance(data.get("cluster"), dict) else {}
    merged = {
        name: {**stage, "cluster": stage_cluster(top, stage.get("cluster"))}
        if isinstance(stage, dict)
        else stage
        for name, stage in stages.items()
    }
    return {**data, "stages": merged}


def written_at(data: dict[str, Any], field: FieldPath) -> FieldPath:
    """Where a finding about `field` points: a stage's cluster setting that the stage does not
    write itself comes from the pipeline's cluster, and is shown there."""
    if len(field) < 4 or field[0] != "stages" or field[2] != "cluster":
        return field
    stage = (data.get("stages") or {}).get(field[1])
    own = stage.get("cluster") if isinstance(stage, dict) else None
    if isinstance(own, dict) and field[3] in own:
        return field
    return ("cluster", *field[3:])


def _file_name_problem(problem: SpecProblem, path: Path) -> SpecProblem:
    return dataclasses.replace(
        problem,
        message=f"the DAG id comes from the file name {path.name!r}, and a DAG id may only hold "
        "letters, digits, '_', '.' and '-'; rename the file or set dag_id",
    )


def _jsonable(value: Any) -> Any:
    """YAML dates become ISO strings, so the schema (and JSON) sees what the user wrote."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


class _Finding(NamedTuple):
    """One schema violation: the field, where to point, and what to say."""

    field: FieldPath
    message: str
    at_key: bool = False
    missing: bool = False
    """A required key is absent; it is located at the mapping that lacks it."""


def _schema_findings(data: dict[str, Any]) -> Iterator[_Finding]:
    """Every schema violation of data, in words a person can act on."""
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    for error in errors:
        path = tuple(error.absolute_path)
        name = str(path[-1]) if path else ""
        if error.validator == "additionalProperties":
            allowed = list(error.schema.get("properties", {}))
            for key in sorted(set(error.instance) - set(allowed), key=str):
                message = f"unknown key {key!r}; {_suggest(key, allowed)}"
                if key == "profiles" and not path:
                    message = (
                        "profiles belong in a defaults.yml, not in a pipeline file: move this "
                        "block to the defaults.yml of this folder or of one above it, and choose "
                        "a profile with DAGFACTORY_PROFILE or --profile"
                    )
                yield _Finding((*path, key), message, at_key=True)
        elif error.validator == "required":
            missing = error.message.split("'")[1]
            hint = _add_hint(missing, error.schema["properties"].get(missing, {}))
            message = f"missing required key {missing!r}; {hint}"
            yield _Finding((*path, missing), message, at_key=True, missing=True)
        elif error.validator == "type":
            expected = error.validator_value
            kinds = [expected] if isinstance(expected, str) else expected
            wanted = " or ".join(_TYPE_NAMES.get(k, k) for k in kinds)
            yield _Finding(path, _type_message(name, kinds, wanted, error.instance))
        elif error.validator == "pattern" and "propertyNames" in error.schema_path:
            message = (
                f"{error.instance!r} is not a param name: params are keyword arguments of the "
                "entry point; use letters, digits and '_', not starting with a digit"
            )
            yield _Finding((*path, error.instance), message, at_key=True)
        elif error.validator == "pattern":
            hint = _PATTERN_HINTS.get(name, f"must match {error.validator_value}")
            yield _Finding(path, f"{error.instance!r} {hint}")
        elif error.validator in ("minimum", "maximum"):
            word = "at least" if error.validator == "minimum" else "at most"
            yield _Finding(path, f"must be {word} {error.validator_value}, not {error.instance}")
        elif error.validator == "format" and error.validator_value == "date":
            message = f"{error.instance!r} is not a date; write YYYY-MM-DD, e.g. 2026-01-31"
            yield _Finding(path, message)
        elif error.validator == "minLength":
            example = (error.schema.get("examples") or [None])[0]
            hint = f"; write e.g. {name}: {example}" if example else ""
            yield _Finding(path, f"must not be empty{hint}")
        elif error.validator == "anyOf":
            words = next((o["enum"] for o in error.validator_value if "enum" in o), None)
            wanted = (
                f"one of {', '.join(words)} (or a list of them)"
                if words
                else "a string or a list of strings"
            )
            yield _Finding(path, f"must be {wanted}, not {_describe(error.instance)}")
        else:
            yield _Finding(path, error.message)


def _suggest(key: Any, allowed: list[str]) -> str:
    alias = _KNOWN_ALIASES.get(str(key).lower())
    if alias in allowed:
        return f"did you mean {alias!r}?"
    close = difflib.get_close_matches(str(key).lower().replace("-", "_"), allowed, n=1)
    return f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed)}"


def _add_hint(missing: str, prop: dict[str, Any]) -> str:
    if missing in _EXAMPLE_VALUES:
        return f"add e.g. {missing}: {_EXAMPLE_VALUES[missing]}"
    if prop.get("examples"):
        return f"add e.g. {missing}: {prop['examples'][0]}"
    return f"add {missing}: ..."


def _type_message(name: str, kinds: list[str], wanted: str, value: Any) -> str:
    """'must be X, not Y' plus what to write, for the mistakes YAML makes easy."""
    message = f"must be {wanted}, not {_describe(value)}"
    if "string" in kinds and isinstance(value, (int, float, bool)):
        if name in _PATTERN_HINTS:
            return f"{message}; it {_PATTERN_HINTS[name]}"
        return f"{message}; put the value in quotes so YAML keeps it as text"
    if "integer" in kinds and isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return f"{message}; write the number without quotes"
    if "integer" in kinds and isinstance(value, float):
        return f"{message}; write a whole number"
    if "boolean" in kinds and isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return f"{message}; write true or false without quotes"
    if "array" in kinds and isinstance(value, (str, int, float)):
        return f"{message}; write a list, e.g. [{value}]"
    if value is None:
        return f"{message}; write a value after the ':' or remove the key"
    if "object" in kinds and name in _EXAMPLE_VALUES:
        return f"{message}; write e.g. {name}: {_EXAMPLE_VALUES[name]}"
    if "object" in kinds and name == "params":
        return f"{message}; write name: value pairs, e.g. params: {{chunks: 64}}"
    return message


def _describe(value: Any) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null (an empty value)"
    return f"{kind.get(type(value), type(value).__name__)} ({value!r})"


def _problem(doc: YamlFile, finding: _Finding) -> SpecProblem:
    """The finding located in the file; a missing key at the mapping that should hold it."""
    at = finding.field[:-1] if finding.missing else finding.field
    line, column = doc.locate(at, key=finding.at_key and bool(at))
    return SpecProblem(doc.path, finding.message, line, column, ".".join(map(str, finding.field)))


def _locate(doc: YamlFile, path: FieldPath, message: str, key: bool = False) -> SpecProblem:
    line, column = doc.locate(path, key=key)
    return SpecProblem(doc.path, message, line, column, ".".join(map(str, path)))
