"""Airflow's deployment path, started for real and reusable by any end-to-end test.

`airflow_services(...)` starts api-server, scheduler and DAG processor as separate processes
(each in its own process group), with the LocalExecutor and a SQLite metadata DB in a temp
AIRFLOW_HOME, on a free loopback port. Runs are triggered and watched through the REST API, as
a user or CI script would; the task instance ids of a run (for a census of its task processes)
are read from the DB file, which the API does not list for earlier tries.

Migrating a metadata DB takes Airflow tens of seconds; the session's DB, migrated by conftest
before any test runs, is copied instead (SQLite's backup API: consistent even while written).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import ROOT

SERVICES = ("api-server", "scheduler", "dag-processor")
FINISHED = ("success", "failed")

# A copy taken at import, during collection: before any test has written runs into it.
_SESSION_DB = Path(os.environ["AIRFLOW_HOME"]) / "airflow.db"
_TEMPLATE = _SESSION_DB.with_name("template.db")
if _SESSION_DB.is_file() and not _TEMPLATE.exists():
    with (
        contextlib.closing(sqlite3.connect(_SESSION_DB)) as src,
        contextlib.closing(sqlite3.connect(_TEMPLATE)) as dst,
    ):
        src.backup(dst)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServicesError(AssertionError):
    """Airflow did not do what a test waited for; the message ends with the services' logs."""


@dataclass
class AirflowServices:
    home: Path
    pipelines: Path
    env: dict[str, str]
    port: int
    host: str = "127.0.0.1"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    _token: str = ""
    login: tuple[str, str] | None = None  # (user, password); None: every request is an admin

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def db(self) -> Path:
        return self.home / "airflow.db"

    @property
    def logs(self) -> Path:
        return self.home / "service-logs"

    # --- REST API --------------------------------------------------------------------------

    def token(self) -> str:
        """A JWT for the REST API (and plugins): the login's, or any admin's without one."""
        request = urllib.request.Request(f"{self.url}/auth/token")
        if self.login:
            user, password = self.login
            request = urllib.request.Request(
                f"{self.url}/auth/token",
                data=json.dumps({"username": user, "password": password}).encode(),
                headers={"Content-Type": "application/json"},
            )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)["access_token"]

    def api(self, method: str, path: str, body: Any = None, missing_ok: bool = False) -> Any:
        """One call of the public REST API (/api/v2/...); None for a 404 when missing_ok."""
        if not self._token:
            self._token = self.token()
        request = urllib.request.Request(
            f"{self.url}/api/v2{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and missing_ok:
                return None
            raise ServicesError(
                f"{method} {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')}"
            ) from None

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5):
                    return
            except OSError:
                time.sleep(0.5)
        raise ServicesError(f"the api-server did not answer within {timeout:.0f}s" + self.tail())

    def wait_parsed(self, *dag_ids: str, timeout: float = 180) -> None:
        """Until the DAG processor has parsed every one of dag_ids."""
        deadline = time.monotonic() + timeout
        waiting = list(dag_ids)
        while waiting and time.monotonic() < deadline:
            self._check_alive()
            waiting = [d for d in waiting if self.api("GET", f"/dags/{d}", missing_ok=True) is None]
            if waiting:
                time.sleep(1)
        if waiting:
            raise ServicesError(f"never parsed: {', '.join(waiting)}" + self.tail())

    def trigger(self, dag_id: str, run_id: str, conf: dict | None = None) -> str:
        """Unpause dag_id and start a manual run of it (no logical date, as the UI does)."""
        self.api("PATCH", f"/dags/{dag_id}", {"is_paused": False})
        body = {"dag_run_id": run_id, "logical_date": None, "conf": conf or {}}
        self.api("POST", f"/dags/{dag_id}/dagRuns", body)
        return run_id

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict[str, Any]]:
        """The run's task instances by short task id ("run", not "pipeline.run")."""
        found = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")
        return {ti["task_id"].rsplit(".", 1)[-1]: ti for ti in found["task_instances"]}

    def states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {name: ti["state"] for name, ti in self.task_instances(dag_id, run_id).items()}

    def xcom(self, dag_id: str, run_id: str, task: str, key: str = "return_value") -> Any:
        path = (
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/pipeline.{task}"
            f"/xcomEntries/{key}?deserialize=true"
        )
        entry = self.api("GET", path, missing_ok=True)
        return None if entry is None else entry["value"]

    def wait_task(
        self, dag_id: str, run_id: str, task: str, states: tuple[str, ...], timeout: float = 300
    ) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            state = self.states(dag_id, run_id).get(task)
            if state in states:
                return state
            if self.run(dag_id, run_id)["state"] in FINISHED:
                break
            time.sleep(0.2)
        raise ServicesError(
            f"{dag_id} {run_id}: {task} never got to {'/'.join(states)}; tasks: "
            f"{self.states(dag_id, run_id)}" + self.tail()
        )

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        """The run's final state (success or failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            state = self.run(dag_id, run_id)["state"]
            if state in FINISHED:
                return state
            time.sleep(0.3)
        raise ServicesError(
            f"{dag_id} {run_id} did not finish within {timeout:.0f}s; tasks: "
            f"{self.states(dag_id, run_id)}" + self.tail()
        )

    def task_log(self, dag_id: str, run_id: str, task: str, chars: int = 4000) -> str:
        """The end of every attempt's log of pipeline.<task> in the run, for a failure message."""
        folder = self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}"
        parts = []
        for path in sorted(folder.glob(f"task_id=pipeline.{task}/**/*.log")):
            text = path.read_text(errors="replace")[-chars:]
            parts.append(f"\n--- {path.relative_to(folder)} ---\n{text}")
        return "".join(parts)

    def explain(self, dag_id: str, run_id: str) -> str:
        """Task states and the logs of the tasks that did not succeed."""
        states = self.states(dag_id, run_id)
        logs = "".join(
            self.task_log(dag_id, run_id, task)
            for task, state in states.items()
            if state != "success"
        )
        return f"{dag_id} {run_id}: {states}{logs}"

    # --- processes -------------------------------------------------------------------------

    def task_instance_ids(self, dag_id: str, run_id: str) -> set[str]:
        """Ids of every try of every task of the run: they are in its task processes' titles
        ("airflow worker -- <id>", "airflow worker -- LocalExecutor: <id>")."""
        query = (
            "SELECT id FROM task_instance WHERE dag_id = ? AND run_id = ? UNION "
            "SELECT task_instance_id FROM task_instance_history WHERE dag_id = ? AND run_id = ?"
        )
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as db:
            db.execute("PRAGMA busy_timeout = 10000")
            rows = db.execute(query, (dag_id, run_id, dag_id, run_id)).fetchall()
        # Stored as 32 hex digits; titles show the dashed form.
        return {str(_uuid(row[0])) for row in rows}

    def task_processes(self, dag_id: str, run_id: str) -> list[psutil.Process]:
        """Live supervisor and task-runner processes of any try of any task of the run."""
        ids = self.task_instance_ids(dag_id, run_id)
        found = []
        for proc in psutil.process_iter(["cmdline", "status"]):
            title = " ".join(proc.info["cmdline"] or [])
            if proc.info["status"] == psutil.STATUS_ZOMBIE or "airflow worker" not in title:
                continue
            if any(ti_id in title for ti_id in ids):
                found.append(proc)
        return found

    def service_groups(self) -> list[int]:
        return [proc.pid for proc in self.procs.values()]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal every process group of the services (executor and task processes included)."""
        for pgid in self.service_groups():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(1, deadline - time.monotonic()))
        self.kill(signal.SIGKILL)
        for proc in self.procs.values():
            proc.wait()

    def _check_alive(self) -> None:
        dead = {name: p.returncode for name, p in self.procs.items() if p.poll() is not None}
        if dead:
            raise ServicesError(f"Airflow services exited: {dead}" + self.tail())

    def tail(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            parts.append(f"\n--- {path.name} ---\n{path.read_text(errors='replace')[-chars:]}")
        return "".join(parts)


def _uuid(value: Any) -> Any:
    import uuid

    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


@contextlib.contextmanager
def airflow_services(
    home: Path,
    pipelines: Path,
    extra_env: dict[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    database: str | None = None,
    login: bool = False,
) -> Iterator[AirflowServices]:
    """Start the three services on the pipelines folder; stop every one of them on exit.

    host: the address the api-server listens on, which task processes call back on (the
    execution API): a bridge's address when workers run on other hosts (tests/topology.py).
    database: the SQLAlchemy URL of an empty metadata DB to migrate (Postgres), instead of a
    copy of the session's SQLite DB; `task_instance_ids` reads only the SQLite one.
    login: a real login (an admin user with a password, `services.login`) instead of Airflow's
    all-admins mode, whose middleware makes every request an admin's, credentials or not.
    """
    home.mkdir(parents=True)
    port = free_port()
    db = home / "airflow.db"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database or f"sqlite:///{db}",
        "DAGFACTORY_PIPELINES_DIR": str(pipelines),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API_AUTH__JWT_SECRET": os.urandom(16).hex(),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://{host}:{port}/execution/",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
        **(extra_env or {}),
    }
    credentials = None
    if login:
        credentials = ("admin", os.urandom(12).hex())
        passwords = home / "simple_auth_manager_passwords.json"
        passwords.write_text(json.dumps({credentials[0]: credentials[1]}))
        env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] = "False"
        env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = f"{credentials[0]}:admin"
        env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] = str(passwords)
    airflow = [sys.executable, "-m", "airflow"]
    if _TEMPLATE.is_file() and database is None:
        with (
            contextlib.closing(sqlite3.connect(_TEMPLATE)) as src,
            contextlib.closing(sqlite3.connect(db)) as dst,
        ):
            src.backup(dst)
    else:
        subprocess.run([*airflow, "db", "migrate"], env=env, check=True, capture_output=True)
    services = AirflowServices(home, pipelines, env, port, host, login=credentials)
    services.logs.mkdir()
    try:
        for name in SERVICES:
            with open(services.logs / f"{name}.log", "wb") as out:
                services.procs[name] = subprocess.Popen(
                    [*airflow, name],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        services.wait_ready()
        yield services
    finally:
        services.stop()
