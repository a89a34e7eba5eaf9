"""Real git repositories in temp dirs, fetched with dulwich, cached by commit."""

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor

import pytest

from dagfactory.errors import WorkspaceError
from dagfactory.load import load_file
from dagfactory.workspace import (
    checkout,
    dagfactory_home,
    prepare,
    requirements_of,
    resolve_commit,
    virtualenv,
)
from tests.conftest import git, write_pipeline


def _spec(tmp_path, git_url, extra=""):
    text = f"source:\n  git: {git_url}\n{extra}entrypoint: job:main\n"
    return load_file(write_pipeline(tmp_path / "pipelines", "p", text))


def test_refs_resolve_to_commits(tmp_path, repo_factory):
    repo = repo_factory(files={"job.py": "X = 1\n"})
    first = repo.head()
    git(repo.path, "tag", "v1")
    git(repo.path, "tag", "-a", "v1-annotated", "-m", "annotated")
    git(repo.path, "checkout", "-q", "-b", "feature")
    repo.write("job.py", "X = 2\n")
    second = repo.commit()
    git(repo.path, "checkout", "-q", "main")
    assert resolve_commit(_spec(tmp_path, repo.path)) == first  # remote HEAD
    assert resolve_commit(_spec(tmp_path, repo.path, "  ref: feature\n")) == second
    assert resolve_commit(_spec(tmp_path, repo.path, "  ref: v1\n")) == first
    assert resolve_commit(_spec(tmp_path, repo.path, "  ref: v1-annotated\n")) == first
    assert resolve_commit(_spec(tmp_path, f"file://{repo.path}", "  ref: main\n")) == first
    with pytest.raises(WorkspaceError, match="neither a branch nor a tag.*feature, main"):
        resolve_commit(_spec(tmp_path, repo.path, "  ref: nope\n"))


def test_relative_path_is_relative_to_the_yaml_file(tmp_path, repo_factory):
    repo = repo_factory("rel", files={"job.py": "X = 1\n"})
    spec = _spec(tmp_path, "../remotes/rel")
    assert resolve_commit(spec) == repo.head()


def test_checkout_is_pinned_to_the_commit_even_after_a_push(tmp_path, repo_factory):
    repo = repo_factory(files={"job.py": "X = 1\n", "bin/tool.sh": "#!/bin/sh\n"})
    os.chmod(repo.path / "bin/tool.sh", 0o755)
    pinned = repo.commit("exec bit")
    spec = _spec(tmp_path, repo.path)
    assert resolve_commit(spec) == pinned
    repo.write("job.py", "X = 2\n")
    repo.commit("pushed during the run")
    root = checkout(spec, pinned)
    assert root.name == pinned
    assert (root / "job.py").read_text() == "X = 1\n"
    assert os.access(root / "bin/tool.sh", os.X_OK)
    assert not (root / ".git").exists()


def test_unknown_commit_is_a_clear_error(tmp_path, repo_factory):
    repo = repo_factory(files={"job.py": "X = 1\n"})
    spec = _spec(tmp_path, repo.path, "  ref: " + "ab" * 20 + "\n")
    with pytest.raises(WorkspaceError, match="not in"):
        checkout(spec, "ab" * 20)


def test_missing_remote_is_a_clear_error(tmp_path):
    spec = _spec(tmp_path, tmp_path / "does-not-exist")
    with pytest.raises(WorkspaceError, match="cannot list the refs"):
        resolve_commit(spec)


def test_requirements_from_file_or_list(tmp_path, repo_factory):
    repo = repo_factory(files={"sub/req.txt": "# comment\ntoolz\n\n", "sub/job.py": ""})
    spec = _spec(tmp_path, repo.path, "  subdir: sub\n  requirements: req.txt\n")
    root = checkout(spec, repo.head())
    assert requirements_of(spec, root, root / "sub")[-1] == "toolz"
    listed = _spec(tmp_path, repo.path, "  requirements: [toolz, 'msgpack>=1']\n")
    assert requirements_of(listed, root, root)[-2:] == ["toolz", "msgpack>=1"]
    missing = _spec(tmp_path, repo.path, "  requirements: nope.txt\n")
    with pytest.raises(WorkspaceError, match="nope.txt"):
        requirements_of(missing, root, root)


def _prepare_in_child(args):
    path, commit = args
    ws = prepare(load_file(path), commit)
    return str(ws.code_dir), str(ws.python), (ws.code_dir / "job.py").read_text()


@pytest.mark.e2e
def test_concurrent_runs_share_one_checkout_and_venv(tmp_path, repo_factory, monkeypatch):
    monkeypatch.setenv("DAGFACTORY_HOME", str(tmp_path / "home"))
    repo = repo_factory(files={"job.py": "X = 'concurrent'\n"})
    path = write_pipeline(
        tmp_path / "pipelines", "p", f"source:\n  git: {repo.path}\nentrypoint: job:main\n"
    )
    with ProcessPoolExecutor(3) as pool:
        results = list(pool.map(_prepare_in_child, [(path, repo.head())] * 3))
    assert len(set(results)) == 1
    assert results[0][2] == "X = 'concurrent'\n"
    home = tmp_path / "home"
    assert len(list((home / "checkouts").iterdir())) == 1 + 0  # no temp dirs left behind
    assert len([p for p in (home / "venvs").iterdir() if p.is_dir()]) == 1


@pytest.mark.e2e
def test_second_prepare_reuses_checkout_and_venv(tmp_path, wordcount_repo):
    spec = load_file(
        write_pipeline(
            tmp_path,
            "wc",
            f"source:\n  git: {wordcount_repo.path}\n  requirements: requirements.txt\n"
            "entrypoint: wordcount.job:main\n",
        )
    )
    commit = resolve_commit(spec)
    first = prepare(spec, commit)
    marker = first.venv_dir / ".dagfactory-complete"
    before = (first.code_dir.stat().st_ino, marker.stat().st_mtime_ns, first.python.stat().st_ino)
    second = prepare(spec, commit)
    after = (second.code_dir.stat().st_ino, marker.stat().st_mtime_ns, second.python.stat().st_ino)
    assert second == first and after == before
    assert str(first.venv_dir).startswith(str(dagfactory_home()))
    check = subprocess.run(
        [str(first.python), "-c", "import distributed, sys; print(sys.prefix)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert check.stdout.strip() == str(first.venv_dir)
    # compiled at install time: cluster processes need not compile Dask at every start
    assert list(first.venv_dir.glob("lib/python*/site-packages/distributed/__pycache__/*.pyc"))


@pytest.mark.e2e
def test_a_venv_build_that_died_half_way_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGFACTORY_HOME", str(tmp_path / "home"))
    reqs = ["distributed", "bokeh>=3.1"]
    venv = virtualenv(reqs)
    (venv / ".dagfactory-complete").unlink()
    (venv / "bin" / "python").unlink()  # as if the build had been killed
    again = virtualenv(reqs)
    assert again == venv and (venv / "bin" / "python").exists()


_NO_GIT = textwrap.dedent(
    """
    import shutil, sys
    assert shutil.which("git") is None, "git is still on PATH"
    from dagfactory.load import load_file
    from dagfactory.workspace import checkout, resolve_commit
    spec = load_file(sys.argv[1])
    root = checkout(spec, resolve_commit(spec))
    print((root / "job.py").read_text())
    """
)


def test_works_on_a_host_without_a_git_binary(tmp_path, repo_factory):
    repo = repo_factory(files={"job.py": "X = 'no git here'\n"})
    path = write_pipeline(
        tmp_path / "pipelines", "p", f"source:\n  git: file://{repo.path}\nentrypoint: job:main\n"
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    out = subprocess.run(
        [sys.executable, "-c", _NO_GIT, str(path)],
        env={**os.environ, "PATH": str(bin_dir), "DAGFACTORY_HOME": str(tmp_path / "home")},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "X = 'no git here'" in out.stdout
