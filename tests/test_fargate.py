"""The fargate backend against a small AWS on loopback: moto's server for the APIs, and an agent
that runs every Fargate task's command as local processes (tests/aws_fake.py), so that a real
Dask scheduler and real workers answer on the private IPs ECS reports.

What is asserted is what a user pays for: the exact resources a run makes, and that after every
ending (success, a failing entry point, a start that fails half-way, a teardown that only has
the run key) nothing of the run is RUNNING and nothing made for it is left.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dagfactory.backends.fargate import run_id
from dagfactory.errors import ClusterError
from dagfactory.run import steps
from dagfactory.spec.load import load_files
from tests.aws_fake import fake_aws
from tests.conftest import FAILING_JOB, ROOT, write_pipeline

pytestmark = pytest.mark.e2e

SECRET = "s3cr3t-value-never-shown"
DAGFACTORY = [sys.executable, "-m", "dagfactory.cli"]


@pytest.fixture(scope="module")
def aws():
    # Every image stands for this project's virtualenv: it has the Dask the client has.
    with fake_aws(images={"*": sys.prefix}, require_stopped=True) as fake:
        yield fake


@pytest.fixture
def aws_env(aws, monkeypatch):
    """The fake AWS as the standard AWS chain sees it (for this process and its children)."""
    for name, value in {**aws.env, "AWS_SECRET_ACCESS_KEY": SECRET}.items():
        monkeypatch.setenv(name, value)
    return aws


def fargate_pipeline(folder: Path, repo, name: str, extra: str = "", **cluster) -> Path:
    settings = {
        "backend": "fargate",
        "workers": 2,
        "cpu": 1,
        "memory": "2GiB",
        "region": "eu-west-2",
        "idle_timeout": "10m",
        **cluster,
    }
    return write_pipeline(
        folder,
        name,
        f"""
        source:
          git: {repo.path}
          requirements: ["dask[distributed]>=2024.1", "toolz"]
        entrypoint: wordcount.job:main
        params: {{chunks: 4, top: 2, label: fargate}}
        cluster: {json.dumps(settings)}
        {extra}
        """,
    )


def load(path: Path):
    result = load_files([(path, str(path))], {})
    assert not result.problems, result.problems
    return result.specs[0]


def leftovers(aws) -> dict[str, list]:
    """Everything of any dagfactory run still there: running tasks, task definitions (active or
    merely deregistered), security groups, processes of tasks."""
    ecs, ec2 = aws.client("ecs"), aws.client("ec2")
    found: dict[str, list] = {"tasks": [], "task definitions": [], "security groups": []}
    if "dagfactory" in str(ecs.list_clusters()["clusterArns"]):
        found["tasks"] = ecs.list_tasks(cluster="dagfactory", desiredStatus="RUNNING")["taskArns"]
    families = ecs.list_task_definition_families(familyPrefix="dagfactory-", status="ALL")
    for family in families["families"]:
        for status in ("ACTIVE", "INACTIVE"):
            found["task definitions"] += ecs.list_task_definitions(
                familyPrefix=family, status=status
            )["taskDefinitionArns"]
    found["security groups"] = [
        g["GroupId"]
        for g in ec2.describe_security_groups(
            Filters=[{"Name": "tag-key", "Values": ["dagfactory:run"]}]
        )["SecurityGroups"]
    ]
    found["processes"] = aws.live_processes()
    return {name: items for name, items in found.items() if items}


def wait_nothing_left(aws, timeout: float = 30) -> None:
    """Stopped tasks' processes take the agent's poll and a signal to go."""
    deadline = time.monotonic() + timeout
    while (left := leftovers(aws)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not left, f"left after teardown: {left}\n{aws.logs()[-3000:]}"


def dagfactory(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DAGFACTORY, *args], cwd=ROOT, capture_output=True, text=True, env=os.environ.copy()
    )


def describe_tasks(aws, arns: list[str]) -> list[dict]:
    return aws.client("ecs").describe_tasks(cluster="dagfactory", tasks=arns, include=["TAGS"])[
        "tasks"
    ]


def test_cluster_up_makes_exactly_what_the_run_needs_and_teardown_by_key_removes_it(
    aws_env, tmp_path, wordcount_repo
):
    aws = aws_env
    path = fargate_pipeline(
        tmp_path, wordcount_repo, "fg_exact", spot=True, tags={"team": "data-eng"}
    )
    spec = load(path)
    key = steps.run_key(spec.dag_id, "manual__exact")
    rid = run_id(key)
    lines: list[str] = []
    boot = steps.bootstrap(spec, output=lines.append)
    assert boot["pins"] == {"distributed": _version("distributed")}  # the image's
    handle = steps.cluster_up(spec, boot, key, output=lines.append)
    details = handle["details"]
    ecs, ec2 = aws.client("ecs"), aws.client("ec2")

    # The tasks: one scheduler on FARGATE, two workers on FARGATE_SPOT, all started by the run.
    scheduler, *workers = describe_tasks(aws, [details["scheduler_task"], *details["worker_tasks"]])
    assert len(workers) == 2
    assert scheduler["launchType"] == "FARGATE"
    assert {w["capacityProviderName"] for w in workers} == {"FARGATE_SPOT"}
    for task in (scheduler, *workers):
        assert task["startedBy"] == rid and task["lastStatus"] == "RUNNING"
        tags = {t["key"]: t["value"] for t in task["tags"]}
        assert tags == {"team": "data-eng", "dagfactory:run": rid, "dagfactory:key": key}
        ips = {
            d["name"]: d["value"] for a in task["attachments"] for d in a["details"]
        }  # a private address only, never a public one
        assert ips["privateIPv4Address"].startswith("127.") and "publicIPv4Address" not in ips
    ip = ips_of(scheduler)
    assert handle["scheduler_address"] == f"tls://{ip}:8786"
    assert handle["dashboard_link"] == f"http://{ip}:8787/status"

    # The task definitions: sizes as asked, `dask scheduler` / `dask worker`, logs to CloudWatch.
    definitions = {
        arn.rsplit("/", 1)[1].split(":")[0]: ecs.describe_task_definition(taskDefinition=arn)[
            "taskDefinition"
        ]
        for arn in details["task_definitions"]
    }
    assert set(definitions) == {f"{rid}-scheduler", f"{rid}-worker"}
    worker_def, scheduler_def = definitions[f"{rid}-worker"], definitions[f"{rid}-scheduler"]
    assert (worker_def["cpu"], worker_def["memory"]) == ("1024", "2048")
    assert (scheduler_def["cpu"], scheduler_def["memory"]) == ("1024", "4096")
    for definition in definitions.values():
        assert definition["requiresCompatibilities"] == ["FARGATE"]
        assert definition["networkMode"] == "awsvpc"
        [container] = definition["containerDefinitions"]
        assert container["image"] == f"ghcr.io/dask/dask:{_version('distributed')}-py3.11"
        assert container["logConfiguration"]["options"]["awslogs-group"] == "/dagfactory"
        assert "PRIVATE KEY" not in json.dumps(definition)  # TLS keys live in no definition
    assert scheduler_def["containerDefinitions"][0]["command"][:4] == [
        "dask", "scheduler", "--idle-timeout", "600s",
    ]  # fmt: skip
    [worker_task] = [t for t in aws.tasks if t.arn == details["worker_tasks"][0]]
    assert worker_task.command[:3] == ["dask", "worker", handle["scheduler_address"]]
    assert "--death-timeout" in worker_task.command
    # The pipeline's requirements, at the virtualenv's versions, for the stock image to install.
    assert re.fullmatch(r"toolz==[0-9.]+", worker_task.extra_pip_packages)  # Dask: in the image

    # The run's own security group: scheduler and dashboard ports from the VPC only, and
    # everything between the run's tasks; nothing open to the world.
    [group] = ec2.describe_security_groups(GroupIds=details["security_groups"])["SecurityGroups"]
    assert group["GroupName"] == rid
    vpc = ec2.describe_vpcs(VpcIds=[group["VpcId"]])["Vpcs"][0]
    rules = sorted(
        (r["FromPort"], r["ToPort"], tuple(c["CidrIp"] for c in r.get("IpRanges", ())),
         tuple(p["GroupId"] for p in r.get("UserIdGroupPairs", ())))
        for r in group["IpPermissions"]
    )  # fmt: skip
    assert rules == [(0, 65535, (), (group["GroupId"],)), (8786, 8787, (vpc["CidrBlock"],), ())]
    assert "0.0.0.0/0" not in json.dumps(group["IpPermissions"])
    [log_group] = aws.client("logs").describe_log_groups(logGroupNamePrefix="/dagfactory")[
        "logGroups"
    ]
    assert log_group["retentionInDays"] == 30

    # TLS: without the run's certificate the scheduler does not talk.
    from dagfactory.backends.fargate import ask_scheduler

    with pytest.raises(Exception):  # noqa: B017 (any refusal will do)
        ask_scheduler(f"tcp://{ip}:8786", "identity", {})
    # Where to look, in the task log; and no credential anywhere.
    text = "\n".join(lines)
    assert "ssh -N -L 8787:" in text and "CloudWatch Logs group /dagfactory" in text
    for place in (json.dumps(handle), text, *(json.dumps(t.env) for t in aws.tasks)):
        assert SECRET not in place and "AWS_SECRET_ACCESS_KEY" not in place

    # Teardown from another process that has only the pipeline file and the run key.
    out = dagfactory("teardown", str(path), "--key", key)
    assert out.returncode == 0, out.stderr
    assert (
        f"stopped 3 task(s), deregistered 2 task definition(s), deleted security group(s) "
        f"{group['GroupId']}" in out.stderr
    )
    wait_nothing_left(aws)
    again = dagfactory("teardown", str(path), "--run-id", "manual__exact")  # the same key
    assert again.returncode == 0, again.stderr
    assert "stopped 0 task(s), deregistered 0 task definition(s)" in again.stderr


def ips_of(task: dict) -> str:
    return next(
        d["value"]
        for a in task["attachments"]
        for d in a["details"]
        if d["name"] == "privateIPv4Address"
    )


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def test_dagfactory_run_on_fargate_gives_the_result_and_leaves_nothing(
    aws_env, tmp_path, wordcount_repo
):
    path = fargate_pipeline(tmp_path, wordcount_repo, "fg_run")
    out = dagfactory("run", str(path), "-p", "chunks=6")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["chunks"] == 6 and result["top"][0] == ["the", 3368]
    assert "counting 4000 lines in 6 chunks on 2 workers" in out.stderr
    assert re.search(r"Dask scheduler at tls://127\.[0-9.]+:8786", out.stderr)
    assert SECRET not in out.stdout + out.stderr
    wait_nothing_left(aws_env)


def test_a_failing_entry_point_leaves_nothing(aws_env, tmp_path, repo_factory):
    repo = repo_factory("failing", {"failing_job.py": FAILING_JOB})
    path = write_pipeline(
        tmp_path,
        "fg_fails",
        f"""
        source: {{git: {repo.path}}}
        entrypoint: failing_job:main
        cluster: {{backend: fargate, workers: 1, region: eu-west-2}}
        """,
    )
    out = dagfactory("run", str(path))
    assert out.returncode == 1
    assert "failing_job:main raised ValueError: boom" in out.stderr
    assert "partial result 6" in out.stderr  # it did run on the Fargate workers
    wait_nothing_left(aws_env)


def test_a_start_that_fails_half_way_removes_what_it_made(aws_env, tmp_path, wordcount_repo):
    path = fargate_pipeline(tmp_path, wordcount_repo, "fg_half")
    spec = load(path)
    key = steps.run_key(spec.dag_id, "manual__half")
    aws_env.refuse_task_definitions(f"^{run_id(key)}-worker$")
    boot = steps.bootstrap(spec)
    with pytest.raises(Exception, match="refuses task definition family"):
        steps.cluster_up(spec, boot, key)
    wait_nothing_left(aws_env)  # the scheduler's definition and the group went too


def test_two_runs_at_once_never_touch_each_other(aws_env, tmp_path, wordcount_repo):
    path = fargate_pipeline(tmp_path, wordcount_repo, "fg_two", workers=1)
    spec = load(path)
    boot = steps.bootstrap(spec)
    first = steps.cluster_up(spec, boot, steps.run_key(spec.dag_id, "one"))
    second = steps.cluster_up(spec, boot, steps.run_key(spec.dag_id, "two"))
    assert first["details"]["security_groups"] != second["details"]["security_groups"]
    steps.teardown(spec, first["key"])  # by key, as a teardown with no handle does
    from dagfactory.backends import ClusterHandle
    from dagfactory.backends.fargate import FargateBackend

    backend = FargateBackend()
    assert not backend.alive(ClusterHandle.from_json(first))
    assert backend.alive(ClusterHandle.from_json(second))
    groups = aws_env.client("ec2").describe_security_groups(
        Filters=[{"Name": "tag-key", "Values": ["dagfactory:run"]}]
    )["SecurityGroups"]
    assert [g["GroupId"] for g in groups] == second["details"]["security_groups"]
    steps.teardown(spec, second["key"], second)
    wait_nothing_left(aws_env)


def test_a_python_mismatch_is_refused_before_anything_is_made(aws_env, tmp_path, wordcount_repo):
    image = f"ghcr.io/dask/dask:{_version('distributed')}-py3.12"
    path = fargate_pipeline(tmp_path, wordcount_repo, "fg_mismatch", image=image)
    spec = load(path)
    boot = steps.bootstrap(spec)
    with pytest.raises(ClusterError, match="Python 3.12, the pipeline's virtualenv"):
        steps.cluster_up(spec, boot, steps.run_key(spec.dag_id, "mismatch"))
    assert not leftovers(aws_env)


def test_validate_knows_fargate_sizes_and_backend_settings(tmp_path):
    bad = write_pipeline(
        tmp_path,
        "sizes",
        """
        source: {git: x}
        entrypoint: a:b
        cluster: {backend: fargate, cpu: 4, memory: 3GiB, scheduler_cpu: 3, listen: eth0,
                  adaptive: {maximum: 3}}
        """,
    )
    out = dagfactory("validate", str(bad))
    assert out.returncode == 1
    assert "with 4 vCPUs choose 8GiB to 30GiB in steps of 1GiB" in out.stdout
    assert "Fargate has no task with 3 vCPUs; choose one of 1, 2, 4, 8 or 16" in out.stdout
    assert "'listen' applies to the 'local' backend only" in out.stdout
    assert "adaptive scaling on fargate needs cluster.task_role" in out.stdout


def test_the_documented_iam_policy_allows_every_call_the_backend_makes():
    """deploy/aws/iam-policy.json is what the README tells users to attach: a call added to the
    backend without its permission would fail only on a real account."""
    source = (ROOT / "dagfactory" / "backends" / "fargate.py").read_text()
    calls = set(re.findall(r"aws\.(ecs|ec2|logs|sts)\.([a-z_]+)\(", source))
    calls |= {("ecs", name) for name in re.findall(r'get_paginator\("([a-z_]+)"\)', source)}
    calls.discard(("ecs", "get_paginator"))
    needed = {f"{svc}:{''.join(w.title() for w in name.split('_'))}" for svc, name in calls}
    # Tags given at creation need the tagging permission of the service too.
    needed |= {"ecs:TagResource", "ec2:CreateTags", "logs:TagResource", "iam:PassRole"}
    policy = json.loads((ROOT / "deploy" / "aws" / "iam-policy.json").read_text())
    allowed = {action for s in policy["Statement"] for action in s["Action"]}
    assert len(calls) >= 15
    assert needed <= allowed, sorted(needed - allowed)
    assert allowed <= needed, sorted(allowed - needed)  # and nothing it does not need


def test_the_scheduler_task_role_policy_allows_every_call_of_the_adaptive_preload():
    """deploy/aws/scheduler-task-role.json is what the README tells users to give the task role
    of an adaptive cluster: the scheduler's own calls, not the Airflow worker's."""
    source = (ROOT / "dagfactory" / "backends" / "adaptive.py").read_text()
    calls = set(re.findall(r"self\.ecs\.([a-z_]+)", source))
    needed = {f"ecs:{''.join(w.title() for w in name.split('_'))}" for name in calls}
    # Tags given at creation, and the roles of the worker tasks it starts.
    needed |= {"ecs:TagResource", "iam:PassRole"}
    policy = json.loads((ROOT / "deploy" / "aws" / "scheduler-task-role.json").read_text())
    allowed = {action for s in policy["Statement"] for action in s["Action"]}
    assert {"ecs:RunTask", "ecs:StopTask", "ecs:DescribeTasks"} <= needed
    assert needed == allowed, (sorted(needed - allowed), sorted(allowed - needed))


def _until(condition, timeout: float = 90.0, every: float = 0.3):
    """Poll `condition` until it holds (generous deadline: the machine is shared)."""
    deadline = time.monotonic() + timeout
    while not (result := condition()) and time.monotonic() < deadline:
        time.sleep(every)
    return result


def test_adaptive_worker_tasks_grow_within_maximum_shrink_back_and_go_with_teardown(
    aws_env, tmp_path, wordcount_repo
):
    from distributed import Client, fire_and_forget
    from distributed.security import Security

    from dagfactory.backends import ClusterHandle
    from dagfactory.backends.fargate import FargateBackend

    aws = aws_env
    path = fargate_pipeline(
        tmp_path,
        wordcount_repo,
        "fg_adaptive",
        workers=1,
        adaptive={"minimum": 1, "maximum": 3},
        task_role="dagfactory-task",
        spot=True,
    )
    spec = load(path)
    key = steps.run_key(spec.dag_id, "manual__adaptive")
    rid = run_id(key)
    handle = steps.cluster_up(spec, steps.bootstrap(spec), key)
    details = handle["details"]
    assert details["adaptive"] == {"minimum": 1, "maximum": 3}
    assert len(details["worker_tasks"]) == 1
    ecs = aws.client("ecs")

    def running_workers() -> list[str]:
        listed = ecs.list_tasks(cluster="dagfactory", startedBy=rid, desiredStatus="RUNNING")
        return [t for t in listed["taskArns"] if t != details["scheduler_task"]]

    tls = FargateBackend().client_env(ClusterHandle.from_json(handle))
    security = Security(
        require_encryption=True,
        tls_ca_file=tls["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"],
        tls_client_cert=tls["DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT"],
        tls_client_key=tls["DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY"],
    )
    with Client(handle["scheduler_address"], security=security, timeout=30) as client:
        futures = client.map(time.sleep, [0.5] * 60, pure=False)
        tasks_seen, workers_seen = [], []
        while not all(f.done() for f in futures):
            tasks_seen.append(len(running_workers()))
            workers_seen.append(len(client.nthreads()))
            time.sleep(0.2)
        assert client.gather(futures) == [None] * 60
        assert 1 < max(tasks_seen) <= 3, tasks_seen
        assert 1 < max(workers_seen) <= 3, workers_seen
        # Idle again: back to the minimum, in the scheduler and in ECS.
        assert _until(lambda: len(running_workers()) == 1 and len(client.nthreads()) == 1)

        mine = [t for t in aws.tasks if t.started_by == rid]
        [first] = [t for t in mine if t.arn in details["worker_tasks"]]
        added = [t for t in mine if "--name" in t.command]
        assert added and len(mine) == 2 + len(added)  # and the scheduler, the first worker
        [left] = running_workers()
        described = {t["taskArn"]: t for t in describe_tasks(aws, [t.arn for t in mine])}
        for task in added:
            # The first worker's arguments, a name of its own, and the scheduler's TLS.
            name = task.command[task.command.index("--name") + 1]
            assert re.fullmatch(r"adaptive-[0-9]+", name)
            assert task.command[:-4] == [*first.command[:-4], "--name", name]
            tls_key = "DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY"
            assert task.env[tls_key] == first.env[tls_key]
            ours, theirs = described[task.arn], described[first.arn]
            for field in ("startedBy", "taskDefinitionArn", "capacityProviderName", "tags"):
                assert ours[field] == theirs[field], field
        for task in mine:  # the retired workers' tasks, whichever they were, are stopped
            if task.arn not in (left, details["scheduler_task"]):
                assert described[task.arn]["lastStatus"] == "STOPPED", described[task.arn]
        # The scheduler's calls were made with its task role.
        assert "dagfactory-task" in aws.role_credentials.asked

        # No secret in the definitions nor in the preload's configuration.
        [scheduler] = [t for t in mine if t.arn == details["scheduler_task"]]
        config = scheduler.env["DAGFACTORY_ADAPTIVE"]
        assert "PRIVATE KEY" not in config and "CERTIFICATE" not in config
        for arn in details["task_definitions"]:
            definition = ecs.describe_task_definition(taskDefinition=arn)["taskDefinition"]
            assert "PRIVATE KEY" not in json.dumps(definition)
        for task in mine:
            assert SECRET not in json.dumps(task.env)
            assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(task.env)
        # boto3 for the scheduler's preload, which travels in its command as source.
        assert re.search(r"(^| )boto3==[0-9.]+", scheduler.extra_pip_packages)
        assert "boto3" not in (first.extra_pip_packages or "")
        assert "class TaskWorkers" in scheduler.command[scheduler.command.index("--preload") + 1]

        # Work again, and a teardown by key while the scheduler's own workers run.
        fire_and_forget(client.map(time.sleep, [0.5] * 60, pure=False))
        assert _until(lambda: len(running_workers()) > 1)
    out = dagfactory("teardown", str(path), "--key", key)
    assert out.returncode == 0, out.stderr
    wait_nothing_left(aws)
