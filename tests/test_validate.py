"""The corpus of invalid specs under tests/invalid/, and `dagfactory validate` as CI runs it.

Each corpus file starts with `# expect: LINE:COL: fragment`: loading it must fail with a
problem at that position whose text contains the fragment. A folder under tests/invalid/ is
one case of several files (duplicate DAG ids, a broken defaults file); there, files without
an `# expect:` line must load.
"""

from __future__ import annotations

import json
import re
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest

from dagfactory.errors import SpecError
from dagfactory.spec.load import load_file, load_folder, pipeline_files
from dagfactory.spec.yamlfile import MAX_FILE_BYTES
from tests.conftest import ROOT, write_pipeline
from tests.test_cli import dagfactory

CORPUS = ROOT / "tests" / "invalid"
_EXPECT = re.compile(r"^# expect: (\d+):(\d+): (.+)$")


@dataclass(frozen=True)
class Expected:
    path: Path
    line: int
    column: int
    fragment: str

    @property
    def shown(self) -> str:
        """The file as `dagfactory validate tests/invalid/...` names it."""
        return str(self.path.relative_to(ROOT))


def _expectation(path: Path) -> Expected | None:
    raw = path.read_bytes()
    text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("latin-1")
    match = _EXPECT.match(text.split("\n", 1)[0])
    return Expected(path, int(match[1]), int(match[2]), match[3]) if match else None


SINGLE = [_expectation(p) for p in pipeline_files(CORPUS)]
FOLDERS = sorted(p for p in CORPUS.iterdir() if p.is_dir())
ALL = SINGLE + [e for f in FOLDERS for p in sorted(f.iterdir()) if (e := _expectation(p))]


def test_the_corpus_is_large_and_every_file_says_what_it_expects():
    assert len(ALL) >= 60
    missing = [p.name for p in pipeline_files(CORPUS) if _expectation(p) is None]
    assert missing == []


def _matches(problem, expected: Expected) -> bool:
    return (problem.line, problem.column) == (expected.line, expected.column) and (
        expected.fragment in str(problem)
    )


@pytest.mark.parametrize("expected", SINGLE, ids=lambda e: e.path.name)
def test_each_invalid_file_fails_at_its_line_with_its_message(expected):
    with pytest.raises(SpecError) as err:
        load_file(expected.path)
    problems = err.value.problems
    assert any(_matches(p, expected) for p in problems), "\n".join(map(str, problems))
    assert all(p.line >= 1 and p.column >= 1 for p in problems)
    assert all(p.file == str(expected.path) for p in problems)


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_each_invalid_folder_reports_the_file_at_fault_and_loads_the_rest(folder):
    result = load_folder(folder)
    files = sorted(folder.iterdir())
    expected = [e for p in files if (e := _expectation(p))]
    for e in expected:
        assert any(p.file == str(e.path) and _matches(p, e) for p in result.problems), "\n".join(
            map(str, result.problems)
        )
    broken = {e.path.name for e in expected}
    assert {Path(p.file).name for p in result.problems} == broken
    loaded = {Path(s.origin).name for s in result.specs}
    assert loaded == {p.name for p in pipeline_files(folder)} - broken


def test_validate_reports_the_whole_corpus_in_one_pass_as_file_line_col():
    out = dagfactory("validate", "tests/invalid", *(str(f.relative_to(ROOT)) for f in FOLDERS))
    assert out.returncode == 1
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stdout.splitlines()
    for e in ALL:
        prefix = f"{e.shown}:{e.line}:{e.column}: error: "
        hits = [line for line in lines if line.startswith(prefix)]
        assert any(e.fragment in line for line in hits), f"{prefix}{e.fragment}"
    assert all(re.match(r"^[^:]+:\d+:\d+: error: ", line) for line in lines), lines
    checked = len(SINGLE) + sum(len(pipeline_files(f)) for f in FOLDERS)
    assert f"{checked} pipeline file(s) checked" in out.stderr


# --- the bounds a hostile file runs into --------------------------------------------------


def test_billion_laughs_fails_fast_and_small():
    path = CORPUS / "yaml_billion_laughs.yml"
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(SpecError, match="billion laughs"):
        load_file(path)
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # A naive expansion takes minutes and gigabytes; these bounds are loose on purpose.
    assert elapsed < 5
    assert peak < 50 * 1024 * 1024


def test_a_file_over_the_size_bound_is_refused_before_parsing(tmp_path):
    path = tmp_path / "huge.yml"
    filler = "# " + "x" * 98 + "\n"
    path.write_text(
        "source: {git: x}\nentrypoint: a.b:c\n" + filler * (MAX_FILE_BYTES // len(filler) + 1)
    )
    assert path.stat().st_size > MAX_FILE_BYTES
    with pytest.raises(SpecError) as err:
        load_file(path)
    (problem,) = err.value.problems
    assert problem.line == 1 and "more than the 1024 KiB" in problem.message


def test_no_subprocess_goes_through_a_shell():
    """No value from YAML may reach a shell: every subprocess gets an argument list."""
    shell = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|getoutput\(|getstatusoutput\(")
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sorted((ROOT / "dagfactory").rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if shell.search(line)
    ]
    assert offenders == []


# --- what must stay valid (the checks must not cry wolf) -----------------------------------

VALID_VARIANTS = {
    "ssh_url_with_user": "source: {git: 'ssh://git@github.com/acme/pipelines.git'}",
    "scp_like_url": "source: {git: 'git@github.com:acme/pipelines.git'}",
    "relative_path": "source: {git: ../examples/wordcount}",
    "file_url": "source: {git: 'file:///srv/git/pipelines.git'}",
    "slashed_ref": "source: {git: x, ref: feature/rollup-1.2}",
    "sha_ref": "source: {git: x, ref: 0123456789abcdef0123456789abcdef01234567}",
    "nested_subdir": "source: {git: x, subdir: jobs/sales/../rollup}",
    "requirements_list": "source: {git: x, requirements: ['pandas>=2', pyarrow]}",
    "kubernetes_memory": "source: {git: x}\ncluster: {memory: 2Gi}",
    "cron_weekdays": "source: {git: x}\nschedule: '0 6 * * 1-5'",
    "preset": "source: {git: x}\nschedule: '@weekly'",
    "quoted_date": "source: {git: x}\nstart_date: '2026-01-31'",
    "quoted_jinja": "source: {git: x}\nparams: {day: '{{ ds }}'}",
    "existing_backend": "source: {git: x}\ncluster: {backend: existing, address: 'tcp://10.0.0.5:8786'}",
    "merge_key": "params:\n  base: &base {git: x}\nsource:\n  <<: *base\n  ref: main",
}


@pytest.mark.parametrize("body", VALID_VARIANTS.values(), ids=VALID_VARIANTS.keys())
def test_realistic_valid_variants_load(tmp_path, body):
    path = write_pipeline(tmp_path, "ok", body + "\nentrypoint: sales.rollup:main\n")
    assert load_file(path).entrypoint == "sales.rollup:main"


# --- the command line ------------------------------------------------------------------------


def test_file_is_shown_as_given_and_the_field_path_is_in_the_message():
    out = dagfactory("validate", "./tests/invalid/workers_zero.yml")
    assert out.returncode == 1
    assert out.stdout == (
        "./tests/invalid/workers_zero.yml:11:12: error: cluster.workers: must be at least 1, "
        "not 0\n"
    )
    assert "1 error(s) in 1 file(s); 1 pipeline file(s) checked" in out.stderr


def test_files_of_a_folder_are_shown_joined_to_the_folder_given(tmp_path):
    folder = tmp_path / "pipes"
    write_pipeline(folder, "bad", "source: {git: x}\nentrypoint: a.b:c\ncluster: {cpu: 0}\n")
    out = dagfactory("validate", "pipes/", cwd=tmp_path)
    assert out.stdout.startswith("pipes/bad.yml:3:16: error: cluster.cpu: must be at least 1")


def test_valid_files_exit_0():
    out = dagfactory("validate", "pipelines/wordcount.yml", "pipelines")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == "" and "2 pipeline file(s) valid" in out.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "no/such/folder"],
        ["validate", "--format", "xml", "pipelines"],
        ["validate", "--frobnicate"],
        ["validate", "dags"],
    ],
    ids=["missing-path", "bad-format", "bad-flag", "folder-without-pipelines"],
)
def test_usage_errors_exit_2_without_a_traceback(args):
    out = dagfactory(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip()


def test_format_github_prints_workflow_annotations():
    out = dagfactory("validate", "--format", "github", "tests/invalid/workers_zero.yml")
    assert out.returncode == 1
    assert out.stdout == (
        "::error file=tests/invalid/workers_zero.yml,line=11,col=12,title=dagfactory validate"
        "::cluster.workers: must be at least 1, not 0\n"
    )


def test_format_github_escapes_what_the_annotation_syntax_reserves(tmp_path):
    body = "source: {git: x}\nentrypoint: a.b:c\ndag_id: ab\nschedule: '100%'\n"
    write_pipeline(tmp_path, "a,b", body)
    out = dagfactory("validate", "--format", "github", "a,b.yml", cwd=tmp_path)
    assert out.stdout.startswith("::error file=a%2Cb.yml,line=4,col=11,")
    assert "'100%25'" in out.stdout


def test_format_json_is_a_list_of_located_problems():
    out = dagfactory("validate", "--format", "json", "tests/invalid/workers_zero.yml", "pipelines")
    assert out.returncode == 1
    assert json.loads(out.stdout) == [
        {
            "file": "tests/invalid/workers_zero.yml",
            "message": "must be at least 1, not 0",
            "line": 11,
            "column": 12,
            "field": "cluster.workers",
        }
    ]


def test_format_json_of_valid_files_is_an_empty_list():
    out = dagfactory("validate", "--format", "json")
    assert out.returncode == 0 and json.loads(out.stdout) == []


def test_a_defaults_file_named_alone_checks_every_pipeline_it_feeds(tmp_path):
    folder = tmp_path / "pipelines"
    write_pipeline(folder, "job", "source: {git: x}\nentrypoint: a.b:c\n")
    (folder / "defaults.yml").write_text("cluster:\n  backend: existing\n")
    out = dagfactory("validate", "pipelines/defaults.yml", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stdout.startswith("pipelines/job.yml:")
    assert "'existing' backend needs the scheduler's address" in out.stdout


def test_duplicate_dag_ids_across_folders_name_both_files_as_given(tmp_path):
    for team in ("team_a", "team_b"):
        write_pipeline(tmp_path / team, "rollup", "source: {git: x}\nentrypoint: a.b:c\n")
    out = dagfactory("validate", "team_a", "team_b", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stdout == (
        "team_b/rollup.yml:1:1: error: dag_id: DAG id 'rollup' (from its file name) is already "
        "used by team_a/rollup.yml; set a different dag_id or rename the file\n"
    )


# --- in Airflow: every good DAG loads, every bad file is a visible, marked DAG -------------------

GOOD = """\
# yaml-language-server: $schema=../schemas/pipeline.schema.json
schedule: "@daily"
start_date: 2026-01-01
source:
  git: https://github.com/acme/pipelines.git
  ref: v1.0
entrypoint: sales.rollup:main
params: {{day: "{{{{ ds }}}}", n: {n}}}
"""


def test_a_mixed_folder_loads_every_good_dag_and_shows_every_bad_file(tmp_path, monkeypatch):
    import shutil

    from airflow.dag_processing.dagbag import DagBag

    from dagfactory.dag.build import INVALID_TAG

    folder = tmp_path / "pipelines"
    folder.mkdir()
    good = [f"good_{n}" for n in range(5)]
    for n, name in enumerate(good):
        (folder / f"{name}.yml").write_text(GOOD.format(n=n))
    bad = [e for e in ALL if e.path.parent == CORPUS or e.path.parent.name == "duplicate_dag_id"]
    for e in bad:
        shutil.copy(e.path, folder / e.path.name)
    shutil.copy(CORPUS / "duplicate_dag_id" / "a_rollup.yml", folder)
    monkeypatch.setenv("DAGFACTORY_PIPELINES_DIR", str(folder))

    bag = DagBag(dag_folder=str(ROOT / "dags"), safe_mode=True)

    assert bag.import_errors == {}
    for name in [*good, "sales_rollup"]:
        assert INVALID_TAG not in bag.dags[name].tags and "pipeline.run" in bag.dags[name].task_ids
    for e in bad:
        dag_id = re.sub(r"[^A-Za-z0-9_.-]+", "_", e.path.stem)
        dag = bag.dags[dag_id]
        assert INVALID_TAG in dag.tags
        assert f"{folder / e.path.name}:{e.line}:{e.column}: error: " in dag.doc_md
        assert e.fragment in dag.doc_md
        assert dag.description.startswith("INVALID pipeline file: ")
    assert len(bag.dags) == len(good) + 1 + len(bad)


def test_a_changed_file_alone_is_checked_against_its_siblings_dag_ids(tmp_path):
    """pre-commit passes only changed files; a new file must not reuse an old file's DAG id."""
    folder = tmp_path / "pipelines"
    write_pipeline(folder, "old", "dag_id: rollup\nsource: {git: x}\nentrypoint: a.b:c\n")
    write_pipeline(folder, "new", "source: {git: x}\nentrypoint: a.b:c\ndag_id: rollup\n")
    out = dagfactory("validate", "pipelines/new.yml", cwd=tmp_path)
    assert out.returncode == 1
    assert out.stdout.startswith(
        "pipelines/new.yml:3:9: error: dag_id: DAG id 'rollup' (from its dag_id) is already "
        "used by pipelines/old.yml"
    )


# --- for pipeline repositories: the pre-commit hook ----------------------------------------------


def test_pre_commit_hook_manifest_is_valid_and_runs_validate_on_pipeline_files():
    import subprocess
    import sys

    import yaml

    tool = Path(sys.executable).parent / "pre-commit"
    out = subprocess.run(
        [str(tool), "validate-manifest", ".pre-commit-hooks.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (hook,) = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "dagfactory-validate" and hook["entry"] == "dagfactory validate"
    assert hook["language"] == "python" and hook["pass_filenames"] is True
    files = re.compile(hook["files"])
    assert files.search("pipelines/wordcount.yml") and files.search("pipelines/a.yaml")
    assert not files.search("dags/pipelines.py") and not files.search("pipelines/README.md")
    # pre-commit runs the entry with the changed files appended.
    console = Path(sys.executable).parent / hook["entry"].split()[0]
    run = subprocess.run(
        [str(console), *hook["entry"].split()[1:], "pipelines/wordcount.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr
