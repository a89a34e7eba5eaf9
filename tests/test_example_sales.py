"""The worked multi-stage example, `pipelines/sales.yml` with its code in `examples/sales/`:
it validates, it makes the DAG the README draws, and `dagfactory run` of it gives figures that
add up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, cluster_processes, make_repo

EXAMPLE = ROOT / "pipelines" / "sales.yml"
DAGFACTORY = [sys.executable, "-m", "dagfactory.cli"]


def dagfactory(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DAGFACTORY, *args], cwd=ROOT, capture_output=True, text=True, env=os.environ.copy()
    )


def test_the_example_validates():
    out = dagfactory("validate", "pipelines/sales.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_readmes_stages_snippet_is_a_valid_pipeline_once_it_has_a_source(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Stages: several clusters, steps, results between steps", 1)[1]
    snippet = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "snippet.yml"
    path.write_text("source: {git: https://example.com/acme/sales.git}\n" + snippet)
    out = dagfactory("validate", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_editor_schema_accepts_the_example():
    tool = Path(sys.executable).parent / "check-jsonschema"
    out = subprocess.run(
        [str(tool), "--schemafile", "schemas/pipeline.schema.json", "pipelines/sales.yml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    first = EXAMPLE.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../schemas/pipeline.schema.json"


def test_the_example_makes_the_dag_the_readme_draws():
    from dagfactory.dag.build import build_dag
    from dagfactory.spec.load import load_file

    dag = build_dag(load_file(EXAMPLE))
    # bootstrap (the commit and virtualenv every task uses) is left out: it comes first
    upstream = {task.task_id: set(task.upstream_task_ids) - {"bootstrap"} for task in dag.tasks}
    assert sorted(upstream) == sorted(
        [
            "bootstrap",
            *("prepare.cluster_up", "prepare.extract", "prepare.clean", "prepare.teardown"),
            *("model.cluster_up", "model.by_region", "model.by_day", "model.teardown"),
            *("report.cluster_up", "report.publish", "report.teardown"),
        ]
    )
    # prewarm: model's cluster starts once extract is done, while clean runs
    assert upstream["model.cluster_up"] == {"prepare.extract"}
    for step in ("model.by_region", "model.by_day"):
        assert upstream[step] == {"model.cluster_up", "prepare.clean"}
    assert upstream["model.teardown"] == {"model.cluster_up", "model.by_region", "model.by_day"}
    # no prewarm: report's cluster starts when model's last steps are done
    assert upstream["report.cluster_up"] == {"model.by_region", "model.by_day"}
    assert [a.uri for a in dag.get_task("report.publish").outlets] == [
        "file:///tmp/dagfactory-sales/latest.json"
    ]


@pytest.mark.e2e
def test_run_of_the_example_gives_figures_that_add_up(tmp_path_factory, tmp_path):
    repo = make_repo(
        tmp_path_factory.mktemp("remotes") / "sales", copy_from=ROOT / "examples/sales"
    )
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["source"] = {"git": str(repo.path), "requirements": "requirements.txt"}
    pipeline = tmp_path / "sales_example.yml"
    pipeline.write_text(yaml.safe_dump(spec, sort_keys=False))
    data = tmp_path / "data"

    out = dagfactory(
        "run", str(pipeline), "-p", "days=5", "-p", "rows_per_day=40", "-p", f"folder={data}"
    )

    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert list(results) == ["extract", "clean", "by_region", "by_day", "publish"]
    extract, clean, regions, days, publish = results.values()
    assert extract["rows"] == 5 * 4 * 40  # days x regions x rows_per_day
    assert clean["rows"] + clean["dropped"] == extract["rows"] and clean["dropped"] > 0
    assert sorted(regions["regions"]) == ["east", "north", "south", "west"]
    assert sum(r["rows"] for r in regions["regions"].values()) == clean["rows"]
    assert sum(r["amount_cents"] for r in regions["regions"].values()) == regions["amount_cents"]
    assert (days["days"], days["rows"]) == (5, clean["rows"])
    assert days["amount_cents"] == regions["amount_cents"]
    assert days["worst_day"]["amount_cents"] <= days["best_day"]["amount_cents"]
    assert publish["rows"] == clean["rows"]
    assert publish["revenue"] == f"{regions['amount_cents'] / 100:.2f}"

    # the run's folder, named after its run id, keeps the report and nothing else
    run_folder = Path(extract["folder"])
    assert run_folder.parent == data and run_folder.name.startswith("cli_")
    assert sorted(p.name for p in run_folder.iterdir()) == ["report.json"]
    report = json.loads((run_folder / "report.json").read_text())
    assert report["rows"] == clean["rows"] and report["top_region"] == publish["top_region"]
    assert (data / "latest.json").read_text() == (run_folder / "report.json").read_text()

    # each stage on its own cluster, stopped before the next stage's starts
    order = [
        "prepare: cluster_up", "prepare.extract", "prepare.clean", "prepare: teardown",
        "model: cluster_up", "model.by_region", "model.by_day", "model: teardown",
        "report: cluster_up", "report.publish", "report: teardown",
    ]  # fmt: skip
    at = [out.stderr.index(f"[dagfactory] {name} ") for name in order]
    assert at == sorted(at)
    assert "does not answer" not in out.stderr  # every step found its stage's cluster
    assert cluster_processes("sales_example__cli_") == []


def test_the_same_seed_makes_the_same_orders(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "sales"))
    from sales import jobs

    one = jobs._orders("2026-01-02", ["north", "east"], 300, seed=7)
    assert one == jobs._orders("2026-01-02", ["north", "east"], 300, seed=7)
    assert one != jobs._orders("2026-01-02", ["north", "east"], 300, seed=8)
    broken = [line for line in one if not jobs._valid(jobs._parse(line))]
    assert 0 < len(broken) < len(one) * 0.05  # about 2 % of the rows need cleaning
