"""The fake AWS itself: moto's server plus a container agent that runs each task for real."""

from __future__ import annotations

import ipaddress
import json
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable

import psutil
import pytest

from tests.aws_fake import (
    EXITED_REASON,
    TASK_MARKER,
    bind_to_task_address,
    fake_aws,
    loopback_addresses,
)

IMAGE = "ghcr.io/dask/dask:2026.8.0-py3.11"
# A task's "service": answers who it is, bound to its own address only.
ANSWER_WHO = textwrap.dedent(
    """
    import http.server, json, os

    class Who(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({
                "arn": os.environ["DAGFACTORY_FAKE_TASK"],
                "greeting": os.environ.get("GREETING"),
                "endpoint": os.environ.get("AWS_ENDPOINT_URL"),
                "region": os.environ.get("AWS_REGION"),
                "credentials": os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
                "keys": sorted(k for k in os.environ if k.startswith("AWS_") and "KEY" in k),
            }).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

    address = (os.environ["DAGFACTORY_FAKE_TASK_IP"], 8080)
    http.server.HTTPServer(address, Who).serve_forever()
    """
)


def _eventually(check: Callable[[], object], what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def _ask(ip: str) -> dict:
    with urllib.request.urlopen(f"http://{ip}:8080/", timeout=5) as response:
        return json.load(response)


def _network(aws) -> dict:
    ec2 = aws.client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"][0]
    only_vpc = [{"Name": "vpc-id", "Values": [vpc["VpcId"]]}]
    subnet = ec2.describe_subnets(Filters=only_vpc)["Subnets"][0]["SubnetId"]
    group = ec2.describe_security_groups(Filters=only_vpc)["SecurityGroups"][0]["GroupId"]
    return {"awsvpcConfiguration": {"subnets": [subnet], "securityGroups": [group]}}


def _task_definition(
    ecs, command: list[str], image: str = IMAGE, role: str = "", **environment: str
) -> str:
    container = {
        "name": "main",
        "image": image,
        "command": command,
        "cpu": 256,
        "memory": 512,
        "environment": [{"name": k, "value": v} for k, v in environment.items()],
    }
    registered = ecs.register_task_definition(
        family="harness",
        networkMode="awsvpc",
        requiresCompatibilities=["FARGATE"],
        cpu="256",
        memory="512",
        containerDefinitions=[container],
        **({"taskRoleArn": role} if role else {}),
    )
    return registered["taskDefinition"]["taskDefinitionArn"]


def _run(aws, definition: str, **kwargs) -> str:
    ecs = aws.client("ecs")
    started = ecs.run_task(
        cluster="harness",
        taskDefinition=definition,
        launchType="FARGATE",
        networkConfiguration=_network(aws),
        **kwargs,
    )
    return started["tasks"][0]["taskArn"]


def _status(aws, arn: str) -> dict:
    return aws.client("ecs").describe_tasks(cluster="harness", tasks=[arn])["tasks"][0]


def test_task_addresses_are_loopback_and_never_reused():
    allocate = loopback_addresses("127.7.3.2")
    addresses = [allocate() for _ in range(253)]
    assert addresses[:2] == ["127.7.3.2", "127.7.3.3"]
    assert addresses[-1] == "127.7.3.254"
    assert len(set(addresses)) == 253
    assert all(ipaddress.ip_address(a).is_loopback for a in addresses)
    with pytest.raises(RuntimeError, match="no task address left"):
        allocate()


def test_dask_commands_are_bound_to_the_task_address():
    assert bind_to_task_address(["dask", "scheduler", "--idle-timeout", "1h"], "127.1.0.2") == [
        "dask",
        "scheduler",
        "--idle-timeout",
        "1h",
        "--host",
        "127.1.0.2",
        "--dashboard-address",
        "127.1.0.2:8787",
    ]
    worker = bind_to_task_address(["/opt/bin/dask", "worker", "tcp://127.1.0.2:8786"], "127.1.0.3")
    assert worker[-4:] == ["--host", "127.1.0.3", "--dashboard-address", "127.1.0.3:8789"]
    module = bind_to_task_address(["python", "-m", "distributed.cli.dask_worker", "x"], "127.1.0.4")
    assert module[-1] == "127.1.0.4:8789"
    assert bind_to_task_address(["python", "-c", "pass"], "127.1.0.5") == ["python", "-c", "pass"]


@pytest.mark.e2e
def test_tasks_run_on_their_own_address_until_stopped():
    with fake_aws(images={"*": sys.prefix}) as aws:
        ecs = aws.client("ecs")
        ecs.create_cluster(clusterName="harness")
        definition = _task_definition(ecs, ["python", "-c", ANSWER_WHO], GREETING="definition")
        with_role = _task_definition(
            ecs,
            ["python", "-c", ANSWER_WHO],
            role="arn:aws:iam::123456789012:role/pipeline-data",
            GREETING="definition",
        )
        first = _run(aws, definition, startedBy="harness-test")
        second = _run(
            aws,
            with_role,
            overrides={
                "containerOverrides": [
                    {
                        "name": "main",
                        "command": ["python", "-c", ANSWER_WHO, "overridden"],
                        "environment": [{"name": "GREETING", "value": "override"}],
                    }
                ]
            },
        )
        one, two = aws.task(first), aws.task(second)

        assert one.ip != two.ip
        for task in (one, two):
            assert ipaddress.ip_address(task.ip).is_loopback
            assert task.ip != "127.0.0.1"
            details = _status(aws, task.arn)["attachments"][0]["details"]
            assert {"name": "privateIPv4Address", "value": task.ip} in details
        assert one.started_by == "harness-test"
        assert two.command[-1] == "overridden"

        answers = {
            t.arn: _eventually(lambda t=t: _ask(t.ip), f"{t.arn} answers") for t in (one, two)
        }
        # Every task reaches this fake AWS and knows its region; credentials come only with a
        # task role, from its endpoint on loopback, never in the environment.
        assert answers[first] == {
            "arn": first,
            "greeting": "definition",
            "endpoint": aws.endpoint,
            "region": aws.region,
            "credentials": None,
            "keys": [],
        }
        assert answers[second]["greeting"] == "override"
        assert answers[second]["keys"] == []
        role_url = answers[second]["credentials"]
        assert role_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(role_url, timeout=5) as response:
            credentials = json.load(response)
        assert {"AccessKeyId", "SecretAccessKey", "Token", "Expiration"} <= set(credentials)
        assert aws.role_credentials.asked == ["pipeline-data"]

        ecs.stop_task(cluster="harness", task=first, reason="test stops it")
        _eventually(lambda: one.container.process.poll() is not None, "the stopped task exits")
        alive = {proc.environ()[TASK_MARKER] for proc in aws.live_processes()}
        assert alive == {second}
        assert _ask(two.ip)["arn"] == second
        assert (one.stop_reason, one.running, two.running) == ("test stops it", False, True)
        assert _status(aws, first)["lastStatus"] == "STOPPED"
        assert _status(aws, second)["lastStatus"] == "RUNNING"
        survivor = two.container.process.pid

    assert aws.live_processes() == []
    assert not psutil.pid_exists(survivor)
    assert two.stop_reason == "the fake AWS shut down"


@pytest.fixture(scope="module")
def aws():
    """One fake AWS for the tests that do not look at its exit (it takes seconds to start)."""
    with fake_aws(images={IMAGE: sys.prefix}) as aws:
        aws.client("ecs").create_cluster(clusterName="harness")
        yield aws


@pytest.mark.e2e
def test_a_task_whose_command_exits_is_stopped_in_ecs(aws):
    ecs = aws.client("ecs")
    exits = _run(aws, _task_definition(ecs, ["python", "-c", "raise SystemExit(3)"]))
    unknown_image = _run(aws, _task_definition(ecs, ["true"], image="example/other:1"))

    stopped = _eventually(
        lambda: (s := _status(aws, exits))["lastStatus"] == "STOPPED" and s, "stopped in ECS"
    )
    assert stopped["desiredStatus"] == "STOPPED"
    assert stopped["stoppedReason"] == EXITED_REASON
    assert aws.task(exits).container.exit_code == 3

    refused = _eventually(
        lambda: (s := _status(aws, unknown_image))["lastStatus"] == "STOPPED" and s,
        "an unknown image is refused",
    )
    assert refused["stoppedReason"].startswith("CannotPullContainerError")
    assert aws.task(unknown_image).containers == []


@pytest.mark.e2e
def test_overrides_longer_than_aws_takes_are_refused(aws):
    from botocore.exceptions import ClientError

    ecs = aws.client("ecs")
    definition = _task_definition(ecs, ["true"])
    big = {
        "containerOverrides": [
            {"name": "main", "environment": [{"name": "X", "value": "x" * 8200}]}
        ]
    }
    with pytest.raises(ClientError, match="Container Overrides length must be at most 8192"):
        _run(aws, definition, overrides=big)
    fits = {
        "containerOverrides": [
            {"name": "main", "environment": [{"name": "X", "value": "x" * 8000}]}
        ]
    }
    arn = _run(aws, definition, overrides=fits)
    assert aws.task(arn).env["X"] == "x" * 8000


@pytest.mark.e2e
def test_a_dask_cluster_listens_only_on_its_task_addresses(aws):
    from distributed import Client

    ecs = aws.client("ecs")
    definition = _task_definition(
        ecs, ["dask", "scheduler", "--idle-timeout", "120"], EXTRA_PIP_PACKAGES="s3fs"
    )
    scheduler = aws.task(_run(aws, definition))
    address = f"tcp://{scheduler.ip}:8786"
    worker_command = ["dask", "worker", address, "--nworkers", "1", "--nthreads", "1"]
    overrides = {"containerOverrides": [{"name": "main", "command": worker_command}]}
    worker = aws.task(_run(aws, definition, overrides=overrides))

    with Client(address, timeout=20) as client:
        client.wait_for_workers(1, timeout=20)
        workers = list(client.scheduler_info()["workers"])
        assert client.submit(sum, [1, 2]).result(timeout=20) == 3
    assert [w.removeprefix("tcp://").split(":")[0] for w in workers] == [worker.ip]
    assert scheduler.extra_pip_packages == "s3fs"

    listening: dict[str, set[str]] = {}
    for proc in aws.live_processes():
        ip = proc.environ()["DAGFACTORY_FAKE_TASK_IP"]
        for connection in proc.net_connections("inet"):
            if connection.status == psutil.CONN_LISTEN:
                listening.setdefault(ip, set()).add(connection.laddr.ip)
    assert listening == {scheduler.ip: {scheduler.ip}, worker.ip: {worker.ip}}

    for task in (worker, scheduler):
        ecs.stop_task(cluster="harness", task=task.arn, reason="done")
    _eventually(lambda: aws.live_processes() == [], "stop_task ends every Dask process")
