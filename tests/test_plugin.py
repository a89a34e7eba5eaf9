"""The dagfactory plugin of the api-server: a run task's "Dask report" link opens its report,
after the cluster is gone, only for someone Airflow lets in; a missing report is a 404 page.

One run of the wordcount pipeline under a real api-server, scheduler and DAG processor (the
plugin found through its `airflow.plugins` entry point), then plain HTTP as a browser sends it.
"""

import urllib.error
import urllib.parse
import urllib.request

import pytest

from dagfactory.dag.plugin import report_url
from dagfactory.run.reports import report_path
from tests.airflow_services import airflow_services
from tests.conftest import cluster_processes, write_wordcount_pipeline

pytestmark = pytest.mark.e2e

RUN_ID = "report_run"


@pytest.fixture(scope="module")
def ran(tmp_path_factory, wordcount_repo):
    """Services with a real login (not all-admins) after one green run of wordcount."""
    tmp = tmp_path_factory.mktemp("plugin")
    pipelines = tmp / "pipelines"
    write_wordcount_pipeline(pipelines, wordcount_repo, chunks=4, top=2, label="x")
    with airflow_services(tmp / "airflow", pipelines, login=True) as services:
        services.wait_parsed("wordcount")
        services.trigger("wordcount", RUN_ID)
        state = services.wait_run("wordcount", RUN_ID)
        assert state == "success", services.explain("wordcount", RUN_ID)
        yield services


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # the 3xx itself is what a test looks at


def _get(
    url: str, token: str | None = None, cookie: str | None = None, accept: str = "text/html"
) -> tuple[int, str, dict]:
    headers = {"Accept": accept}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if cookie:
        headers["Cookie"] = f"_token={cookie}"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=60) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace"), dict(exc.headers)


def _links(services, task: str) -> dict:
    path = f"/dags/wordcount/dagRuns/{RUN_ID}/taskInstances/pipeline.{task}/links"
    return services.api("GET", path)["extra_links"]


def test_dask_report_link_opens_the_report_after_the_cluster_is_gone(ran):
    link = _links(ran, "run")["Dask report"]
    assert link == report_url("wordcount", RUN_ID, "pipeline.run", 1)
    assert report_path("wordcount", RUN_ID, "pipeline.run", 1).is_file()
    assert cluster_processes(f"wordcount__{RUN_ID}") == []  # teardown stopped the cluster
    token = ran.token()
    for auth in ({"token": token}, {"cookie": token}):  # API clients, and the UI's session
        status, body, headers = _get(ran.url + link, **auth)
        assert status == 200, body[:2000]
        assert headers["content-type"].startswith("text/html")
        assert "Dask Performance Report" in body
        assert headers["content-security-policy"].startswith("sandbox")


def test_a_report_is_refused_without_auth(ran):
    link = ran.url + report_url("wordcount", RUN_ID, "pipeline.run", 1)
    status, body, _ = _get(link, accept="application/json")
    assert status == 401 and "Dask Performance Report" not in body
    forged = _get(link, token="x.y.z")
    assert forged[0] in (401, 403) and "Dask Performance Report" not in forged[1]
    # A person with no session is sent to log in, and back to the report after it.
    status, body, headers = _get(link)
    assert status in (302, 307) and "Dask Performance Report" not in body
    assert headers["location"].startswith("/auth/login?next=")
    assert urllib.parse.quote(link, safe="") in headers["location"]


def test_a_missing_report_is_a_404_page_that_says_why(ran):
    status, body, headers = _get(
        ran.url + report_url("wordcount", RUN_ID, "pipeline.run", 3), token=ran.token()
    )
    assert status == 404 and headers["content-type"].startswith("text/html")
    assert "No Dask report" in body and "pipeline.run, try 3" in body
    assert '<a href="1">try 1</a>' in body  # the try that has one
    unknown = _get(ran.url + report_url("nope", "r", "pipeline.run", 1), token=ran.token())
    assert unknown[0] == 404


def test_bootstrap_has_no_commit_link_for_a_repository_on_no_forge(ran):
    # A local repository: the commit is in bootstrap's XCom, and the link is empty (no button).
    assert ran.xcom("wordcount", RUN_ID, "bootstrap")["commit"]
    assert not _links(ran, "bootstrap").get("Commit")
