"""Fixtures that make real things in temp dirs: git repositories, an Airflow metadata DB, a
dagfactory cache shared by the whole session (so that virtualenvs are built once)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "wordcount"

# Airflow reads its configuration when first imported: point it at a private home first.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="dagfactory-tests-"))
os.environ["AIRFLOW_HOME"] = str(_SESSION_DIR / "airflow")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__EXECUTOR"] = "LocalExecutor"
os.environ["DAGFACTORY_HOME"] = str(_SESSION_DIR / "dagfactory")
os.environ.pop("DAGFACTORY_PIPELINES_DIR", None)


def pytest_sessionfinish(session, exitstatus):
    # Whatever a failed test left behind must not outlive the session.
    import psutil

    from dagfactory.backends.local import KEY_VARIABLE

    # Only this session's clusters: other sessions may be running on the same machine.
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if KEY_VARIABLE in env and env.get("DAGFACTORY_HOME") == os.environ["DAGFACTORY_HOME"]:
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    shutil.rmtree(_SESSION_DIR, ignore_errors=True)


def _marked_processes(roots: tuple[str, ...]) -> list:
    """Live processes that carry a cluster marker under one of this session's folders."""
    import psutil

    from dagfactory.backends.local import KEY_VARIABLE

    found = []
    for proc in psutil.process_iter():
        try:
            marker = proc.environ().get(KEY_VARIABLE, "")
            if marker.startswith(roots) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture(scope="module", autouse=True)
def no_process_of_a_run_outlives_its_module(tmp_path_factory):
    """The census after every test module: every process a run starts carries its run key, so
    a leak anywhere (a cluster, an entry point) fails the module that caused it."""
    yield
    import psutil

    roots = (str(_SESSION_DIR), str(tmp_path_factory.getbasetemp()))
    deadline = time.monotonic() + 45  # workers may take their death timeout to follow
    while (left := _marked_processes(roots)) and time.monotonic() < deadline:
        time.sleep(0.5)
    if left:
        shown = []
        for proc in left:
            with contextlib.suppress(psutil.Error):
                shown.append(f"{proc.pid} {' '.join(proc.cmdline())[:160]}")
                proc.kill()
        pytest.fail("processes of a run outlived their test module:\n" + "\n".join(shown))


def git(cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }
    out = subprocess.run(
        ["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


@dataclass
class GitRepo:
    path: Path

    def write(self, relative: str, text: str) -> None:
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(textwrap.dedent(text))

    def commit(self, message: str = "change") -> str:
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "-m", message)
        return git(self.path, "rev-parse", "HEAD")

    def head(self) -> str:
        return git(self.path, "rev-parse", "HEAD")


def make_repo(path: Path, files: dict[str, str] | None = None, copy_from: Path | None = None):
    path.mkdir(parents=True)
    if copy_from:
        shutil.copytree(copy_from, path, dirs_exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    repo = GitRepo(path)
    for name, text in (files or {}).items():
        repo.write(name, text)
    repo.commit("initial")
    return repo


@pytest.fixture(scope="session")
def wordcount_repo(tmp_path_factory) -> GitRepo:
    """A real git repository holding the wordcount example."""
    return make_repo(tmp_path_factory.mktemp("remotes") / "wordcount", copy_from=EXAMPLE)


@pytest.fixture
def repo_factory(tmp_path):
    def factory(name: str = "repo", files: dict[str, str] | None = None) -> GitRepo:
        return make_repo(tmp_path / "remotes" / name, files)

    return factory


FAILING_JOB = """
    def main(client, message="boom"):
        total = client.submit(sum, [1, 2, 3]).result()
        print(f"partial result {total}")
        raise ValueError(message)
"""


def write_pipeline(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yml"
    path.write_text(textwrap.dedent(text))
    return path


# The metadata DB is migrated before any test module imports Airflow: an Airflow imported
# (and its ORM set up) before the migration never sees the migrated tables in this process.
subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)


def write_wordcount_pipeline(
    folder: Path, repo: GitRepo, chunks: int, top: int, label: str, name: str = "wordcount"
) -> Path:
    """A pipeline file running the wordcount example from `repo` on 2 local workers."""
    return write_pipeline(
        folder,
        name,
        f"""
        source:
          git: {repo.path}
          requirements: requirements.txt
        entrypoint: wordcount.job:main
        params: {{chunks: {chunks}, top: {top}, label: "{label}"}}
        cluster: {{workers: 2, memory: 1GiB}}
        """,
    )


@pytest.fixture(scope="session")
def airflow_db():
    """The session's migrated SQLite metadata DB (see above), for tests that need it."""
    from airflow import settings

    return settings


def cluster_processes(key_fragment: str = "") -> list:
    """Live Dask processes started by dagfactory whose cluster key contains key_fragment."""
    import psutil

    from dagfactory.backends.local import KEY_VARIABLE

    found = []
    for proc in psutil.process_iter():
        try:
            key = proc.environ().get(KEY_VARIABLE)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        mine = key is not None and key.startswith(os.environ["DAGFACTORY_HOME"])
        if mine and key_fragment in key and proc.status() != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def run_key(dag_id: str, run_id: str) -> str:
    """The cluster key of a DAG run, as the operators derive it."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dag_id}__{run_id}")


def marked_processes(key: str) -> list:
    """Live processes carrying the exact marker of the run key `key`: its Dask processes and
    its entry point's process (zombies, which run no code, are not counted)."""
    import psutil

    from dagfactory.backends.local import KEY_VARIABLE, cluster_dir

    marker = str(cluster_dir(key))
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(KEY_VARIABLE) == marker and proc.status() != "zombie":
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
