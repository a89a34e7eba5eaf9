"""Credentials never leak: real authenticating git servers on loopback (git http-backend behind
Basic auth, and sshd with a key), real Airflow runs and real `dagfactory run` processes; then
every place a secret could end up is searched for it."""

from __future__ import annotations

import glob
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import quote

import pytest

from dagfactory.errors import WorkspaceError
from dagfactory.run.workspace import Credentials, checkout, dagfactory_home, resolve_commit
from dagfactory.spec.load import load_file
from tests.conftest import EXAMPLE, make_repo, write_pipeline
from tests.gitserver import http_git_server, keygen, ssh_git_server

pytestmark = pytest.mark.e2e

TOKEN = f"tok-{secrets.token_hex(12)}"
WRONG = f"wrong-{secrets.token_hex(12)}"
PASSPHRASE = f"pass-{secrets.token_hex(8)}"


class Servers:
    """The session's git servers, the repository they serve, and every secret involved."""

    def __init__(self, root: Path):
        self.repo = make_repo(root / "served" / "wordcount", copy_from=EXAMPLE)
        self.keys = root / "keys"
        self.keys.mkdir()
        public = keygen(self.keys / "plain")
        public_locked = keygen(self.keys / "locked", PASSPHRASE)
        keygen(self.keys / "stranger")
        self.key = (self.keys / "plain").read_text()
        self.locked_key = (self.keys / "locked").read_text()
        self.stranger_key = (self.keys / "stranger").read_text()
        self.public_keys = [public, public_locked]
        self.http = None
        self.ssh = None

    def secrets(self) -> list[str]:
        """The token, passwords, passphrase, and each key's text and every line of its body."""
        found = [TOKEN, WRONG, PASSPHRASE]
        for key in (self.key, self.locked_key, self.stranger_key):
            found.append(key)
            found += [line for line in key.splitlines() if line and not line.startswith("---")]
        return found


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("secrets")
    found = Servers(root)
    with (
        http_git_server(found.repo.path.parent, {"alice": TOKEN}) as http,
        ssh_git_server(root / "sshd", found.public_keys) as ssh,
    ):
        found.http, found.ssh = http, ssh
        yield found


class PsSampler:
    """`ps -eo args` taken again and again while a block runs: every command line seen."""

    def __init__(self):
        self.samples: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True)
            self.samples.append(out.stdout)
            self._stop.wait(0.05)

    def __enter__(self) -> PsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _leaks(texts: dict[str, str], servers: Servers) -> list[str]:
    """Where (by name) any secret shows up in the given texts."""
    return [
        f"{where}: secret {secret[:6]}..."
        for where, text in texts.items()
        for secret in servers.secrets()
        if secret in text
    ]


def _cache_files() -> dict[str, str]:
    """Every file of the mirrors and checkouts under DAGFACTORY_HOME (venvs are no git's)."""
    found = {}
    for part in ("repos", "checkouts"):
        for path in (dagfactory_home() / part).rglob("*"):
            if path.is_file() and not path.is_symlink():
                found[str(path)] = path.read_bytes().decode("latin-1")
    return found


def _ssh_temp_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "dagfactory-ssh-*")))


def _pipeline(folder: Path, name: str, url: str, connection: str) -> Path:
    return write_pipeline(
        folder,
        name,
        f"""
        source:
          git: "{url}"
          requirements: requirements.txt
          connection: {connection}
        entrypoint: wordcount.job:main
        params: {{chunks: 4, top: 2, label: "{name}"}}
        cluster: {{workers: 1, memory: 1GiB}}
        """,
    )


def _ssh_url(servers: Servers) -> str:
    return f"ssh://{servers.ssh.user}@127.0.0.1:{servers.ssh.port}{servers.repo.path}"


def _airflow_records(dag_run) -> dict[str, str]:
    """The run's XCom values and rendered template fields, as stored in the metadata DB."""
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    found = {}
    with create_session() as session:
        for row in session.scalars(
            select(XComModel).where(
                XComModel.dag_id == dag_run.dag_id, XComModel.run_id == dag_run.run_id
            )
        ):
            found[f"xcom {row.task_id} {row.key}"] = str(row.value)
        rendered = session.scalars(
            select(RTIF).where(RTIF.dag_id == dag_run.dag_id, RTIF.run_id == dag_run.run_id)
        ).all()
        for row in rendered:
            found[f"rendered fields {row.task_id}"] = json.dumps(row.rendered_fields, default=str)
    assert any(k.startswith("xcom") for k in found), "the run stored no XCom"
    assert any(k.startswith("rendered") for k in found), "the run stored no rendered fields"
    return found


def _log_files() -> dict[str, str]:
    logs = Path(os.environ["AIRFLOW_HOME"]) / "logs"
    return {str(p): p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file()}


@pytest.mark.parametrize("transport", ["http", "ssh"])
def test_an_airflow_run_with_a_connection_leaks_no_secret(
    airflow_db, tmp_path, servers, monkeypatch, capfd, transport
):
    from airflow.utils.cli import get_bagged_dag

    if transport == "http":
        url = f"{servers.http.url}/{servers.repo.path.name}"
        # Airflow's URI form of a connection
        monkeypatch.setenv("AIRFLOW_CONN_GIT_HTTP", f"http://alice:{quote(TOKEN)}@127.0.0.1")
    else:
        url = _ssh_url(servers)
        extra = {
            "private_key": servers.locked_key,
            "private_key_passphrase": PASSPHRASE,
            "host_key": servers.ssh.host_key,
        }
        # Airflow's JSON form of a connection; the key has a passphrase
        conn = {"conn_type": "ssh", "login": servers.ssh.user, "host": "127.0.0.1"}
        monkeypatch.setenv("AIRFLOW_CONN_GIT_SSH", json.dumps({**conn, "extra": extra}))
    dag_id = f"secret_{transport}"
    path = _pipeline(tmp_path / "pipelines", dag_id, url, f"git_{transport}")
    monkeypatch.setenv("DAGFACTORY_PIPELINES_DIR", str(path.parent))
    requests_before = len(servers.http.requests)
    temp_dirs = _ssh_temp_dirs()
    with PsSampler() as ps:
        dag_run = get_bagged_dag(None, dag_id).test()
    states = {ti.task_id: str(ti.state) for ti in dag_run.get_task_instances()}
    assert str(dag_run.state) == "success", states
    if transport == "http":  # the code came through the authenticating server
        assert (
            f"POST /{servers.repo.path.name}/git-upload-pack 200"
            in servers.http.requests[requests_before:]
        )
    else:
        assert "Accepted publickey" in (servers.ssh.log).read_text()
    assert _ssh_temp_dirs() == temp_dirs  # the key file is gone
    output = capfd.readouterr()
    texts = {
        **_log_files(),
        **_airflow_records(dag_run),
        **_cache_files(),
        "task output (stdout)": output.out,
        "task output (stderr)": output.err,
        **{f"ps sample {i}": sample for i, sample in enumerate(ps.samples)},
    }
    assert len(ps.samples) >= 3
    # the search would see a secret: the connection itself holds one, and the logs are there
    conn_text = os.environ[f"AIRFLOW_CONN_GIT_{transport.upper()}"]
    assert _leaks({"the connection": conn_text.replace("\\n", "\n")}, servers)
    assert any("is commit" in text for text in texts.values()), "no task log was searched"
    assert _leaks(texts, servers) == []


def _cli(pipeline: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, PsSampler]:
    with PsSampler() as ps:
        out = subprocess.run(
            [sys.executable, "-m", "dagfactory.cli", "run", str(pipeline)],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
    return out, ps


def test_dagfactory_run_with_a_token_or_a_key_leaks_no_secret(tmp_path, servers):
    http_url = f"{servers.http.url}/{servers.repo.path.name}"
    scp_url = f"{servers.ssh.user}@127.0.0.1:{servers.repo.path}"  # the port is the connection's
    key_uri = (
        f"ssh://{servers.ssh.user}@127.0.0.1:{servers.ssh.port}"
        f"?private_key={quote(servers.key, safe='')}"
        f"&host_key={quote(servers.ssh.host_key, safe='')}"
    )
    runs = {
        "cli_token": (http_url, {"AIRFLOW_CONN_GIT": f"https://alice:{TOKEN}@127.0.0.1"}),
        "cli_key": (scp_url, {"AIRFLOW_CONN_GIT": key_uri}),
        "cli_wrong": (http_url, {"AIRFLOW_CONN_GIT": f"https://alice:{WRONG}@127.0.0.1"}),
    }
    texts = {}
    temp_dirs = _ssh_temp_dirs()
    for name, (url, env) in runs.items():
        out, ps = _cli(_pipeline(tmp_path / name, name, url, "git"), env)
        if name == "cli_wrong":
            assert out.returncode != 0
            assert "authentication failed (HTTP 401)" in out.stderr
            assert "Traceback" not in out.stderr
        else:
            assert out.returncode == 0, out.stderr[-3000:]
            assert json.loads(out.stdout.splitlines()[-1])["label"] == name
        texts |= {f"{name} stdout": out.stdout, f"{name} stderr": out.stderr}
        texts |= {f"{name} ps sample {i}": sample for i, sample in enumerate(ps.samples)}
        assert len(ps.samples) >= 3
    assert _ssh_temp_dirs() == temp_dirs
    texts |= _cache_files()
    assert _leaks(texts, servers) == []


def test_failed_fetches_name_the_connection_not_the_secret(tmp_path, servers, monkeypatch):
    monkeypatch.setenv("DAGFACTORY_HOME", str(tmp_path / "home"))  # nothing cached: all fetch

    def spec(url: str, ref: str = "") -> object:
        text = f"source:\n  git: '{url}'\n  connection: git\n{ref}entrypoint: job:main\n"
        return load_file(write_pipeline(tmp_path, "p", text))

    http_url = f"{servers.http.url}/{servers.repo.path.name}"
    pinned = spec(http_url, f"  ref: {servers.repo.head()}\n")
    messages = []
    for target, creds, expected in [
        (spec(http_url), Credentials("alice", WRONG), "authentication failed (HTTP 401)"),
        (pinned, Credentials("alice", WRONG), "authentication failed (HTTP 401)"),
        (
            spec(_ssh_url(servers)),
            Credentials("root", private_key=servers.stranger_key, host_key=servers.ssh.host_key),
            "refused the key of the Airflow connection 'git'",
        ),
        (
            spec(_ssh_url(servers)),
            Credentials("root", private_key=servers.key, host_key=servers.public_keys[0]),
            "the host key of 127.0.0.1 is unknown or does not match",
        ),
        (
            spec(_ssh_url(servers)),
            Credentials(
                "root",
                private_key=servers.locked_key,
                passphrase=WRONG,
                host_key=servers.ssh.host_key,
            ),
            "refused the key of the Airflow connection 'git'",
        ),
    ]:
        with pytest.raises(WorkspaceError) as info:
            if target is pinned:  # a full sha: no ref listing, the fetch itself fails
                checkout(target, servers.repo.head(), creds)
            else:
                resolve_commit(target, creds)
        assert expected in str(info.value)
        messages.append(str(info.value))
    assert _leaks({f"message {i}": m for i, m in enumerate(messages)}, servers) == []
