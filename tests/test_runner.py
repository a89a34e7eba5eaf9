"""The entry point runs in the pipeline's virtualenv, against a real local cluster."""

import pytest

from dagfactory.backends import ClusterContext, get_backend
from dagfactory.errors import EntrypointError
from dagfactory.load import load_file
from dagfactory.runner import run_entrypoint
from dagfactory.spec import ClusterSpec
from dagfactory.workspace import prepare, resolve_commit
from tests.conftest import write_pipeline

pytestmark = pytest.mark.e2e

JOBS = {
    "pkg/__init__.py": "",
    "pkg/helpers.py": "def square(x):\n    return x * x\n",
    "pkg/jobs.py": """\
import sys

from pkg.helpers import square


def squares(client, n=3, label=""):
    print("starting", label)
    print("to stderr", file=sys.stderr)
    futures = client.map(square, range(n))
    return {"label": label, "squares": client.gather(futures)}


def not_json(client):
    return {1, 2}


def fails(client):
    raise RuntimeError("the data is bad")


def imports_airflow(client):
    import airflow  # noqa: F401
""",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from tests.conftest import make_repo

    base = tmp_path_factory.mktemp("runner")
    repo = make_repo(base / "jobs", JOBS)
    spec = load_file(
        write_pipeline(base, "p", f"source:\n  git: {repo.path}\nentrypoint: pkg.jobs:squares\n")
    )
    workspace = prepare(spec, resolve_commit(spec))
    backend = get_backend("local")
    # Workers get no PYTHONPATH: the code must reach them by value, as on a remote cluster.
    handle = backend.up(ClusterSpec(workers=2), ClusterContext("t_runner", str(workspace.python)))
    yield workspace, handle.scheduler_address
    backend.down(handle)


def test_result_comes_back_and_output_is_streamed(cluster):
    workspace, address = cluster
    lines = []
    result = run_entrypoint(
        workspace, "pkg.jobs:squares", {"n": 4, "label": "x"}, address, lines.append
    )
    assert result == {"label": "x", "squares": [0, 1, 4, 9]}
    assert "starting x" in lines and "to stderr" in lines


def test_an_exception_carries_the_users_traceback(cluster):
    workspace, address = cluster
    with pytest.raises(EntrypointError) as err:
        run_entrypoint(workspace, "pkg.jobs:fails", {}, address, lambda _: None)
    message = str(err.value)
    assert "pkg.jobs:fails raised RuntimeError: the data is bad" in message
    assert 'jobs.py", line' in message


def test_a_result_that_is_not_json_is_refused(cluster):
    workspace, address = cluster
    with pytest.raises(EntrypointError, match="returned a set, which is not JSON"):
        run_entrypoint(workspace, "pkg.jobs:not_json", {}, address, lambda _: None)


def test_missing_function_and_bad_params_are_reported(cluster):
    workspace, address = cluster
    with pytest.raises(EntrypointError, match="has no function 'nope'"):
        run_entrypoint(workspace, "pkg.jobs:nope", {}, address, lambda _: None)
    with pytest.raises(EntrypointError, match="unexpected keyword argument 'bogus'"):
        run_entrypoint(workspace, "pkg.jobs:squares", {"bogus": 1}, address, lambda _: None)


def test_the_virtualenv_has_no_airflow(cluster):
    workspace, address = cluster
    with pytest.raises(EntrypointError, match="No module named 'airflow'"):
        run_entrypoint(workspace, "pkg.jobs:imports_airflow", {}, address, lambda _: None)
