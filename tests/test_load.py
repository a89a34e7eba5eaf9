from datetime import date
from pathlib import Path

import pytest

from dagfactory.errors import SpecError
from dagfactory.spec.load import load_file, load_folder
from tests.conftest import ROOT, write_pipeline

MINIMAL = """\
source:
  git: https://example.com/acme/jobs.git
entrypoint: jobs.main:run
"""


def test_the_example_pipeline_loads_with_its_declared_values():
    spec = load_file(ROOT / "pipelines" / "wordcount.yml")
    assert spec.dag_id == "wordcount"
    assert spec.entrypoint == "wordcount.job:main"
    assert spec.entry_module == "wordcount.job" and spec.entry_function == "main"
    assert spec.start_date == date(2026, 1, 1)
    assert spec.param_defaults == {"chunks": 64, "top": 5, "label": "{{ ds }}"}
    assert spec.param_specs["chunks"].type == "integer" and spec.param_specs["chunks"].minimum == 1
    assert spec.retries == 1 and spec.dagrun_timeout == "1h"
    assert spec.cluster.backend == "local" and spec.cluster.workers == 2
    assert spec.source.subdir == "examples/wordcount"


def test_defaults_are_filled_in(tmp_path):
    spec = load_file(write_pipeline(tmp_path, "minimal", MINIMAL))
    assert spec.dag_id == "minimal"
    assert spec.owner == "dagfactory"
    assert spec.schedule is None and spec.catchup is False and spec.retries == 0
    assert spec.cluster.backend == "local" and spec.cluster.workers == 2
    assert spec.cluster.memory == "2GiB"
    assert spec.origin == str((tmp_path / "minimal.yml").resolve())


def test_dag_id_key_overrides_the_file_name(tmp_path):
    spec = load_file(write_pipeline(tmp_path, "file_name", MINIMAL + "dag_id: other_id\n"))
    assert spec.dag_id == "other_id"


def test_defaults_file_is_merged_under_each_spec(tmp_path):
    (tmp_path / "defaults.yml").write_text("owner: platform\ncluster:\n  workers: 8\n  cpu: 2\n")
    write_pipeline(tmp_path, "a", MINIMAL + "cluster:\n  cpu: 4\n")
    result = load_folder(tmp_path)
    assert not result.problems
    (spec,) = result.specs
    assert spec.owner == "platform"
    assert (spec.cluster.workers, spec.cluster.cpu) == (8, 4)


def test_unknown_key_is_located_and_suggested(tmp_path):
    path = write_pipeline(tmp_path, "typo", MINIMAL + "cluster:\n  wokers: 2\n")
    with pytest.raises(SpecError) as err:
        load_file(path)
    (problem,) = err.value.problems
    assert (problem.line, problem.column) == (5, 3)
    assert problem.field == "cluster.wokers"
    assert "did you mean 'workers'?" in problem.message
    assert str(problem).startswith(f"{path}:5:3: error: cluster.wokers: unknown key")


def test_one_bad_file_does_not_hide_the_good_ones(tmp_path):
    write_pipeline(tmp_path, "good", MINIMAL)
    write_pipeline(tmp_path, "bad", "source: {git: x}\nentrypoint: not-an-entrypoint\n")
    (tmp_path / "notes.txt").write_text("not a pipeline")
    result = load_folder(tmp_path)
    assert [s.dag_id for s in result.specs] == ["good"]
    assert [Path(p.file).name for p in result.problems] == ["bad.yml"]
    assert result.problems[0].line == 2


def test_a_defaults_file_is_checked_at_its_own_lines_and_may_not_set_a_dag_id(tmp_path):
    (tmp_path / "defaults.yml").write_text("dag_id: shared\ncluster:\n  cpu: 0\n")
    write_pipeline(tmp_path, "a", MINIMAL)
    result = load_folder(tmp_path)
    assert result.specs == ()
    dag_id, cpu, blocked = result.problems
    assert (dag_id.file, dag_id.line, dag_id.field) == (str(tmp_path / "defaults.yml"), 1, "dag_id")
    assert (cpu.line, cpu.column, cpu.field) == (3, 8, "cluster.cpu")
    assert "every pipeline the same DAG id" in dag_id.message
    assert blocked.file == str(tmp_path / "a.yml")
    assert "not loaded because" in blocked.message and "defaults.yml is invalid" in blocked.message


def test_a_bug_in_a_check_becomes_a_problem_of_that_file_only(tmp_path, monkeypatch):
    import dagfactory.spec.load

    write_pipeline(tmp_path, "good", MINIMAL)
    write_pipeline(tmp_path, "trips", MINIMAL + "description: trips the bug\n")

    def buggy(spec):
        if spec.description:
            raise KeyError("oops")
        return iter(())

    monkeypatch.setattr(dagfactory.spec.load, "check_spec", buggy)
    result = load_folder(tmp_path)
    assert [s.dag_id for s in result.specs] == ["good"]
    (problem,) = result.problems
    assert problem.file.endswith("trips.yml") and problem.line == 1
    assert "KeyError" in problem.message and "bug in dagfactory" in problem.message


def test_duration_and_size_patterns_accept_what_dask_reads_and_nothing_else():
    """The schema's patterns and Dask's parsers agree, so an editor and a run read alike."""
    import re

    from dask.utils import byte_sizes, parse_bytes, parse_timedelta, timedelta_sizes

    from dagfactory.spec.pipeline import (
        DURATION_PATTERN,
        DURATION_UNITS,
        SIZE_PATTERN,
        parse_duration,
    )

    sub_millisecond = {"ns", "nanosecond", "nanoseconds", "us", "microsecond", "microseconds"}
    for unit in timedelta_sizes:
        text = f"2 {unit}"
        if unit.lower() in sub_millisecond or unit not in DURATION_UNITS:
            # dask also knows upper-case spellings and sub-millisecond units; a pipeline
            # duration is written in lower case, from milliseconds up
            assert unit.lower() in sub_millisecond or unit.lower() in DURATION_UNITS, unit
            continue
        assert re.match(DURATION_PATTERN, text), unit
        assert parse_duration(text).total_seconds() == parse_timedelta(text)
    for unit in byte_sizes:
        for text in (f"3{unit}", f"1.5 {unit.upper()}"):
            assert re.match(SIZE_PATTERN, text), text
            parse_bytes(text)  # and Dask reads it
    for bad in ("1h30m", "one hour", "90", "1e3s", "-5m"):
        assert not re.match(DURATION_PATTERN, bad), bad


def test_pipeline_files_in_subfolders_load_and_hidden_or_underscore_folders_do_not(tmp_path):
    write_pipeline(tmp_path, "top", MINIMAL)
    write_pipeline(tmp_path / "team" / "etl", "deep", MINIMAL)
    write_pipeline(tmp_path / "_drafts", "draft", "not: [valid")
    write_pipeline(tmp_path / ".git", "config", "not: [valid")
    (tmp_path / "linked").symlink_to(tmp_path / "team")  # a second way to the same files
    result = load_folder(tmp_path)
    assert result.problems == ()
    assert [s.dag_id for s in result.specs] == ["top", "deep"]
    assert result.specs[1].origin == str(tmp_path / "team" / "etl" / "deep.yml")


def test_an_inner_defaults_file_wins_key_by_key_and_reaches_only_below_it(tmp_path):
    (tmp_path / "defaults.yml").write_text("owner: platform\ncluster: {workers: 8, cpu: 2}\n")
    (tmp_path / "team" / "etl").mkdir(parents=True)
    (tmp_path / "team" / "defaults.yml").write_text("cluster: {cpu: 4}\n")
    write_pipeline(tmp_path / "team" / "etl", "deep", MINIMAL + "cluster: {memory: 8GiB}\n")
    write_pipeline(tmp_path / "other", "side", MINIMAL)
    specs = {s.dag_id: s for s in load_folder(tmp_path).specs}
    deep, side = specs["deep"].cluster, specs["side"].cluster
    assert (specs["deep"].owner, deep.workers, deep.cpu, deep.memory) == ("platform", 8, 4, "8GiB")
    assert (specs["side"].owner, side.workers, side.cpu) == ("platform", 8, 2)


def test_a_repeated_dag_id_goes_to_the_file_met_first_top_folder_then_subfolders_by_name(tmp_path):
    write_pipeline(tmp_path / "b", "job", MINIMAL)
    write_pipeline(tmp_path / "a", "job", MINIMAL)
    write_pipeline(tmp_path, "zz", MINIMAL + "dag_id: job\n")
    result = load_folder(tmp_path)
    (spec,) = result.specs
    assert spec.origin == str(tmp_path / "zz.yml")
    assert sorted(p.file for p in result.problems) == [
        str(tmp_path / "a" / "job.yml"), str(tmp_path / "b" / "job.yml"),
    ]  # fmt: skip
    assert all(f"already used by {tmp_path / 'zz.yml'}" in p.message for p in result.problems)
