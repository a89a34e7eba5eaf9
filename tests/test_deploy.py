"""deploy/: what a user relies on when deploying from these files, checked without Docker or
Kubernetes (neither is on this machine): the compose file, the Helm values and the Dockerfile
agree with each other, with the repository's layout, and with the settings the multi-host test
(tests/test_topology.py) runs Airflow with.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import re
import shlex
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from dagfactory.spec.pipeline import ClusterSpec
from tests import topology

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
HELM_VALUES = DEPLOY / "helm" / "values.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"

# Where the official Helm chart mounts the git-sync checkout (airflowHome + /dags/repo).
CHART_REPO_MOUNT = PurePosixPath("/opt/airflow/dags/repo")


def _interpolate(text: str) -> str:
    """What compose makes of `${NAME:-default}` and `${NAME:?message}` with NAME unset: the
    default, or a stand-in for a value the user must set."""
    return re.sub(
        r"\$\{(\w+)(?::([-?])([^}]*))?\}",
        lambda m: m.group(3) if m.group(2) == "-" else f"<{m.group(1)}>",
        text,
    )


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(_interpolate(COMPOSE_FILE.read_text()))


@pytest.fixture(scope="module")
def helm() -> dict:
    return yaml.safe_load(HELM_VALUES.read_text())


def _airflow_services(compose: dict) -> dict[str, dict]:
    image = compose["x-airflow-common"]["image"]
    return {name: s for name, s in compose["services"].items() if s.get("image") == image}


def _workers(compose: dict) -> dict[str, dict]:
    return {
        name: s
        for name, s in _airflow_services(compose).items()
        if str(s.get("command", "")).startswith("celery worker")
    }


def _queues(command: str) -> set[str]:
    args = shlex.split(command)
    return set(args[args.index("--queues") + 1].split(","))


def _mounts(service: dict) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) of a service's short-syntax volumes."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        mounts[target] = (source, mode[0] if mode else "rw")
    return mounts


def _host_path(service: dict, container_path: str) -> tuple[Path, str]:
    """The path on the Docker host behind `container_path` (bind mounts are relative to the
    compose file's folder), and the mount's mode."""
    path = PurePosixPath(container_path)
    for target, (source, mode) in _mounts(service).items():
        if path.is_relative_to(target):
            return (DEPLOY / source / path.relative_to(target)).resolve(), mode
    raise AssertionError(f"nothing is mounted at {container_path}")


def _pool_created(command: list[str]) -> str:
    """The pool name of the `airflow pools set NAME SLOTS DESCRIPTION` a command runs (an
    argument list, or a `bash -c` script)."""
    words = shlex.split(command[-1]) if command[:2] == ["bash", "-c"] else command
    i = next(i for i in range(len(words) - 1) if words[i : i + 2] == ["pools", "set"])
    name, slots = words[i + 2], words[i + 3]
    assert int(slots) > 0, words
    return name


def _documented_pool() -> str:
    """The pool name the field's own documentation (the JSON Schema, the editor) tells users to
    create."""
    field = next(f for f in dataclasses.fields(ClusterSpec) if f.name == "pool")
    return re.search(r"airflow pools set (\S+)", field.metadata["description"]).group(1)


def _dockerfile_args() -> dict[str, str]:
    text = DOCKERFILE.read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))


def _topology_settings() -> dict:
    """The executor, queues, pool and cluster block that tests/test_topology.py runs with,
    read from its source (a test module is not imported by another)."""
    tree = ast.parse((ROOT / "tests" / "test_topology.py").read_text())
    found: dict = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("POOL", "CLUSTER"):
                found[node.targets[0].id] = ast.literal_eval(node.value)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "AIRFLOW__CORE__EXECUTOR":
                    found["executor"] = ast.literal_eval(value)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "zip"
            and isinstance(node.args[0], ast.Attribute)
            and node.args[0].attr == "hosts"
        ):
            found["queues"] = set(ast.literal_eval(node.args[1]))
    return found


# --- docker compose ------------------------------------------------------------------------------


def test_every_airflow_service_uses_celery_postgres_and_redis(compose):
    services = compose["services"]
    airflow = _airflow_services(compose)
    assert set(airflow) >= {
        "airflow-init",
        "airflow-apiserver",
        "airflow-scheduler",
        "airflow-dag-processor",
    }
    for name, service in airflow.items():
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        db = urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        results = urlsplit(env["AIRFLOW__CELERY__RESULT_BACKEND"])
        broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
        assert db.scheme.startswith("postgresql") and results.scheme.startswith("db+postgresql")
        assert services[db.hostname]["image"].startswith("postgres:"), name
        assert results.hostname == db.hostname and results.path == db.path, name
        assert broker.scheme == "redis" and services[broker.hostname]["image"].startswith("redis:")
        # Task processes report to the api-server (Airflow 3's execution API), signed with one
        # JWT secret that every service shares.
        api = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert api.hostname == "airflow-apiserver" and api.path == "/execution/", name
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == "<JWT_SECRET>", name
        assert env["AIRFLOW__CORE__FERNET_KEY"] == "<FERNET_KEY>", name


def test_two_workers_listen_on_default_and_big(compose):
    workers = _workers(compose)
    queues = {name: _queues(w["command"]) for name, w in workers.items()}
    assert sorted(queues.values(), key=sorted) == [{"big"}, {"default"}], queues
    assert set(compose["x-dagfactory"]["queues"]) == {"default", "big"}


def test_each_worker_has_its_own_dagfactory_home_on_a_local_volume(compose):
    workers = _workers(compose)
    volumes = {}
    for name, worker in workers.items():
        home = worker["environment"]["DAGFACTORY_HOME"]
        source, mode = _mounts(worker)[home]
        assert source in compose["volumes"], f"{name}: {home} is no named volume"
        assert (compose["volumes"][source] or {}).get("driver", "local") == "local", name
        assert mode == "rw", name
        volumes[name] = source
    assert len(set(volumes.values())) == len(workers), volumes
    for name, service in compose["services"].items():
        if name not in workers:
            shared = {s for s, _ in _mounts(service).values()} & set(volumes.values())
            assert not shared, f"{name} mounts a worker's DAGFACTORY_HOME: {shared}"


def test_the_pool_is_created_with_the_documented_name(compose):
    pool = _documented_pool()
    assert pool == "dagfactory_clusters"
    init = compose["services"]["airflow-init"]
    assert _pool_created(init["command"]) == pool
    # Its entrypoint migrates the DB and creates the admin user before it runs the command.
    assert init["environment"]["_AIRFLOW_DB_MIGRATE"] == "true"
    assert init["environment"]["_AIRFLOW_WWW_USER_CREATE"] == "true"
    assert compose["x-dagfactory"]["pool"] == pool
    for name, service in _airflow_services(compose).items():
        if name != "airflow-init":
            needs = service["depends_on"]["airflow-init"]["condition"]
            assert needs == "service_completed_successfully", name


def test_the_loader_and_the_pipelines_are_where_airflow_and_dagfactory_look(compose):
    for name, service in _airflow_services(compose).items():
        env = service["environment"]
        dags, dags_mode = _host_path(service, env["AIRFLOW__CORE__DAGS_FOLDER"])
        pipelines, mode = _host_path(service, env["DAGFACTORY_PIPELINES_DIR"])
        assert (dags / "pipelines.py").read_text() == (ROOT / "dags" / "pipelines.py").read_text()
        assert pipelines == ROOT / "pipelines" and any(pipelines.glob("*.yml")), name
        assert mode == dags_mode == "ro", name
        # The layout the loader assumes without DAGFACTORY_PIPELINES_DIR: ../pipelines.
        loader_default = PurePosixPath(env["AIRFLOW__CORE__DAGS_FOLDER"]).parent / "pipelines"
        assert PurePosixPath(env["DAGFACTORY_PIPELINES_DIR"]) == loader_default, name


def test_the_image_is_built_from_deploy_dockerfile(compose):
    build = compose["x-airflow-common"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    # The context holds what the Dockerfile copies.
    for copied in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", DOCKERFILE.read_text(), re.M):
        for path in copied.split():
            assert (DEPLOY / build["context"] / path).exists(), path


# --- Dockerfile ----------------------------------------------------------------------------------


def test_the_image_runs_the_airflow_and_python_the_tests_run():
    args = _dockerfile_args()
    text = DOCKERFILE.read_text()
    assert "FROM apache/airflow:${AIRFLOW_VERSION}-python${PYTHON_VERSION}" in text
    assert args["AIRFLOW_VERSION"] == importlib.metadata.version("apache-airflow")
    assert args["PYTHON_VERSION"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    install = text[text.index("RUN pip install") :]
    assert '"/tmp/dagfactory-src[airflow,aws]"' in install
    assert "apache-airflow-providers-celery" in install
    assert '"apache-airflow==${AIRFLOW_VERSION}"' in install


# --- Helm ----------------------------------------------------------------------------------------


def test_helm_runs_the_dagfactory_image_with_celery_postgres_and_redis(helm):
    assert helm["executor"] == "CeleryExecutor"
    assert helm["images"]["airflow"]["repository"] != "apache/airflow"
    assert helm["airflowVersion"] == _dockerfile_args()["AIRFLOW_VERSION"]
    assert helm["postgresql"]["enabled"] is True and helm["redis"]["enabled"] is True


def test_helm_workers_listen_on_default_and_big(helm, compose):
    celery = helm["workers"]["celery"]
    queues = {"default": celery["queue"]} | {s["name"]: s["queue"] for s in celery["sets"]}
    assert queues == {"default": "default", "big": "big"}
    assert set(queues.values()) == set(compose["x-dagfactory"]["queues"])


def test_helm_workers_keep_dagfactory_home_on_an_empty_dir(helm):
    celery = helm["workers"]["celery"]
    home = {e["name"]: e["value"] for e in celery["env"]}["DAGFACTORY_HOME"]
    mount = next(m for m in celery["extraVolumeMounts"] if m["mountPath"] == home)
    volume = next(v for v in celery["extraVolumes"] if v["name"] == mount["name"])
    assert "emptyDir" in volume, volume
    # A set that named its own env or volumes would replace these lists (the chart's merge).
    for worker_set in celery["sets"]:
        assert not {"env", "extraVolumes", "extraVolumeMounts"} & set(worker_set), worker_set


def test_helm_creates_the_documented_pool(helm, compose):
    pool = _pool_created(helm["migrateDatabaseJob"]["args"])
    assert pool == _documented_pool() == compose["x-dagfactory"]["pool"]
    assert "airflow db migrate" in helm["migrateDatabaseJob"]["args"][-1]


def test_helm_pipelines_dir_is_in_the_synced_repository_beside_the_loader(helm):
    git_sync = helm["dags"]["gitSync"]
    assert git_sync["enabled"] is True
    dags_folder = CHART_REPO_MOUNT / git_sync["subPath"]
    env = {e["name"]: e["value"] for e in helm["env"]}
    pipelines = PurePosixPath(env["DAGFACTORY_PIPELINES_DIR"])
    assert pipelines == dags_folder.parent / "pipelines"
    # The same layout as this repository: dags/pipelines.py and pipelines/ side by side.
    assert (ROOT / dags_folder.relative_to(CHART_REPO_MOUNT) / "pipelines.py").is_file()
    assert (ROOT / pipelines.relative_to(CHART_REPO_MOUNT)).is_dir()


# --- the multi-host test runs what these files deploy --------------------------------------------


def test_the_multi_host_test_uses_the_compose_settings(compose):
    tested = _topology_settings()
    provided = compose["x-dagfactory"]
    airflow = next(iter(_airflow_services(compose).values()))
    assert tested["executor"] == airflow["environment"]["AIRFLOW__CORE__EXECUTOR"]
    assert tested["queues"] == set(provided["queues"])
    assert tested["POOL"] == provided["pool"]
    # One interface name that every host has (there dfx0, in compose eth0), so that one
    # pipeline file says `listen:` for all of them, never an address of one host.
    cluster = yaml.safe_load(tested["CLUSTER"] % "")
    assert cluster["listen"] == topology.INTERFACE
    for name in (topology.INTERFACE, provided["listen"]):
        assert re.fullmatch(r"[a-z]+[0-9]+", name), name
    for text in (COMPOSE_FILE.read_text(), HELM_VALUES.read_text()):
        assert f"listen: {provided['listen']}" in text
        assert f"pool: {provided['pool']}" in text
