"""What the Airflow UI shows about a pipeline: the DAG page's docs (`docs.doc_md`) as a person
reads them, and the "Commit" link's address for the forges it knows."""

import pytest

from dagfactory.dag.build import build_dags
from dagfactory.dag.docs import commit_url, cron_words, safe_url
from tests.conftest import write_pipeline

ONE_ENTRYPOINT = """
    description: Nightly sales rollup
    owner: data-eng
    schedule: "0 3 * * *"
    start_date: 2026-01-01
    source:
      git: https://github.com/acme/jobs.git
      ref: v1.0
      subdir: jobs
      requirements: [pandas>=2, pyarrow]
    entrypoint: jobs.main:run
    params:
      day: "{{ ds }}"
      chunks: {default: 64, type: integer, minimum: 1, maximum: 512, description: "Pieces | each"}
      mode: {default: fast, enum: [fast, exact], title: Mode, description: How to count}
    cluster: {workers: 4, cpu: 2, memory: 4GiB}
"""

STAGED = """
    description: Two stages
    schedule: "@weekly"
    start_date: 2026-01-01
    source: {git: "git@github.com:acme/jobs.git"}
    params: {n: 7}
    cluster: {workers: 1, memory: 1GiB}
    stages:
      prepare:
        cluster: {workers: 3}
        steps:
          - extract: {entrypoint: jobs.steps:extract, params: {n: "{{ params.n }}"}}
          - parallel:
              - clean: {entrypoint: jobs.steps:clean}
              - audit: {entrypoint: jobs.steps:audit}
      model:
        depends_on: [prepare]
        cluster: {adaptive: {minimum: 1, maximum: 4}, cpu: 2}
        steps:
          - train: {entrypoint: jobs.steps:train}
"""


@pytest.fixture
def folder(tmp_path, monkeypatch):
    folder = tmp_path / "pipelines"
    write_pipeline(folder / "sales", "rollup", ONE_ENTRYPOINT)
    write_pipeline(folder, "staged", STAGED)
    monkeypatch.delenv("DAGFACTORY_SOURCE_URL", raising=False)
    return folder


def test_one_entrypoint_docs_say_what_runs_where_and_when(folder):
    doc = build_dags(folder)["rollup"].doc_md
    assert doc.startswith("Nightly sales rollup\n")
    assert "| owner | data-eng |" in doc
    assert "| file | `sales/rollup.yml` |" in doc  # its path in the pipelines folder
    assert "| git | `https://github.com/acme/jobs.git` |" in doc
    assert "| ref | `v1.0` (resolved to one commit" in doc
    assert "| subdir | `jobs` |" in doc and "| requirements | `pandas>=2 pyarrow` |" in doc
    assert "| entry point | `jobs.main:run(client, **params)` |" in doc
    assert "| cluster | local: 4 workers x 2 cpu, 4GiB |" in doc
    assert "| schedule | every day at 03:00 UTC (`0 3 * * *`) |" in doc
    assert "| param | type | default | description |" in doc
    assert '| `day` | string | `"{{ ds }}"` |  |' in doc
    assert "| `chunks` | integer, 1 to 512 | `64` | Pieces \\| each |" in doc
    assert '| `mode` | string | `"fast"` | Mode: How to count One of "fast", "exact". |' in doc


def test_docs_never_show_a_credential_of_the_git_url(tmp_path):
    # Validation refuses such a file; its page says so without repeating the secret.
    secret = "source:\n  git: https://ci-bot:s3cr3t@github.com/acme/jobs.git\nentrypoint: a.b:c\n"
    write_pipeline(tmp_path, "leaky", secret)
    doc = build_dags(tmp_path)["leaky"].doc_md
    assert "contains credentials" in doc and "s3cr3t" not in doc
    assert safe_url("https://u:p@host.example:8443/a.git?private_token=t#x") == (
        "https://host.example:8443/a.git"
    )
    assert safe_url("git@github.com:acme/jobs.git") == "git@github.com:acme/jobs.git"
    assert safe_url("../examples/wordcount") == "../examples/wordcount"


def test_staged_docs_list_each_stage_with_its_cluster_and_steps(folder):
    doc = build_dags(folder)["staged"].doc_md
    assert "entry point" not in doc and "| cluster |" not in doc
    prepare = doc.index("| stage prepare |")
    model = doc.index("| stage model |")
    assert prepare < model
    assert (
        "| stage prepare | a local cluster of 3 workers: `extract` (jobs.steps:extract) then "
        "`clean` (jobs.steps:clean) and `audit` (jobs.steps:audit); workers of 1 cpu, 1GiB |"
    ) in doc
    assert (
        "| stage model | a local cluster of 1-4 workers (adaptive) after prepare: `train` "
        "(jobs.steps:train); workers of 2 cpu, 1GiB |"
    ) in doc
    assert "| schedule | at 00:00 UTC, only on Sunday (`@weekly`) |" in doc
    assert "| `n` | integer | `7` |" in doc


def test_the_file_links_to_the_forge_with_a_url_template(folder, monkeypatch):
    monkeypatch.setenv(
        "DAGFACTORY_SOURCE_URL", "https://github.com/acme/pipelines/blob/main/pipelines/{path}"
    )
    doc = build_dags(folder)["rollup"].doc_md
    link = "https://github.com/acme/pipelines/blob/main/pipelines/sales/rollup.yml"
    assert f"| file | [`sales/rollup.yml`]({link}) |" in doc


def test_the_url_template_can_be_airflow_config(folder, monkeypatch):
    monkeypatch.setenv(
        "AIRFLOW__DAGFACTORY__SOURCE_URL", "https://git.example/p/-/blob/main/{path}"
    )
    doc = build_dags(folder)["staged"].doc_md
    assert "| file | [`staged.yml`](https://git.example/p/-/blob/main/staged.yml) |" in doc


@pytest.mark.parametrize(
    ("expression", "words"),
    [
        ("@daily", "every day at 00:00 UTC (`@daily`)"),
        ("@hourly", "every hour (`@hourly`)"),
        ("*/15 * * * *", "every 15 minutes (`*/15 * * * *`)"),
        ("0 6 * * 1-5", "at 06:00 UTC, Monday through Friday (`0 6 * * 1-5`)"),
        ("@once", "once"),
    ],
)
def test_schedules_in_words(expression, words):
    assert cron_words(expression, "UTC") == words


def test_a_schedule_on_assets_says_which(tmp_path):
    write_pipeline(
        tmp_path,
        "on_assets",
        """
        source: {git: x}
        entrypoint: a.b:c
        schedule: {cron: "30 2 * * *", assets: {any: [s3://a/x, s3://a/y]}}
        """,
    )
    doc = build_dags(tmp_path)["on_assets"].doc_md
    assert "| schedule | every day at 02:30 " in doc
    assert "and also when `s3://a/x` or `s3://a/y` is updated |" in doc
    write_pipeline(tmp_path, "manual", "source: {git: x}\nentrypoint: a.b:c\n")
    assert "| schedule | only when triggered |" in build_dags(tmp_path)["manual"].doc_md


SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    ("git", "url"),
    [
        ("https://github.com/acme/jobs.git", f"https://github.com/acme/jobs/commit/{SHA}"),
        ("https://tok@github.com/acme/jobs", f"https://github.com/acme/jobs/commit/{SHA}"),
        ("git@github.com:acme/jobs.git", f"https://github.com/acme/jobs/commit/{SHA}"),
        ("ssh://git@github.com/acme/jobs.git", f"https://github.com/acme/jobs/commit/{SHA}"),
        (
            "https://gitlab.com/acme/sub/jobs.git",
            f"https://gitlab.com/acme/sub/jobs/-/commit/{SHA}",
        ),
        ("git@gitlab.com:acme/jobs.git", f"https://gitlab.com/acme/jobs/-/commit/{SHA}"),
        ("https://bitbucket.org/acme/jobs.git", f"https://bitbucket.org/acme/jobs/commits/{SHA}"),
        ("git@bitbucket.org:acme/jobs.git", f"https://bitbucket.org/acme/jobs/commits/{SHA}"),
        ("https://git.example.com/acme/jobs.git", ""),  # not a forge it knows: no link
        ("file:///srv/git/jobs", ""),
        ("../examples/wordcount", ""),
    ],
)
def test_commit_link_for_known_forges(git, url):
    assert commit_url(git, SHA) == url


def test_the_links_of_a_run_as_its_tasks_store_them(folder, monkeypatch):
    from types import SimpleNamespace

    from dagfactory.dag.operators import CommitLink, DaskReportLink

    dag = build_dags(folder)["rollup"]
    bootstrap = dag.get_task("pipeline.bootstrap")
    assert CommitLink().get_link(bootstrap, ti_key=None) == ""  # before bootstrap ran
    bootstrap.commit = SHA
    link = CommitLink().get_link(bootstrap, ti_key=None)
    assert link == f"https://github.com/acme/jobs/commit/{SHA}"
    key = SimpleNamespace(
        dag_id="rollup", run_id="manual__2026-01-01T00:00:00+00:00", task_id="pipeline.run",
        try_number=2,
    )  # fmt: skip
    run = dag.get_task("pipeline.run")
    expected = "/dagfactory/reports/rollup/manual__2026-01-01T00%3A00%3A00%2B00%3A00/pipeline.run/2"
    assert DaskReportLink().get_link(run, ti_key=key) == expected
    # Under a base_url with a path, the api-server serves everything below that path.
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/af/")
    assert DaskReportLink().get_link(run, ti_key=key) == "/af" + expected
