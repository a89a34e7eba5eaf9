"""Nested defaults.yml files and profiles: the loader, the parsing-context path and the commands
(validate, render, run) read a pipeline file alike."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dagfactory.dag.build import INVALID_TAG
from dagfactory.spec.load import Profile, load_folder
from tests.conftest import write_pipeline

JOB = """\
source: {git: https://example.com/acme/jobs.git}
entrypoint: jobs.main:run
"""

OUTER = """\
owner: platform
retries: 1
cluster:
  workers: 4
  cpu: 2
profiles:
  dev:
    retries: 0
    cluster: {backend: local, workers: 1}
  prod:
    retries: 3
    owner: prod-outer
    queue: q-outer
    cluster: {backend: fargate, workers: 8, cpu: 1, memory: 4GiB, region: eu-west-2}
"""

INNER = """\
owner: team-etl
cluster:
  idle_timeout: 7m
profiles:
  prod:
    queue: q-inner
    cluster: {pool: etl-clusters, idle_timeout: 9m}
"""


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """pipelines/ with defaults at the top and in team/, a pipeline at every level."""
    root = tmp_path / "pipelines"
    write_pipeline(root, "top", JOB)
    (root / "defaults.yml").write_text(OUTER)
    (root / "team").mkdir()
    (root / "team" / "defaults.yml").write_text(INNER)
    write_pipeline(root / "team", "etl", JOB + "cluster: {pool: mine}\n")
    write_pipeline(root / "team" / "deep", "nested", JOB)
    write_pipeline(root / "other", "plain", JOB)
    return root


def _specs(root: Path, profile: str | None = None) -> dict:
    result = load_folder(root, profile=Profile(profile, "--profile") if profile else None)
    assert result.problems == (), "\n".join(map(str, result.problems))
    return {spec.dag_id: spec for spec in result.specs}


def dagfactory(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DAGFACTORY_PROFILE")}
    environ.pop("DAGFACTORY_PIPELINES_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "dagfactory.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**environ, **env},
    )


# --- the loader ---------------------------------------------------------------------------------


def test_every_defaults_file_applies_below_it_nearest_wins_key_by_key(tree):
    specs = _specs(tree)
    assert sorted(specs) == ["etl", "nested", "plain", "top"]
    top, etl, nested, plain = (specs[n] for n in ("top", "etl", "nested", "plain"))
    assert (top.owner, top.retries, top.cluster.workers, top.cluster.cpu) == ("platform", 1, 4, 2)
    assert top.cluster.idle_timeout == "5m"  # the spec's own default: team/ does not reach up
    # team/defaults.yml wins over the top one, key by key inside cluster; the file wins last
    assert (etl.owner, etl.retries, etl.cluster.workers, etl.cluster.cpu) == ("team-etl", 1, 4, 2)
    assert (etl.cluster.idle_timeout, etl.cluster.pool) == ("7m", "mine")
    assert (nested.owner, nested.cluster.idle_timeout, nested.cluster.pool) == (
        "team-etl",
        "7m",
        None,
    )
    assert (plain.owner, plain.cluster.idle_timeout) == ("platform", "5m")


def test_a_profile_merges_over_its_own_defaults_file_outer_then_inner_then_the_file(tree):
    specs = _specs(tree, "prod")
    top, etl, nested = specs["top"], specs["etl"], specs["nested"]
    # outer defaults < outer profile
    assert (top.retries, top.owner, top.queue, top.cluster.backend) == (
        3,
        "prod-outer",
        "q-outer",
        "fargate",
    )
    assert (top.cluster.workers, top.cluster.cpu, top.cluster.memory) == (8, 1, "4GiB")
    # outer profile < inner defaults (owner) < inner profile (queue, idle_timeout) < file (pool)
    assert (etl.retries, etl.owner, etl.queue) == (3, "team-etl", "q-inner")
    assert (etl.cluster.idle_timeout, etl.cluster.pool) == ("9m", "mine")
    assert (nested.cluster.pool, nested.cluster.backend) == ("etl-clusters", "fargate")
    dev = _specs(tree, "dev")
    assert (dev["etl"].retries, dev["etl"].cluster.workers, dev["etl"].cluster.backend) == (
        0,
        1,
        "local",
    )
    assert dev["etl"].queue is None


def test_the_profile_comes_from_the_environment_in_airflow(tree, monkeypatch):
    from dagfactory.dag.build import build_dags

    monkeypatch.setenv("DAGFACTORY_PROFILE", "prod")
    dags = build_dags(tree)
    assert INVALID_TAG not in dags["etl"].tags
    run = dags["etl"].get_task("pipeline.run")
    assert (run.queue, run.pool, run.retries) == ("q-inner", "mine", 3)
    assert dags["top"].get_task("pipeline.run").queue == "q-outer"


def test_an_unknown_profile_makes_every_pipeline_it_affects_invalid_and_names_the_profiles(
    tree, monkeypatch
):
    from dagfactory.dag.build import build_dags

    result = load_folder(tree, profile=Profile("prd", "DAGFACTORY_PROFILE"))
    assert result.specs == ()
    assert sorted(Path(p.file).name for p in result.problems) == [
        "etl.yml", "nested.yml", "plain.yml", "top.yml",
    ]  # fmt: skip
    problem = next(p for p in result.problems if p.file.endswith("etl.yml"))
    assert (problem.line, problem.column) == (1, 1)
    assert "profile 'prd' (from DAGFACTORY_PROFILE)" in problem.message
    assert "did you mean 'prod'?" in problem.message
    outer = tree / "defaults.yml"
    assert f"dev ({outer}:7), prod ({outer}:10)" in problem.message

    monkeypatch.setenv("DAGFACTORY_PROFILE", "prd")
    dags = build_dags(tree)
    assert sorted(dags) == ["etl", "nested", "plain", "top"]  # none hidden: all shown as broken
    assert all(INVALID_TAG in dag.tags for dag in dags.values())
    assert "did you mean 'prod'?" in dags["etl"].doc_md


def test_a_profile_known_only_in_another_subtree_is_unknown_here(tree):
    (tree / "other" / "defaults.yml").write_text("profiles:\n  canary: {retries: 5}\n")
    result = load_folder(tree, profile=Profile("canary", "--profile"))
    assert [s.dag_id for s in result.specs] == ["plain"] and result.specs[0].retries == 5
    assert sorted(Path(p.file).name for p in result.problems) == [
        "etl.yml",
        "nested.yml",
        "top.yml",
    ]


def test_a_profile_with_no_defaults_file_at_all_is_an_error_that_says_so(tmp_path):
    write_pipeline(tmp_path, "alone", JOB)
    (problem,) = load_folder(tmp_path, profile=Profile("prod", "DAGFACTORY_PROFILE")).problems
    assert "no defaults.yml applies to this pipeline" in problem.message
    assert "unset DAGFACTORY_PROFILE" in problem.message


def test_a_broken_inner_defaults_file_hides_only_its_subtree(tree):
    (tree / "team" / "defaults.yml").write_text(
        "owner: team-etl\ncluster:\n  wokers: 2\nprofiles:\n  prod:\n    cluster: {cpu: 0}\n"
    )
    result = load_folder(tree)
    assert sorted(s.dag_id for s in result.specs) == ["plain", "top"]
    inner = str(tree / "team" / "defaults.yml")
    typo, cpu = (p for p in result.problems if p.file == inner)
    assert (typo.line, typo.column, typo.field) == (3, 3, "cluster.wokers")
    assert "did you mean 'workers'?" in typo.message
    # a profile's mistake is found without choosing the profile, at its line
    assert (cpu.line, cpu.field) == (6, "profiles.prod.cluster.cpu")
    blocked = sorted(p.file for p in result.problems if p.file != inner)
    assert blocked == [str(tree / "team" / "deep" / "nested.yml"), str(tree / "team" / "etl.yml")]
    assert all("not loaded because" in p.message for p in result.problems if p.file != inner)


def test_a_broken_inner_defaults_file_in_airflow_marks_its_pipelines_and_keeps_the_rest(tree):
    from dagfactory.dag.build import build_dags

    (tree / "team" / "defaults.yml").write_text("cluster: {workers: 0}\n")
    (tree / "other" / "defaults.yml").write_text("retries: many\n")
    dags = build_dags(tree)
    assert INVALID_TAG not in dags["top"].tags
    for broken in ("etl", "nested", "plain"):
        assert INVALID_TAG in dags[broken].tags and "not loaded because" in dags[broken].doc_md
    # two broken defaults files: each is shown, the second (in folder order) under a marked name
    assert "other/defaults.yml:1:10" in dags["defaults"].doc_md
    assert "team/defaults.yml:1:20" in dags["defaults__invalid"].doc_md


@pytest.mark.parametrize(
    ("text", "where", "fragment"),
    [
        ("profiles: [dev, prod]\n", (1, 11), "must be a mapping of profile names"),
        ("profiles:\n  dev:\n", (2, 3), "write dev: {} for a profile that changes nothing"),
        ("profiles:\n  'my profile': {}\n", (2, 3), "is not a profile name"),
        ("profiles:\n  dev:\n    profiles: {x: {}}\n", (3, 15), "profiles do not nest"),
        ("profiles:\n  dev:\n    dag_id: same\n", (3, 5), "same DAG id"),
        ("profiles:\n  dev:\n    cluster: {workers: 0}\n", (3, 24), "dev.cluster.workers"),
    ],
)
def test_profiles_in_a_defaults_file_are_checked_at_their_lines(tmp_path, text, where, fragment):
    (tmp_path / "defaults.yml").write_text(text)
    write_pipeline(tmp_path, "job", JOB)
    result = load_folder(tmp_path)
    own = [p for p in result.problems if p.file.endswith("defaults.yml")]
    assert any((p.line, p.column) == where and fragment in str(p) for p in own), own


def test_profiles_in_a_pipeline_file_are_refused_with_a_hint(tmp_path):
    write_pipeline(tmp_path, "job", JOB + "profiles:\n  dev: {retries: 0}\n")
    (problem,) = load_folder(tmp_path).problems
    assert (problem.line, problem.column, problem.field) == (3, 1, "profiles")
    assert "profiles belong in a defaults.yml" in problem.message


# --- the parsing-context path -------------------------------------------------------------------


def _serialized(dag) -> str:
    from airflow.serialization.serialized_objects import DagSerialization

    return json.dumps(DagSerialization.to_dict(dag), sort_keys=True)


def test_parsing_context_builds_a_subfolder_pipeline_from_its_defaults_files_only(
    tree, monkeypatch
):
    import dagfactory.spec.load
    from dagfactory.dag.build import build_dags

    monkeypatch.setenv("DAGFACTORY_PROFILE", "prod")
    full = build_dags(tree)["nested"]
    (tree / "other" / "defaults.yml").write_text("not: [valid")  # not on the path: never read
    read: list[Path] = []
    real = dagfactory.spec.load.read_defaults_file

    def recorded(folder, shown_as=None):
        read.append(folder)
        return real(folder, shown_as)

    monkeypatch.setattr(dagfactory.spec.load, "read_defaults_file", recorded)
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "nested")
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_TASK_ID", "pipeline.run")
    dags = build_dags(tree)
    assert list(dags) == ["nested"]
    assert read == [tree, tree / "team", tree / "team" / "deep"]
    assert _serialized(dags["nested"]) == _serialized(full)
    assert dags["nested"].get_task("pipeline.run").pool == "etl-clusters"


def test_parsing_context_never_picks_the_wrong_one_of_two_files_of_the_same_name(
    tmp_path, monkeypatch
):
    from dagfactory.dag.build import build_dags

    for team in ("team_a", "team_b"):
        write_pipeline(tmp_path / team, "job", JOB + f"description: from {team}\n")
    full = build_dags(tmp_path)
    assert full["job"].description == "from team_a"
    assert INVALID_TAG in full["job__invalid"].tags
    assert "already used by" in full["job__invalid"].doc_md
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "job")
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_TASK_ID", "pipeline.run")
    dags = build_dags(tmp_path)
    assert dags["job"].description == "from team_a"
    assert _serialized(dags["job"]) == _serialized(full["job"])


# --- the commands agree with the loader ----------------------------------------------------------


def _as_loaded(root: Path, dag_id: str, profile: str | None) -> dict:
    spec = _specs(root, profile)[dag_id]
    return json.loads(json.dumps(dataclasses.asdict(spec), default=str))


@pytest.mark.parametrize("profile", [None, "dev", "prod"])
def test_render_of_one_file_applies_the_defaults_files_airflow_applies(tree, profile):
    by_flag = ["--profile", profile] if profile else []
    out = dagfactory("render", "pipelines/team/etl.yml", *by_flag, cwd=tree.parent)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == _as_loaded(tree, "etl", profile)
    assert "pipelines/defaults.yml, pipelines/team/defaults.yml" in out.stderr
    # from inside the subfolder, and with the profile from the environment
    env = {"DAGFACTORY_PROFILE": profile} if profile else {}
    out = dagfactory("render", "nested.yml", cwd=tree / "team" / "deep", **env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == _as_loaded(tree, "nested", profile)
    assert "defaults files: ../../defaults.yml, ../defaults.yml" in out.stderr


def test_outside_a_pipelines_folder_the_pipelines_dir_variable_sets_the_top(tmp_path, monkeypatch):
    from dagfactory.dag.build import build_dags

    root = tmp_path / "specs"
    (root / "team").mkdir(parents=True)
    (root / "defaults.yml").write_text("owner: platform\n")
    write_pipeline(root / "team", "job", JOB)
    alone = dagfactory("render", "specs/team/job.yml", cwd=tmp_path)
    assert json.loads(alone.stdout)["owner"] == "dagfactory"  # only the defaults next to it
    out = dagfactory(
        "render", "specs/team/job.yml", cwd=tmp_path, DAGFACTORY_PIPELINES_DIR=str(root)
    )
    assert json.loads(out.stdout)["owner"] == "platform"
    monkeypatch.setenv("DAGFACTORY_PIPELINES_DIR", str(root))
    assert build_dags(tmp_path / "elsewhere")["job"].default_args["owner"] == "platform"


def test_validate_of_a_file_or_folder_applies_the_profile_and_every_defaults_file(tree):
    (tree / "team" / "defaults.yml").write_text(
        INNER + "  canary:\n    cluster: {backend: existing}\n"
    )
    valid = dagfactory("validate", "pipelines", cwd=tree.parent)
    assert valid.returncode == 0, valid.stdout
    assert "4 pipeline file(s) valid" in valid.stderr
    out = dagfactory("validate", "etl.yml", "--profile", "canary", cwd=tree / "team")
    assert out.returncode == 1
    assert out.stdout.startswith("etl.yml:")
    assert "'existing' backend needs the scheduler's address" in out.stdout
    out = dagfactory("validate", "pipelines", cwd=tree.parent, DAGFACTORY_PROFILE="canary")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert sum("address" in line for line in lines) == 2  # etl and nested, below team/
    assert sum("profile 'canary'" in line for line in lines) == 2  # top and plain: unknown there


def test_validate_of_a_changed_file_checks_dag_ids_across_the_whole_tree(tree):
    write_pipeline(tree / "other", "rollup", JOB + "dag_id: etl\n")
    out = dagfactory("validate", "pipelines/other/rollup.yml", cwd=tree.parent)
    assert out.returncode == 1
    assert "DAG id 'etl' (from its dag_id) is already used by pipelines/team/etl.yml" in out.stdout


def test_validate_reports_a_broken_nested_defaults_file_once(tree):
    (tree / "team" / "defaults.yml").write_text("cluster: {workers: 0}\n")
    out = dagfactory("validate", "pipelines", cwd=tree.parent)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert [line for line in lines if line.startswith("pipelines/team/defaults.yml")] == [
        "pipelines/team/defaults.yml:1:20: error: cluster.workers: must be at least 1, not 0"
    ]
    assert {line.split(":")[0] for line in lines} == {
        "pipelines/team/defaults.yml", "pipelines/team/etl.yml", "pipelines/team/deep/nested.yml",
    }  # fmt: skip


def test_run_applies_the_profile_before_anything_starts(tree):
    out = dagfactory("run", "pipelines/team/etl.yml", "--profile", "staging", cwd=tree.parent)
    assert out.returncode == 1
    assert "profile 'staging' (from --profile)" in out.stderr
    assert "[dagfactory] bootstrap" not in out.stderr
