"""Real git repositories in temp dirs, fetched with dulwich, cached by commit."""

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ProcessPoolExecutor

import pytest

from dagfactory.errors import WorkspaceError
from dagfactory.run.workspace import (
    checkout,
    dagfactory_home,
    prepare,
    requirements_of,
    resolve_commit,
    virtualenv,
)
from dagfactory.spec.load import load_file
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
    before = (first.code_dir.stat().st_ino, marker.stat().st_ino, first.python.stat().st_ino)
    second = prepare(spec, commit)
    after = (second.code_dir.stat().st_ino, marker.stat().st_ino, second.python.stat().st_ino)
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
    from dagfactory.spec.load import load_file
    from dagfactory.run.workspace import checkout, resolve_commit
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


# --- fetching only the resolved commit ------------------------------------------------------


def _objects_of_tip(repo, ref: str) -> set[str]:
    """The commit `ref` names, its tree and every tree and blob under it (no history)."""
    listed = git(repo.path, "ls-tree", "-r", "-t", ref).splitlines()
    tree = git(repo.path, "rev-parse", f"{ref}^{{tree}}")
    return {git(repo.path, "rev-parse", ref), tree, *(line.split()[2] for line in listed)}


def _mirror_objects(home) -> set[str]:
    from dulwich.repo import Repo

    (mirror,) = [p for p in (home / "repos").iterdir() if p.is_dir()]
    with Repo(str(mirror)) as repo:
        return {sha.decode() for sha in repo.object_store}


def _repo_with_broken_branch(repo_factory):
    """main with two commits, and a gh-pages branch whose first commit's object is gone."""
    repo = repo_factory(files={"job.py": "X = 1\n"})
    repo.write("job.py", "X = 2\n")
    repo.commit("second")
    git(repo.path, "checkout", "-q", "--orphan", "gh-pages")
    git(repo.path, "rm", "-q", "-rf", ".")
    repo.write("index.html", "<p>docs</p>\n")
    lost = repo.commit("pages")
    repo.write("index2.html", "<p>more</p>\n")
    repo.commit("pages 2")
    git(repo.path, "checkout", "-q", "main")
    (repo.path / ".git" / "objects" / lost[:2] / lost[2:]).unlink()
    return repo


@pytest.mark.parametrize("transport", ["path", "http"])
def test_a_broken_unrelated_branch_does_not_stop_the_fetch(
    tmp_path, repo_factory, monkeypatch, transport
):
    from tests.gitserver import http_git_server

    home = tmp_path / "home"
    monkeypatch.setenv("DAGFACTORY_HOME", str(home))
    repo = _repo_with_broken_branch(repo_factory)
    with http_git_server(repo.path.parent) as server:
        url = repo.path if transport == "path" else f"{server.url}/{repo.path.name}"
        spec = _spec(tmp_path, url, "  ref: main\n")
        commit = resolve_commit(spec)
        root = checkout(spec, commit)
    assert commit == repo.head()
    assert (root / "job.py").read_text() == "X = 2\n"
    # one commit deep, and nothing of gh-pages: exactly the tip's commit, trees and blobs
    assert _mirror_objects(home) == _objects_of_tip(repo, "main")


def test_a_second_commit_is_fetched_next_to_the_first(tmp_path, repo_factory, monkeypatch):
    monkeypatch.setenv("DAGFACTORY_HOME", str(tmp_path / "home"))
    repo = repo_factory(files={"job.py": "X = 1\n", "data.txt": "unchanged\n"})
    spec = _spec(tmp_path, repo.path)
    first = checkout(spec, resolve_commit(spec))
    repo.write("job.py", "X = 2\n")
    repo.commit("second")
    second = checkout(spec, resolve_commit(spec))
    assert (first / "job.py").read_text() == "X = 1\n"
    assert (second / "job.py").read_text() == "X = 2\n"
    assert (second / "data.txt").read_text() == "unchanged\n"


# --- errors a user can act on ---------------------------------------------------------------


def test_http_errors_say_what_to_do_and_hold_no_secret(tmp_path, repo_factory, monkeypatch):
    from dagfactory.run.workspace import Credentials
    from tests.gitserver import free_port, http_git_server

    repo = repo_factory(files={"job.py": "X = 1\n"})
    secret = "s3cr3t-t0ken-value"
    good = Credentials("alice", "right-token")
    with http_git_server(repo.path.parent, {"alice": "right-token", "bob": "x"}, {"bob"}) as srv:
        url = f"{srv.url}/{repo.path.name}"
        conn = "  connection: git_http\n"
        cases = [
            (
                f"{srv.url}/nope",
                good,
                "no git repository at .*/nope \\(HTTP 404\\); check source.git",
            ),
            (url, None, "asks for credentials \\(HTTP 401\\); set source.connection"),
            (url, Credentials("alice", secret), "authentication failed \\(HTTP 401\\).*'git_http'"),
            (url, Credentials("bob", "x"), "authentication failed \\(HTTP 403\\).*'git_http'"),
        ]
        for target, creds, expected in cases:
            with pytest.raises(WorkspaceError, match=expected) as info:
                resolve_commit(_spec(tmp_path, target, conn), creds)
            assert secret not in str(info.value) and "Error(" not in str(info.value)
        assert resolve_commit(_spec(tmp_path, url, conn), good) == repo.head()
    closed = f"http://127.0.0.1:{free_port()}/repo"
    with pytest.raises(WorkspaceError, match="connection to 127.0.0.1 refused; check the host"):
        resolve_commit(_spec(tmp_path, closed))
    with pytest.raises(WorkspaceError, match="unknown host no-such-host.invalid; check"):
        resolve_commit(_spec(tmp_path, "https://no-such-host.invalid/repo.git"))


def test_path_and_commit_errors_say_what_to_do(tmp_path, repo_factory, monkeypatch):
    monkeypatch.setenv("DAGFACTORY_HOME", str(tmp_path / "home"))
    with pytest.raises(WorkspaceError, match="no git repository at .*/nowhere; check source.git"):
        resolve_commit(_spec(tmp_path, tmp_path / "nowhere"))
    repo = repo_factory(files={"job.py": "X = 1\n"})
    missing = "0123456789" * 4
    spec = _spec(tmp_path, repo.path, f"  ref: {missing}\n")
    with pytest.raises(WorkspaceError, match=f"commit {missing} is not in any branch or tag"):
        checkout(spec, resolve_commit(spec))


# --- abbreviated shas -----------------------------------------------------------------------


def test_an_unambiguous_short_sha_is_the_commit_it_starts(tmp_path, repo_factory, monkeypatch):
    from tests.gitserver import http_git_server

    monkeypatch.setenv("DAGFACTORY_HOME", str(tmp_path / "home"))
    repo = repo_factory(files={"job.py": "X = 1\n"})
    old = repo.head()
    repo.write("job.py", "X = 2\n")
    repo.commit("second")
    with http_git_server(repo.path.parent) as server:
        for url in (repo.path, f"{server.url}/{repo.path.name}"):
            spec = _spec(tmp_path, url, f"  ref: '{old[:7]}'\n")
            assert resolve_commit(spec) == old  # not a branch tip: found in the history
            assert (checkout(spec, old) / "job.py").read_text() == "X = 1\n"
    with pytest.raises(WorkspaceError, match="neither a branch nor a tag .* nor the start"):
        resolve_commit(_spec(tmp_path, repo.path, "  ref: abcdef0\n"))


def test_an_ambiguous_short_sha_lists_the_candidates(tmp_path, repo_factory):
    from dulwich.objects import Commit
    from dulwich.repo import Repo

    repo = repo_factory(files={"job.py": "X = 1\n"})
    with Repo(str(repo.path)) as r:
        head = r[r.head()]
        seen: dict[str, Commit] = {}
        for i in range(100_000):  # two commits whose shas share 4 characters (birthday)
            c = Commit()
            c.tree, c.parents, c.message = head.tree, [head.id], f"candidate {i}\n".encode()
            c.author = c.committer = b"Test <test@example.invalid>"
            c.author_time = c.commit_time = 1_700_000_000
            c.author_timezone = c.commit_timezone = 0
            prefix = c.id.decode()[:4]
            if prefix in seen:
                break
            seen[prefix] = c
        pair = [seen[prefix], c]
        for n, commit in enumerate(pair):
            r.object_store.add_object(commit)
            r.refs[f"refs/heads/b{n}".encode()] = commit.id
    expected = f"'{prefix}' is the start of 2 commits of .*{pair[0].id.decode()[:12]} \\(candidate"
    with pytest.raises(WorkspaceError, match=expected) as info:
        resolve_commit(_spec(tmp_path, repo.path, f"  ref: '{prefix}'\n"))
    assert "write more characters of the sha" in str(info.value)
    longer = pair[1].id.decode()[:12]
    assert resolve_commit(_spec(tmp_path, repo.path, f"  ref: '{longer}'\n")) == pair[1].id.decode()


# --- credentials ----------------------------------------------------------------------------


def test_credentials_from_a_uri_or_airflow_json_and_a_secret_free_repr(monkeypatch):
    import json
    from urllib.parse import quote

    from dagfactory.run.workspace import Credentials, credentials_from_env

    key = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\n"
        "b3BlbnNzaC1rZXktdjE=\n"
        "-----END OPENSSH PRIVATE KEY-----\n"
    )
    uri = (
        f"ssh://git@git.example:2222?private_key={quote(key, safe='')}"
        "&no_host_key_check=true&private_key_passphrase=pw"
    )
    monkeypatch.setenv("AIRFLOW_CONN_GIT_SSH", uri)
    from_uri = credentials_from_env("git_ssh")
    extra = {"private_key": key, "no_host_key_check": True, "private_key_passphrase": "pw"}
    as_json = {"conn_type": "ssh", "login": "git", "host": "git.example", "port": 2222}
    for form in ({**as_json, "extra": extra}, {**as_json, "extra": json.dumps(extra)}):
        monkeypatch.setenv("AIRFLOW_CONN_GIT_SSH", json.dumps(form))
        assert credentials_from_env("git_ssh") == from_uri
    assert from_uri == Credentials(
        "git", None, key, passphrase="pw", no_host_key_check=True, port=2222
    )
    monkeypatch.setenv("AIRFLOW_CONN_GIT_HTTP", "https://alice:t%40ken@github.com")
    assert credentials_from_env("git_http") == Credentials("alice", "t@ken")
    for shown in (repr(from_uri), str(credentials_from_env("git_http"))):
        assert "b3BlbnNzaC1rZXktdjE" not in shown and "t@ken" not in shown and "pw" not in shown
    monkeypatch.setenv("AIRFLOW_CONN_GIT_HTTP", '{"login": "alice", "password": "t0k3n"')
    with pytest.raises(WorkspaceError, match="neither a connection URI nor") as info:
        credentials_from_env("git_http")
    assert "t0k3n" not in str(info.value)


# --- the working tree of a local repository -------------------------------------------------


def test_local_changes_lists_what_a_commit_run_would_miss(tmp_path, repo_factory):
    from dagfactory.run.workspace import local_changes

    repo = repo_factory(
        files={
            "sub/job.py": "X = 1\n",
            "sub/gone.py": "",
            "sub/staged.py": "",
            "other.py": "",
            ".gitignore": "*.log\n",
        }
    )
    in_sub = _spec(tmp_path, repo.path, "  subdir: sub\n")
    assert local_changes(in_sub) == []
    repo.write("sub/job.py", "X = 2\n")  # modified
    (repo.path / "sub/gone.py").unlink()  # deleted
    repo.write("sub/staged.py", "Y = 1\n")
    git(repo.path, "add", "sub/staged.py")  # staged
    repo.write("sub/new/mod.py", "")  # untracked, in a new folder
    repo.write("sub/run.log", "ignored\n")  # ignored by .gitignore
    repo.write("other.py", "outside the subdir\n")
    assert local_changes(in_sub) == ["sub/gone.py", "sub/job.py", "sub/new/mod.py", "sub/staged.py"]
    assert "other.py" in local_changes(_spec(tmp_path, repo.path))
    assert (
        local_changes(_spec(tmp_path, f"file://{repo.path}", "  subdir: sub\n"))[0] == "sub/gone.py"
    )
    bare = tmp_path / "bare.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo.path), str(bare))
    assert local_changes(_spec(tmp_path, bare)) == []
    assert local_changes(_spec(tmp_path, "https://github.com/acme/pipelines.git")) == []


@pytest.mark.e2e
def test_prepare_worktree_runs_the_working_tree_as_it_is(tmp_path, repo_factory):
    from dagfactory.run.workspace import prepare_worktree

    repo = repo_factory(files={"sub/job.py": "X = 'committed'\n"})
    repo.write("sub/job.py", "X = 'uncommitted'\n")
    repo.write("sub/helper.py", "Y = 'untracked'\n")
    spec = _spec(tmp_path, repo.path, "  subdir: sub\n")
    ws = prepare_worktree(spec)
    assert ws.commit == f"{repo.head()}+worktree"
    assert ws.code_dir == (repo.path / "sub").resolve()
    out = subprocess.run(
        [str(ws.python), "-c", "import job, helper, distributed; print(job.X, helper.Y)"],
        cwd=ws.code_dir,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["uncommitted", "untracked"]
    with pytest.raises(WorkspaceError, match="not a repository on this machine"):
        prepare_worktree(_spec(tmp_path, "https://github.com/acme/pipelines.git"))
