"""Where the benchmark keeps its scratch data, and the interpreters and Airflow it runs.

Everything generated lives under `bench/.work/` (git-ignored): pipeline files, a private
AIRFLOW_HOME and DAGFACTORY_HOME, and a second virtualenv with the `dag-factory` package from
PyPI (it imports as `dagfactory` too, so it cannot share ours).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work"
PYTHON = sys.executable
DAG_FACTORY_VERSION = "1.1.0"
"""The `dag-factory` release compared against (1.x is the line that supports Airflow 3)."""
DAG_FACTORY_VENV = WORK / "dagfactory-venv"
PYCACHE = WORK / "pycache"
BYTECODE_VARIABLES = ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
"""Every process the benchmark starts reads and writes bytecode under PYCACHE.

This machine sets PYTHONDONTWRITEBYTECODE and its virtualenvs hold no .pyc files, so every
fresh interpreter would compile Airflow (and every other import) from source: seconds per
process that no production deployment pays. A private cache prefix fixes that without writing
into the shared virtualenv or the source tree.
"""


def airflow_env(home: Path, dags_folder: Path | None = None, **extra: str) -> dict[str, str]:
    """Environment of an Airflow process of the benchmark: private home, no examples."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW__", "_AIRFLOW_PARSING_CONTEXT"))
        and k not in ("AIRFLOW_HOME", "DAGFACTORY_HOME", "DAGFACTORY_PIPELINES_DIR")
        and k not in BYTECODE_VARIABLES
    }
    env.update(
        PYTHONPYCACHEPREFIX=str(PYCACHE),
        AIRFLOW_HOME=str(home),
        DAGFACTORY_HOME=str(home / "dagfactory"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
    )
    if dags_folder is not None:
        env["AIRFLOW__CORE__DAGS_FOLDER"] = str(dags_folder)
    env.update(extra)
    return env


def _uv() -> str:
    from uv import find_uv_bin

    return find_uv_bin()


def dag_factory_python(log=print) -> Path:
    """The interpreter of a virtualenv holding dag-factory and the same Airflow as ours."""
    python = DAG_FACTORY_VENV / "bin" / "python"
    airflow_version = version("apache-airflow")
    marker = DAG_FACTORY_VENV / ".bench-complete"
    wanted = f"dag-factory=={DAG_FACTORY_VERSION} apache-airflow=={airflow_version}"
    if marker.is_file() and marker.read_text() == wanted:
        return python
    log(f"creating {DAG_FACTORY_VENV} with {wanted}")
    shutil.rmtree(DAG_FACTORY_VENV, ignore_errors=True)
    subprocess.run([_uv(), "venv", "-q", "--python", PYTHON, str(DAG_FACTORY_VENV)], check=True)
    subprocess.run(
        [_uv(), "pip", "install", "-q", "--python", str(python), *wanted.split()], check=True
    )
    marker.write_text(wanted)
    return python


def package_versions(python: Path | str, *names: str) -> dict[str, str]:
    code = (
        "import json, sys\nfrom importlib.metadata import version\n"
        "print(json.dumps({n: version(n) for n in sys.argv[1:]}))"
    )
    out = subprocess.run(
        [str(python), "-c", code, *names], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout)


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    ours = package_versions(PYTHON, "apache-airflow", "distributed", "dask", "pyyaml", "uv")
    try:
        import yaml

        libyaml = "yes" if hasattr(yaml, "CSafeLoader") else "no"
    except ImportError:
        libyaml = "?"
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": ram,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "airflow": ours["apache-airflow"],
        "distributed": ours["distributed"],
        "dask": ours["dask"],
        "pyyaml": f"{ours['pyyaml']} (libyaml C loader: {libyaml})",
        "uv": ours["uv"],
        "dag-factory": DAG_FACTORY_VERSION,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def airflow_services(env: dict[str, str], logs: Path) -> Iterator[dict[str, subprocess.Popen]]:
    """Api-server, scheduler and dag-processor, each in a process group of its own, logging
    under `logs`; all stopped on exit."""
    logs.mkdir(parents=True, exist_ok=True)
    services: dict[str, subprocess.Popen] = {}
    try:
        for service in ("api-server", "scheduler", "dag-processor"):
            with open(logs / f"{service}.log", "w") as out:
                services[service] = subprocess.Popen(
                    [PYTHON, "-m", "airflow", service],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
        yield services
    finally:
        for popen in services.values():
            stop_group(popen)


def stop_group(popen: subprocess.Popen) -> None:
    """SIGTERM the process group this benchmark started (by its id), SIGKILL it if it lingers."""
    if popen.poll() is not None:
        return
    try:
        os.killpg(popen.pid, signal.SIGTERM)
        popen.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=10)
    except ProcessLookupError:
        pass
