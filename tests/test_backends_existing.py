"""The `existing` backend against a real `dask scheduler` and `dask worker` that this test runs,
standing for a shared cluster that someone else keeps running."""

import socket
import subprocess
import sys

import pytest

from dagfactory.backends import ClusterContext
from dagfactory.backends.existing import ExistingBackend
from dagfactory.errors import ClusterError
from dagfactory.run.runner import run_entrypoint
from dagfactory.run.workspace import (
    checkout,
    code_dir_of,
    prepare,
    requirements_of,
    resolve_commit,
    virtualenv,
)
from dagfactory.spec.load import load_file
from dagfactory.spec.pipeline import ClusterSpec
from tests.conftest import make_repo, write_pipeline

pytestmark = pytest.mark.e2e

JOBS = {
    "pkg/__init__.py": "",
    "pkg/helpers.py": "def square(x):\n    return x * x\n",
    "pkg/jobs.py": """\
from pkg.helpers import square


def main(client, fail=False):
    value = client.submit(square, 3).result()
    if fail:
        raise ValueError("asked to fail")
    return value
""",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SharedCluster:
    """A scheduler and workers run from the test's own environment, not the pipeline's."""

    def __init__(self, folder):
        self.folder = folder
        self.address = f"tcp://127.0.0.1:{_free_port()}"
        self.procs: list[subprocess.Popen] = []
        self._start("scheduler", "distributed.cli.dask_scheduler",
                    "--host", "127.0.0.1", "--port", self.address.rsplit(":", 1)[1],
                    "--no-dashboard")  # fmt: skip
        from distributed import Client

        self.client = Client(self.address, timeout=60)
        self.add_worker()

    def _start(self, name: str, module: str, *args: str) -> None:
        log = open(self.folder / f"{name}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        with log:
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", module, *args],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.folder,
                )
            )

    def add_worker(self) -> None:
        count = len(self.client.scheduler_info()["workers"])
        self._start("worker", "distributed.cli.dask_worker", self.address,
                    "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1",
                    "--no-dashboard", "--local-directory", str(self.folder / "work"))  # fmt: skip
        self.client.wait_for_workers(count + 1, timeout=60)

    def plugins(self) -> dict:
        """Plugin names on the scheduler, the scheduler's list for workers, and each worker's."""
        scheduler = self.client.run_on_scheduler(
            lambda dask_scheduler: (sorted(dask_scheduler.plugins),
                                    sorted(dask_scheduler.worker_plugins))
        )  # fmt: skip
        workers = self.client.run(lambda dask_worker: sorted(dask_worker.plugins))
        return {"scheduler": scheduler[0], "for workers": scheduler[1], "workers": workers}

    def stop(self) -> None:
        self.client.close()
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    cluster = SharedCluster(tmp_path_factory.mktemp("shared"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, shared):
    base = tmp_path_factory.mktemp("existing")
    repo = make_repo(base / "jobs", JOBS)

    def spec(requirements: str = "[]"):
        return load_file(
            write_pipeline(
                base,
                "p",
                f"""
                source: {{git: {repo.path}, requirements: {requirements}}}
                entrypoint: pkg.jobs:main
                cluster: {{backend: existing, address: "{shared.address}"}}
                """,
            )
        )

    return spec


def _venv_with_pins(spec):
    """What bootstrap builds: the pipeline's requirements with the cluster's versions pinned."""
    commit = resolve_commit(spec)
    root = checkout(spec, commit)
    pins = ExistingBackend().pins(spec.cluster)
    return pins, virtualenv(requirements_of(spec, root, code_dir_of(spec, root), pins))


def test_runs_leave_the_shared_cluster_as_they_found_it(shared, pipeline):
    spec = pipeline()
    workspace = prepare(spec, resolve_commit(spec))
    before = shared.plugins()
    results = []
    for fail in (False, True, False):
        try:
            results.append(
                run_entrypoint(
                    workspace, spec.entrypoint, {"fail": fail}, shared.address, lambda _: None
                )
            )
        except Exception as exc:
            results.append(type(exc).__name__)
    # The workers never had the code on their path: it was uploaded, and used, each time.
    assert results == [9, "EntrypointError", 9]
    assert shared.plugins() == before
    shared.add_worker()  # a worker joining later replays nothing of the runs
    after = shared.plugins()
    assert after["scheduler"] == before["scheduler"]
    assert after["for workers"] == before["for workers"]
    assert set(map(tuple, after["workers"].values())) == set(map(tuple, before["workers"].values()))


def test_pins_are_the_clusters_versions_and_the_check_accepts_them(shared, pipeline):
    from importlib.metadata import version

    spec = pipeline()
    pins, venv = _venv_with_pins(spec)
    # The test's cluster runs from this test's environment.
    assert pins == {"distributed": version("distributed"), "cloudpickle": version("cloudpickle")}
    lines = (venv / ".dagfactory-complete").read_text().splitlines()
    assert f"distributed=={pins['distributed']}" in lines
    assert f"cloudpickle=={pins['cloudpickle']}" in lines
    context = ClusterContext("t_existing", str(venv / "bin" / "python"))
    handle = ExistingBackend().up(spec.cluster, context)
    assert handle.scheduler_address == shared.address


def test_a_virtualenv_with_another_distributed_is_refused_in_one_line(shared, pipeline):
    from importlib.metadata import version

    other = "2026.7.0" if version("distributed") != "2026.7.0" else "2026.6.0"
    spec = pipeline(f'["distributed=={other}"]')
    pins, venv = _venv_with_pins(spec)  # the user's pin wins over dagfactory's
    context = ClusterContext("t_existing", str(venv / "bin" / "python"))
    with pytest.raises(ClusterError) as err:
        ExistingBackend().up(spec.cluster, context)
    message = str(err.value)
    assert "\n" not in message
    assert (
        f"runs distributed {pins['distributed']} but the pipeline's virtualenv has {other}: "
        f"write distributed=={pins['distributed']} in source.requirements" in message
    )
    assert "dask " not in message  # one fix, one clause: distributed pins its dask


def test_an_unreachable_scheduler_gives_no_pins_and_a_clear_refusal():
    spec = ClusterSpec(backend="existing", address=f"tcp://127.0.0.1:{_free_port()}")
    assert ExistingBackend().pins(spec) == {}
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler at tcp://127.0.0.1"):
        ExistingBackend().up(spec, ClusterContext("t_existing", sys.executable))


def test_requirements_pin_base_packages_unless_the_user_names_them(tmp_path, pipeline):
    spec = pipeline('["toolz", "Distributed[diagnostics]>=2024"]')
    pins = {"distributed": "2026.8.0", "cloudpickle": "3.1.2"}
    assert requirements_of(spec, tmp_path, tmp_path, pins) == [
        "distributed",
        "bokeh>=3.1",
        "cloudpickle==3.1.2",
        "toolz",
        "Distributed[diagnostics]>=2024",
    ]
    assert requirements_of(pipeline(), tmp_path, tmp_path, pins)[:3] == [
        "distributed==2026.8.0",
        "bokeh>=3.1",
        "cloudpickle==3.1.2",
    ]
