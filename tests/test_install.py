"""The light install: everything but the Airflow loader works without Airflow.

The pre-commit hook and CI jobs install dagfactory on every fresh runner; with Airflow as a hard
dependency that took half a minute and 362 MB. Airflow is now the `airflow` extra. These tests
install the project into a fresh virtualenv without extras (as the hook does) and use it, and
check that the commands do not import Airflow even where it is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dagfactory.spec.schema import schema_text
from tests.conftest import ROOT

UV = Path(sys.executable).parent / "uv"


def _run(*args: str | Path, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, env=os.environ.copy()
    )
    if check:
        assert out.returncode == 0, f"{args}: {out.stdout}{out.stderr}"
    return out


def test_the_commands_do_not_import_airflow(tmp_path):
    """Even where Airflow is installed, validate/render/schema/new never import it."""
    script = textwrap.dedent(
        f"""
        import json, sys
        from dagfactory.cli import main
        codes = [
            main(["validate", {str(ROOT / "pipelines")!r}]),
            main(["render", {str(ROOT / "pipelines" / "wordcount.yml")!r}]),
            main(["schema"]),
            main(["new", "light", "--git", "https://example.com/a.git", "--entrypoint", "a.b:c",
                  "--dir", {str(tmp_path / "pipelines")!r}]),
        ]
        loaded = sorted(m for m in sys.modules if m == "airflow" or m.startswith("airflow."))
        print(json.dumps({{"codes": codes, "airflow": loaded}}), file=sys.stderr)
        """
    )
    out = _run(sys.executable, "-c", script, cwd=tmp_path)
    report = json.loads(out.stderr.strip().splitlines()[-1])
    assert report["codes"] == [0, 0, 0, 0], out.stderr
    assert report["airflow"] == []


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory) -> Path:
    """`uv pip install <checkout>` into a fresh virtualenv, no extras: what the hook installs.

    The cache (filled by ./dev setup) serves every package; only if something is missing from
    it does uv go to the index.
    """
    if not UV.is_file():
        pytest.fail(f"{UV} is missing; run ./dev setup")
    venv = tmp_path_factory.mktemp("light") / "venv"
    _run(UV, "venv", "--quiet", "--python", sys.executable, venv, cwd=ROOT)
    python = venv / "bin" / "python"
    install = [UV, "pip", "install", "--quiet", "--python", python, ROOT]
    if _run(*install, "--offline", cwd=ROOT, check=False).returncode != 0:
        _run(*install, cwd=ROOT)
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


@pytest.mark.e2e
def test_the_light_install_has_no_airflow(light_venv):
    out = _run(light_venv / "bin" / "python", "-c", "import airflow", cwd=ROOT, check=False)
    assert out.returncode == 1 and "No module named 'airflow'" in out.stderr


@pytest.mark.e2e
def test_the_light_install_writes_validates_and_renders_pipelines(light_venv, tmp_path):
    dagfactory = light_venv / "bin" / "dagfactory"
    # Outside the checkout: a pipelines repository of its own.
    repo = tmp_path / "pipelines-repo"
    repo.mkdir()
    _run("git", "init", "--quiet", repo, cwd=tmp_path)
    new = _run(
        dagfactory, "new", "sales", "--git", "https://example.com/acme/sales.git",
        "--entrypoint", "sales.jobs:rollup", cwd=repo,
    )  # fmt: skip
    path = repo / "pipelines" / "sales.yml"
    assert new.stdout.strip() == "pipelines/sales.yml"
    first = path.read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../schemas/pipeline.schema.json"
    assert (repo / "schemas" / "pipeline.schema.json").read_text() == schema_text()

    assert "1 pipeline file(s) valid" in _run(dagfactory, "validate", cwd=repo).stderr
    bad = path.read_text().replace("workers: 2", "workers: two")
    (repo / "pipelines" / "bad.yml").write_text(bad)
    out = _run(dagfactory, "validate", cwd=repo, check=False)
    assert out.returncode == 1 and "pipelines/bad.yml:" in out.stdout
    (repo / "pipelines" / "bad.yml").unlink()

    rendered = json.loads(_run(dagfactory, "render", "pipelines/sales.yml", cwd=repo).stdout)
    assert rendered["entrypoint"] == "sales.jobs:rollup"
    assert rendered["cluster"]["workers"] == 2

    assert _run(dagfactory, "schema", cwd=repo).stdout == schema_text()
    installed = Path(_run(dagfactory, "schema", "--path", cwd=repo).stdout.strip())
    assert installed.is_relative_to(light_venv)
    assert installed.read_text() == schema_text()
