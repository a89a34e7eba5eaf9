"""The Airflow UI as a person sees it: headless Chromium driven by Playwright.

Users browse the generated DAGs in Airflow's UI: it is where they decide whether to trust a
pipeline and where they look when something went wrong. So these tests assert on what the UI
renders, not on what the REST API says: one Airflow (api-server, scheduler, DAG processor) for
the module, on a folder with a one-entrypoint pipeline (the wordcount example), a staged one
with two stages, and a broken file. A run is triggered from the trigger form with a changed
param; its log and its Dask performance report are opened from the run task's page.

The browser is Debian's `chromium` (`apt-get install chromium`; .ci/run installs it), since
Playwright's own browser download cannot work here. Airflow 3's UI is a React app that fetches
as it renders, so the tests wait for elements, never for time. Screenshots go to .screenshots/
(git-ignored); the README's come from there (docs/ui-*.png).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import pytest
from playwright.sync_api import Locator, Page, expect, sync_playwright

from tests.airflow_services import AirflowServices, airflow_services
from tests.conftest import (
    ROOT,
    GitRepo,
    cluster_processes,
    make_repo,
    run_key,
    write_pipeline,
)

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / ".screenshots"
WAIT_MS = 60_000  # for an element to show; generous for a loaded CI machine
RUN_MS = 300_000  # for the run's states to show; the first run may build its virtualenv
VIEWPORT = {"width": 1400, "height": 860}
CHUNKS = 5  # what the trigger form changes the chunks param to (its default: 8)

WORDCOUNT = """
description: Count words in a text corpus, in parallel
owner: data-eng
schedule: null
source:
  git: {repo}
  requirements: requirements.txt
entrypoint: wordcount.job:main
params:
  chunks: {{default: 8, type: integer, minimum: 1, description: Pieces the corpus is split into}}
  top: {{default: 3, type: integer, minimum: 1, description: How many frequent words to return}}
  label: {{default: browser, type: string, description: A name for the run's result}}
cluster: {{workers: 2, memory: 1GiB}}
"""

# Never run here (it stays paused): its graph and its schedule in words are what is looked at.
STAGED = """
description: Squares, then their sum, each stage on its own cluster
owner: analytics
schedule: "0 3 * * *"
start_date: 2026-01-01
source: {{git: {repo}}}
stages:
  square:
    cluster: {{workers: 2}}
    steps:
      - squares: {{entrypoint: jobs:squares, params: {{rows: 10}}}}
  total:
    depends_on: [square]
    steps:
      - add: {{entrypoint: jobs:add, params: {{values: "{{{{ steps.squares.values }}}}"}}}}
"""

JOBS = """
def squares(client, rows):
    return {"values": client.gather(client.map(lambda i: i * i, range(rows)))}


def add(client, values):
    return {"total": client.submit(sum, values).result()}
"""

# line 2: a number for entrypoint, line 3: a word for workers
BROKEN = """source: {git: /nowhere}
entrypoint: 12
cluster: {workers: lots}
"""


@dataclass
class Browser:
    """One Chromium page on the module's Airflow, and where its screenshots go."""

    services: AirflowServices
    page: Page

    def open(self, path: str) -> None:
        self.page.goto(self.services.url + path)

    def shot(self, name: str, around: Locator | None = None, full_width: bool = False) -> Path:
        """A screenshot of the page, or of the part that holds every element of `around` (a
        graph without the empty canvas around it), across the page when full_width."""
        path = SHOTS / f"{name}.png"
        clip = None
        if around is not None:
            boxes = [box for box in (e.bounding_box() for e in around.all()) if box]
            left = 0 if full_width else max(0, min(b["x"] for b in boxes) - 30)
            right = VIEWPORT["width"]
            if not full_width:
                right = min(right, max(b["x"] + b["width"] for b in boxes) + 30)
            top = max(0, min(b["y"] for b in boxes) - 30)
            bottom = min(VIEWPORT["height"], max(b["y"] + b["height"] for b in boxes) + 30)
            clip = {"x": left, "y": top, "width": right - left, "height": bottom - top}
        self.page.screenshot(path=path, clip=clip)
        return path

    def dag_docs(self, dag_id: str) -> Locator:
        """The DAG page's docs dialog, open."""
        self.open(f"/dags/{dag_id}")
        self.page.get_by_role("button", name="Dag Docs").click()
        dialog = self.page.get_by_role("dialog")
        expect(dialog.get_by_role("heading", name="Dag Documentation")).to_be_visible()
        return dialog

    def graph(self, dag_id: str) -> Locator:
        """The DAG's graph with every task group expanded, the details panel folded away."""
        page = self.page
        self.open(f"/dags/{dag_id}")
        page.get_by_role("button", name=re.compile(r"^Show Graph")).click()
        page.get_by_role("button", name="Expand all task groups").click()
        page.get_by_role("button", name="Collapse Details Panel").click()
        flow = page.locator(".react-flow")
        # The canvas grew with the panel gone: fit the graph to it again, and let it settle
        # (React Flow animates there), so that every node is in the picture.
        flow.get_by_role("button", name="Fit View").click()
        _settled(flow.locator(".react-flow__node").first)
        return flow


def _settled(locator: Locator) -> None:
    """Until the element stops moving: the same box in two checks a tenth of a second apart."""
    last = None
    for _ in range(100):
        box = locator.bounding_box()
        if box is not None and box == last:
            return
        last = box
        locator.page.wait_for_timeout(100)
    raise AssertionError(f"{locator} kept moving")


def _chromium_or_skip() -> None:
    if CHROMIUM.is_file():
        return
    why = f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="module")
def staged_repo(tmp_path_factory) -> GitRepo:
    return make_repo(tmp_path_factory.mktemp("ui-remotes") / "staged", {"jobs.py": JOBS})


@pytest.fixture(scope="module")
def ui(tmp_path_factory, wordcount_repo, staged_repo) -> Iterator[Browser]:
    _chromium_or_skip()
    home = tmp_path_factory.mktemp("ui")
    pipelines = home / "pipelines"
    write_pipeline(pipelines, "wordcount", WORDCOUNT.format(repo=wordcount_repo.path))
    write_pipeline(pipelines, "staged", STAGED.format(repo=staged_repo.path))
    write_pipeline(pipelines, "broken", BROKEN)
    SHOTS.mkdir(exist_ok=True)
    # A real login, not Airflow's all-admins mode (which lets every request in): the report
    # must open with the session the browser signed in with.
    services_up = airflow_services(home / "airflow", pipelines, login=True)
    with services_up as services, sync_playwright() as pw:
        services.wait_parsed("wordcount", "staged", "broken")
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(WAIT_MS)
            _sign_in(page, services)
            yield Browser(services, page)
        finally:
            browser.close()


def _sign_in(page: Page, services: AirflowServices) -> None:
    """Through Airflow's login page, where the UI sends a visitor without a session."""
    user, password = services.login
    page.goto(services.url + "/")
    expect(page.get_by_text("Sign into Airflow")).to_be_visible()
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("link", name="Dags", exact=True)).to_be_visible()


@pytest.fixture(scope="module")
def triggered(ui: Browser) -> str:
    """A run of wordcount triggered from the trigger form with chunks changed, finished.

    Returns the run's id. The run is awaited through the API, which can explain a
    failure (task states and logs); what the tests assert is then read off the pages.
    """
    page = ui.page
    ui.open("/dags/wordcount")
    page.get_by_role("button", name="Trigger Dag").click()
    form = page.get_by_role("dialog")
    chunks = form.get_by_role("spinbutton", name="chunks")
    # each param with its description, the integers as number fields, filled with the default
    expect(form.get_by_text("Pieces the corpus is split into")).to_be_visible()
    expect(chunks).to_have_value("8")
    chunks.fill(str(CHUNKS))
    ui.shot("trigger-form")
    form.get_by_test_id("trigger-dag-submit").click()
    # The UI goes to the new run's page: its id is in the address.
    page.wait_for_url(re.compile(r"/dags/wordcount/runs/[^/]+$"))
    run_id = unquote(page.url.rsplit("/", 1)[1])
    state = ui.services.wait_run("wordcount", run_id, timeout=RUN_MS / 1000)
    assert state == "success", ui.services.explain("wordcount", run_id)
    return run_id


def _run_page(run_id: str) -> str:
    """As the UI's own links write it: the run id unquoted."""
    return f"/dags/wordcount/runs/{run_id}"


def test_dag_list_shows_every_pipeline_and_the_broken_one_tagged(ui):
    ui.open("/dags")
    page = ui.page
    expect(page.get_by_text("3 Dags")).to_be_visible()
    for dag_id in ("wordcount", "staged", "broken"):
        expect(page.get_by_role("link", name=dag_id, exact=True)).to_be_visible()
    # The tag links to the list of broken files; only the broken one carries it.
    invalid = page.get_by_role("link", name="dagfactory:invalid")
    expect(invalid).to_have_count(1)
    invalid.click()
    expect(page.get_by_text("1 Dag", exact=True)).to_be_visible()
    expect(page.get_by_role("link", name="broken", exact=True)).to_be_visible()
    expect(page.get_by_role("link", name="wordcount", exact=True)).to_have_count(0)
    ui.shot("dag-list-invalid")


def test_broken_file_shows_its_errors_on_its_page(ui):
    docs = ui.dag_docs("broken")
    expect(docs).to_contain_text("This pipeline file is invalid")
    # each error with its file, line and column, as `dagfactory validate` gives it
    expect(docs).to_contain_text("broken.yml:2:13: error: entrypoint: must be a string")
    expect(docs).to_contain_text("broken.yml:3:20: error: cluster.workers: must be an integer")
    ui.shot("broken")


def test_dag_docs_say_what_the_pipeline_does(ui):
    docs = ui.dag_docs("wordcount")
    expect(docs).to_contain_text("Count words in a text corpus, in parallel")
    expect(docs.get_by_role("row", name=re.compile("^owner"))).to_contain_text("data-eng")
    entry = docs.get_by_role("row", name=re.compile("^entry point"))
    expect(entry).to_contain_text("wordcount.job:main(client, **params)")
    cluster = docs.get_by_role("row", name=re.compile("^cluster"))
    expect(cluster).to_contain_text("local: 2 workers x 1 cpu, 1GiB")
    expect(docs.get_by_role("row", name=re.compile("^schedule"))).to_contain_text(
        "only when triggered"
    )
    expect(docs.get_by_role("row", name=re.compile("^file"))).to_contain_text("wordcount.yml")
    # params: name, type, default, description
    chunks = docs.get_by_role("row", name=re.compile("^chunks"))
    for shown in ("integer", "at least 1", "8", "Pieces the corpus is split into"):
        expect(chunks).to_contain_text(shown)
    label = docs.get_by_role("row", name=re.compile("^label"))
    for shown in ("string", '"browser"', "A name for the run's result"):
        expect(label).to_contain_text(shown)
    # For the picture, the dialog dragged by its resize corner until it shows everything.
    box = docs.bounding_box()
    mouse = ui.page.mouse
    mouse.move(box["x"] + box["width"] - 3, box["y"] + box["height"] - 3)
    mouse.down()
    mouse.move(box["x"] + box["width"] + 250, VIEWPORT["height"] - 150, steps=5)
    mouse.up()
    ui.shot("docs", around=docs)


def test_staged_docs_give_the_schedule_in_words_and_each_stage(ui):
    docs = ui.dag_docs("staged")
    expect(docs).to_contain_text("Squares, then their sum, each stage on its own cluster")
    schedule = docs.get_by_role("row", name=re.compile("^schedule"))
    expect(schedule).to_contain_text("every day at 03:00 UTC")
    square = docs.get_by_role("row", name=re.compile("^stage square"))
    expect(square).to_contain_text("2 workers")
    expect(square).to_contain_text("jobs:squares")
    total = docs.get_by_role("row", name=re.compile("^stage total"))
    expect(total).to_contain_text("after square")
    expect(total).to_contain_text("jobs:add")


def _edge(flow: Locator, source: str, target: str) -> Locator:
    return flow.get_by_role("img", name=f"Edge from {source} to {target}", exact=True)


def _dashed(edge: Locator) -> bool:
    return edge.locator("path").first.get_attribute("stroke-dasharray") is not None


def test_graph_shows_the_pipeline_group_and_its_setup_and_teardown(ui):
    flow = ui.graph("wordcount")
    group = flow.get_by_test_id("rf__node-pipeline")
    expect(group).to_contain_text("pipeline")
    expect(group).to_contain_text("Task Group")
    expect(group).to_contain_text("4 Tasks")
    operators = {
        "bootstrap": "BootstrapOperator",
        "cluster_up": "ClusterUpOperator",
        "run": "RunOperator",
        "teardown": "TeardownOperator",
    }
    for task, operator in operators.items():
        node = flow.get_by_test_id(f"rf__node-pipeline.{task}")
        expect(node).to_contain_text(task)
        expect(node).to_contain_text(operator)
    chain = [("bootstrap", "cluster_up"), ("cluster_up", "run"), ("run", "teardown")]
    for source, target in chain:
        expect(_edge(flow, f"pipeline.{source}", f"pipeline.{target}")).to_be_attached()
    # Airflow draws the setup -> teardown relation as a dashed edge, and only that one.
    setup_teardown = _edge(flow, "pipeline.cluster_up", "pipeline.teardown")
    expect(setup_teardown).to_be_attached()
    assert _dashed(setup_teardown)
    assert not any(_dashed(_edge(flow, f"pipeline.{s}", f"pipeline.{t}")) for s, t in chain)
    ui.shot("graph", around=flow.locator(".react-flow__node"))


def test_graph_of_a_staged_pipeline_shows_a_group_per_stage(ui):
    flow = ui.graph("staged")
    expect(flow.get_by_test_id("rf__node-bootstrap")).to_contain_text("BootstrapOperator")
    for stage, step in (("square", "squares"), ("total", "add")):
        expect(flow.get_by_test_id(f"rf__node-{stage}")).to_contain_text("3 Tasks")
        for task in ("cluster_up", step, "teardown"):
            expect(flow.get_by_test_id(f"rf__node-{stage}.{task}")).to_contain_text(task)
        assert _dashed(_edge(flow, f"{stage}.cluster_up", f"{stage}.teardown"))
    # the second stage waits for the first one's last step
    expect(_edge(flow, "square.squares", "total")).to_be_attached()
    ui.shot("graph-staged", around=flow.locator(".react-flow__node"))


def test_a_run_triggered_from_the_form_goes_green(ui, triggered):
    page = ui.page
    ui.open(_run_page(triggered))
    expect(page.get_by_test_id("state-badge").first).to_have_text("Success")
    for task in ("bootstrap", "cluster_up", "run", "teardown"):
        row = page.get_by_role("row").filter(has_text=f"pipeline.{task}")
        expect(row.get_by_test_id("state-badge")).to_have_text("Success")
    ui.shot("run")


def test_the_run_task_log_shows_the_entry_point_output(ui, triggered, wordcount_repo):
    page = ui.page
    ui.open(f"{_run_page(triggered)}/tasks/pipeline.run")
    # the grid (not the graph the tests before left open) leaves the log the page's width
    page.get_by_role("button", name=re.compile(r"^Show Grid")).click()
    # The changed param reached the entry point, which said so on its stdout.
    expect(page.get_by_text(f"counting 4000 lines in {CHUNKS} chunks on 2 workers")).to_be_visible()
    expect(page.get_by_text(re.compile(r"\d+ words, \d+ distinct"))).to_be_visible()
    # and the commit that ran
    expect(page.get_by_text(f"at commit {wordcount_repo.head()[:12]}")).to_be_visible()
    breadcrumb = page.get_by_role("navigation", name="breadcrumb")
    ui.shot("run-log", around=breadcrumb.or_(page.get_by_text("Post Execute")), full_width=True)


def test_the_dask_report_link_opens_the_report_after_teardown(ui, triggered):
    page = ui.page
    # the cluster is gone: the report is all that is left of its dashboard
    assert cluster_processes(run_key("wordcount", triggered)) == []
    ui.open(f"{_run_page(triggered)}/tasks/pipeline.run")
    # Airflow lists a task's extra links on its Details tab.
    page.get_by_role("link", name="Details", exact=True).click()
    link = page.get_by_role("link", name="Dask report", exact=True)
    expect(link).to_be_visible()
    if link.get_attribute("target") == "_blank":
        with page.context.expect_page() as opened:
            link.click()
        report = opened.value
    else:
        link.click()
        report = page
    report.wait_for_load_state()
    expect(report).to_have_title(re.compile("Dask Performance Report"))
    # this run's work: a task per chunk and the merge
    expect(report.get_by_text(f"number of tasks: {CHUNKS + 1}")).to_be_visible()
    report.get_by_text("Task Stream", exact=True).click()
    expect(report.locator("canvas").first).to_be_visible()
    report.screenshot(path=SHOTS / "report.png")
    if report is not page:
        report.close()
