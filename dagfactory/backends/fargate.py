"""`fargate`: a Dask scheduler and workers as AWS ECS Fargate tasks, made for one run.

Driven with boto3, not dask-cloudprovider: its FargateCluster (2025.9) runs the `dask-scheduler`
and `dask-worker` commands that distributed 2026.6 removed, deletes what it made only from a
`weakref.finalize` in the process that made it (nothing after a SIGKILL, nothing from another
host), cannot re-attach to a cluster from another process, sweeps the whole account for clusters
to delete at every start, opens the scheduler to the world and gives tasks public IPs. Each of
those is a thing this backend must do the other way; what is left of it is a boto3 call.

Everything a run makes is named and tagged after its run id (a hash of the run key), and its
tasks carry it as `startedBy`, so `down` finds all of it from the key alone, from any process on
any host with the same AWS account: it stops the tasks, deregisters and deletes the task
definitions, deletes the run's security group. The scheduler stops itself after `idle_timeout`
with no work and the workers follow it (`--death-timeout`), so a teardown that never runs costs
minutes, not a bill.

Traffic between the client, the scheduler and the workers is TLS with a certificate made for
the run; tasks get private IPs and a security group that admits the scheduler and dashboard
ports only from `allow_from` (default: the VPC). The certificate travels in the tasks' run
overrides, not in the task definitions (which AWS keeps) nor in the handle (which goes to XCom):
a client reads it back from the scheduler task with the same ECS permissions teardown needs.

With `cluster.adaptive` the scheduler starts and stops worker tasks itself (adaptive.py, which
says why): its command carries the preload as source text (the stock image has no file of
ours), its EXTRA_PIP_PACKAGES boto3, its run overrides the run_task arguments of the first
workers (no secret: the TLS settings the workers need are the scheduler's own variables), and
its calls are made with the task role. Its workers carry the run id as `startedBy` like the
rest, so `down` finds them too.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from dagfactory.backends import ClusterContext, ClusterHandle, scheduler_answers
from dagfactory.errors import ClusterError
from dagfactory.spec.pipeline import ClusterSpec, parse_duration, parse_size

log = logging.getLogger(__name__)

SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
CONTAINER = "dask"
START_TIMEOUT = 600.0
"""Pulling the image and installing the pipeline's packages can take minutes on Fargate."""
DEATH_TIMEOUT = 60
RUN_TASK_BATCH = 10  # ECS starts at most this many tasks per run_task call
LOG_RETENTION_DAYS = 30
DEFAULT_EXECUTION_ROLE = "ecsTaskExecutionRole"
STOP_REASON = "dagfactory teardown"
_ALREADY_GONE = ("InvalidParameterException", "ClusterNotFoundException")
ADAPTIVE_PRELOAD = Path(__file__).with_name("adaptive.py")
ADAPTIVE_VARIABLE = "DAGFACTORY_ADAPTIVE"  # read by adaptive.py
SCHEDULER_ADDRESS = "{scheduler_address}"  # adaptive.py puts the scheduler's address there

# vCPUs -> (smallest GiB, largest GiB, step GiB): the task sizes Fargate offers.
FARGATE_SIZES = {1: (2, 8, 1), 2: (4, 16, 1), 4: (8, 30, 1), 8: (16, 60, 4), 16: (32, 120, 8)}
_GIB = 1024**3
_STOCK_IMAGE = re.compile(r"(^|/)dask/dask:(?P<dask>[0-9][^-]*)-py(?P<python>[0-9]+\.[0-9]+)$")
# Dask reads these from the environment; PEM contents instead of file names work as well.
_TLS_ENV = {
    "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": None,
    "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": "ca",
    "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT": "cert",
    "DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY": "key",
    "DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT": "cert",
    "DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY": "key",
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": "cert",
    "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": "key",
}


def task_size_problem(cpu: int, memory: int) -> str | None:
    """What is wrong with a task of `cpu` vCPUs and `memory` bytes on Fargate, if anything."""
    if cpu not in FARGATE_SIZES:
        return f"Fargate has no task with {cpu} vCPUs; choose one of 1, 2, 4, 8 or 16"
    low, high, step = FARGATE_SIZES[cpu]
    gib = memory / _GIB
    if low <= gib <= high and gib == int(gib) and (int(gib) - low) % step == 0:
        return None
    return (
        f"Fargate has no task with {cpu} vCPUs and {gib:g}GiB of memory; with {cpu} vCPUs "
        f"choose {low}GiB to {high}GiB in steps of {step}GiB"
    )


def run_id(key: str) -> str:
    """The run's name on AWS: short enough for `startedBy` (36 characters), the same from any
    host that knows the key."""
    return "dagfactory-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def default_image(python_version: str | None = None, distributed: str | None = None) -> str:
    """The stock Dask image whose `distributed` and Python are those given (default: ours)."""
    if distributed is None:
        from importlib.metadata import version

        distributed = version("distributed")
    python_version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    return f"ghcr.io/dask/dask:{distributed}-py{python_version}"


def image_versions(image: str) -> dict[str, str]:
    """{"distributed": ..., "python": ...} read from a stock Dask image's tag ({} otherwise)."""
    match = _STOCK_IMAGE.search(image)
    return {"distributed": match["dask"], "python": match["python"]} if match else {}


def _run_security() -> Any:
    """A certificate and key made for one run, for every role (like Dask's
    `Security.temporary`), on an elliptic curve rather than RSA: the tasks get them in their
    run overrides, which ECS caps at 8192 characters, and RSA's would take more than that."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from distributed.security import Security

    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    ).decode()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-internal")])
    now = datetime.datetime.now(tz=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("dask-internal")]), False)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    roles = {
        f"tls_{role}_{part}": pem
        for role in ("client", "scheduler", "worker")
        for part, pem in (("cert", cert_pem), ("key", key_pem))
    }
    return Security(require_encryption=True, tls_ca_file=cert_pem, **roles)


def _worker_command(spec: ClusterSpec, address: str) -> list[str]:
    return [
        "dask", "worker", address,
        "--nthreads", str(spec.cpu),
        "--memory-limit", str(parse_size(spec.memory)),
        "--death-timeout", str(DEATH_TIMEOUT),
    ]  # fmt: skip


def _boto3_requirement(packages: list[str], python: str) -> list[str]:
    """boto3 for the adaptive scheduler, unless the pipeline's packages have it already: at the
    pipeline virtualenv's version if it has one, else at ours."""
    if any(re.match(r"boto3\b", package, re.IGNORECASE) for package in packages):
        return []
    if python:
        probe = "import importlib.metadata as m; print(m.version('boto3'))"
        found = subprocess.run([python, "-c", probe], capture_output=True, text=True)
        if found.returncode == 0:
            return [f"boto3=={found.stdout.strip()}"]
    from importlib.metadata import version

    return [f"boto3=={version('boto3')}"]


def _venv_versions(python: str) -> dict[str, str]:
    probe = (
        "import sys, importlib.metadata as m; "
        "print(m.version('distributed'), '%d.%d' % sys.version_info[:2])"
    )
    out = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=True)
    distributed, python_version = out.stdout.split()
    return {"distributed": distributed, "python": python_version}


class Aws:
    """boto3 clients for one region, with the credentials of the Airflow connection when
    there is one, else of the standard AWS chain. Credentials never leave this object."""

    def __init__(self, region: str | None, aws_conn_id: str | None) -> None:
        self._session, self._endpoints = _session(region, aws_conn_id)
        self.region = self._session.region_name
        if not self.region:
            raise ClusterError(
                "no AWS region: set cluster.region, the connection's region_name, or "
                "AWS_DEFAULT_REGION"
            )
        self._clients: dict[str, Any] = {}

    def __getattr__(self, service: str) -> Any:  # aws.ecs, aws.ec2, aws.logs, aws.sts
        if service.startswith("_"):
            raise AttributeError(service)
        if service not in self._clients:
            endpoint = self._endpoints(service) if self._endpoints else None
            self._clients[service] = self._session.client(service, endpoint_url=endpoint)
        return self._clients[service]


def _session(region: str | None, aws_conn_id: str | None) -> tuple[Any, Any]:
    """A boto3 session and a function giving a service's endpoint URL override (or None)."""
    import boto3

    # Only inside Airflow (its task SDK is loaded): `dagfactory run` must not import Airflow,
    # which would read or write an airflow.cfg on the user's machine.
    if aws_conn_id and "airflow.sdk" in sys.modules:
        try:
            from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook
        except ImportError:
            pass  # no Airflow here (dagfactory run): the standard chain
        else:
            try:
                hook = AwsBaseHook(aws_conn_id=aws_conn_id)
                config = hook.conn_config
                session = hook.get_session(region_name=region or config.region_name)
                return session, config.get_service_endpoint_url
            except Exception as exc:  # no such connection, no metadata DB: the standard chain
                log.info("AWS connection %r not used (%s); using the AWS chain", aws_conn_id, exc)
    return boto3.Session(region_name=region), None


def _error_code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", "")


class FargateBackend:
    def pins(self, spec: ClusterSpec) -> dict[str, str]:
        """The pipeline's virtualenv gets the `distributed` of the cluster's image, so that
        client and cluster speak the same protocol."""
        versions = image_versions(spec.image or default_image())
        return {"distributed": versions["distributed"]} if versions else {}

    def up(self, spec: ClusterSpec, context: ClusterContext) -> ClusterHandle:
        image = spec.image or default_image()
        expected = image_versions(image)
        if context.python and expected:
            mine = _venv_versions(context.python)
            if mine != expected:
                raise ClusterError(
                    f"the image {image} has distributed {expected['distributed']} and Python "
                    f"{expected['python']}, the pipeline's virtualenv distributed "
                    f"{mine['distributed']} and Python {mine['python']}: client and cluster "
                    "must match. Use the image of the virtualenv's versions (remove "
                    "cluster.image) or pin distributed in the pipeline's requirements."
                )
        aws = Aws(spec.region, spec.aws_conn_id)
        rid = run_id(context.key)
        where = {"region": aws.region, "ecs_cluster": spec.ecs_cluster, "run_id": rid}
        # An earlier attempt of this same run (a retry replacing a lost cluster) may have left
        # tasks or a half-made group: start from nothing.
        self._remove(aws, ClusterHandle("fargate", context.key, "", details=where), quiet=True)
        try:
            return self._start(aws, spec, context, image, where)
        except BaseException:
            self._remove(aws, ClusterHandle("fargate", context.key, "", details=where))
            raise

    def _start(
        self,
        aws: Aws,
        spec: ClusterSpec,
        context: ClusterContext,
        image: str,
        where: dict[str, Any],
    ) -> ClusterHandle:
        rid = where["run_id"]
        tags = {**spec.tags, "dagfactory:run": rid, "dagfactory:key": context.key[:256]}
        _ensure_ecs_cluster(aws, spec.ecs_cluster, tags)
        subnets, vpc = _network(aws, spec)
        groups = list(spec.security_groups) or [_security_group(aws, spec, rid, vpc, tags)]
        _ensure_log_group(aws, spec.log_group)
        role = _role_arn(aws, spec.execution_role or DEFAULT_EXECUTION_ROLE)
        task_role = _role_arn(aws, spec.task_role) if spec.task_role else None
        packages = []
        if context.python:
            from dagfactory.run.workspace import pipeline_packages

            packages = pipeline_packages(Path(context.python).parent.parent)
        idle = int(parse_duration(spec.idle_timeout).total_seconds())
        scheduler_command = [
            "dask", "scheduler", "--idle-timeout", f"{idle}s",
            "--port", str(SCHEDULER_PORT), "--dashboard-address", f":{DASHBOARD_PORT}",
        ]  # fmt: skip
        scheduler_packages = packages
        if spec.adaptive:
            # The scheduler starts and stops its workers itself (adaptive.py says why), with
            # boto3; the stock image has no file of ours, so the preload travels as source.
            scheduler_command += ["--preload", ADAPTIVE_PRELOAD.read_text()]
            scheduler_packages = [*packages, *_boto3_requirement(packages, context.python)]
        definitions = {
            "scheduler": _register(
                aws, spec, rid, "scheduler", image, role, task_role, scheduler_packages, tags,
                spec.scheduler_cpu, spec.scheduler_memory, scheduler_command,
            ),
            "worker": _register(
                aws, spec, rid, "worker", image, role, task_role, packages, tags,
                spec.cpu, spec.memory, ["dask", "worker"],
            ),
        }  # fmt: skip
        security = _run_security()
        pem = {
            "ca": security.tls_ca_file,
            "cert": security.tls_scheduler_cert,
            "key": security.tls_scheduler_key,
        }
        secrets = [
            {"name": name, "value": pem[part] if part else "True"}
            for name, part in _TLS_ENV.items()
        ]
        network = {
            "awsvpcConfiguration": {
                "subnets": subnets,
                "securityGroups": groups,
                "assignPublicIp": "ENABLED" if spec.public_ip else "DISABLED",
            }
        }
        common = {
            "cluster": spec.ecs_cluster,
            "networkConfiguration": network,
            "startedBy": rid,
            "tags": [{"key": k, "value": v} for k, v in tags.items()],
        }
        capacity = (
            {"capacityProviderStrategy": [{"capacityProvider": "FARGATE_SPOT", "weight": 1}]}
            if spec.spot
            else {"launchType": "FARGATE"}
        )
        scheduler_env = list(secrets)
        if spec.adaptive:
            # No secret in here: the workers' TLS settings are the scheduler's own variables,
            # which the preload reads from its environment by these names.
            adaptive = {
                "minimum": spec.adaptive.minimum,
                "maximum": spec.adaptive.maximum,
                "start_workers": spec.start_workers,
                "start_timeout": START_TIMEOUT,
                "ecs": {
                    "region": aws.region,
                    "run_task": {
                        "taskDefinition": definitions["worker"],
                        **capacity,
                        **common,
                    },
                    "container": CONTAINER,
                    "command": _worker_command(spec, SCHEDULER_ADDRESS),
                    "environment": list(_TLS_ENV),
                },
            }
            scheduler_env.append({"name": ADAPTIVE_VARIABLE, "value": json.dumps(adaptive)})
        [scheduler_task] = _run_tasks(
            aws,
            1,
            taskDefinition=definitions["scheduler"],
            launchType="FARGATE",
            overrides={"containerOverrides": [{"name": CONTAINER, "environment": scheduler_env}]},
            **common,
        )
        ip = _wait_running(aws, spec.ecs_cluster, scheduler_task, spec.log_group)
        address = f"tls://{ip}:{SCHEDULER_PORT}"
        args = security.get_connection_args("client")
        _wait_scheduler(aws, spec, scheduler_task, address, args, context)
        worker_tasks = _run_tasks(
            aws,
            spec.start_workers,
            taskDefinition=definitions["worker"],
            overrides={
                "containerOverrides": [
                    {
                        "name": CONTAINER,
                        "command": _worker_command(spec, address),
                        "environment": secrets,
                    }
                ]
            },
            **capacity,
            **common,
        )
        _wait_workers(aws, spec, worker_tasks, address, args)
        details = {
            **where,
            "aws_conn_id": spec.aws_conn_id,
            "scheduler_task": scheduler_task,
            "worker_tasks": worker_tasks,
            "task_definitions": list(definitions.values()),
            "security_groups": groups,
            "log_group": spec.log_group,
            "log_streams": f"{rid}/{CONTAINER}/",
            "image": image,
            "idle_timeout": idle,
        }
        if spec.adaptive:
            details["adaptive"] = {
                "minimum": spec.adaptive.minimum,
                "maximum": spec.adaptive.maximum,
            }
        return ClusterHandle(
            backend="fargate",
            key=context.key,
            scheduler_address=address,
            dashboard_link=f"http://{ip}:{DASHBOARD_PORT}/status",
            details=details,
        )

    def alive(self, handle: ClusterHandle) -> bool:
        """The scheduler's task runs and its port answers."""
        details = handle.details
        if not details.get("scheduler_task"):
            return False
        try:
            aws = Aws(details["region"], details.get("aws_conn_id"))
            [task] = aws.ecs.describe_tasks(
                cluster=details["ecs_cluster"], tasks=[details["scheduler_task"]]
            )["tasks"] or [{}]
        except Exception:
            return False
        return task.get("lastStatus") == "RUNNING" and scheduler_answers(handle.scheduler_address)

    def client_env(self, handle: ClusterHandle) -> dict[str, str]:
        """The TLS settings a client of this cluster needs, read back from the scheduler's task
        (they are in no handle and no log)."""
        details = handle.details
        aws = Aws(details["region"], details.get("aws_conn_id"))
        [task] = aws.ecs.describe_tasks(
            cluster=details["ecs_cluster"], tasks=[details["scheduler_task"]]
        )["tasks"]
        env = {}
        for override in task.get("overrides", {}).get("containerOverrides", []):
            for item in override.get("environment", []):
                if item["name"] in _TLS_ENV:
                    env[item["name"]] = item["value"]
        return env

    def describe(self, handle: ClusterHandle) -> list[str]:
        """Where the user finds the cluster's dashboard and logs (lines for the task log)."""
        details = handle.details
        ip = handle.scheduler_address.removeprefix("tls://").rsplit(":", 1)[0]
        return [
            f"Dask dashboard: {handle.dashboard_link} (a private address: open it through your "
            f"VPN, or forward it through a bastion host: ssh -N -L {DASHBOARD_PORT}:{ip}:"
            f"{DASHBOARD_PORT} <bastion>, then http://localhost:{DASHBOARD_PORT}/status)",
            f"scheduler and worker logs: CloudWatch Logs group {details['log_group']} in "
            f"{details['region']}, streams {details['log_streams']}<task id>",
        ]

    def down(self, handle: ClusterHandle, spec: ClusterSpec | None = None) -> None:
        """Stop every task of the run, deregister its task definitions, delete its security
        group; from the handle or, with `spec` to say where, from the key alone."""
        details = dict(handle.details)
        if not details.get("region") and spec is None:
            log.warning("no handle and no spec for %s: nothing to look for", handle.key)
            return
        if spec is not None:
            details.setdefault("ecs_cluster", spec.ecs_cluster)
            details.setdefault("aws_conn_id", spec.aws_conn_id)
        aws = Aws(details.get("region") or (spec.region if spec else None), details["aws_conn_id"])
        details.setdefault("region", aws.region)
        details["run_id"] = run_id(handle.key)
        self._remove(aws, ClusterHandle("fargate", handle.key, "", details=details))

    def _remove(self, aws: Aws, handle: ClusterHandle, quiet: bool = False) -> None:
        details = handle.details
        rid, cluster = details["run_id"], details["ecs_cluster"]
        # The scheduler first: an adaptive one starts workers until it stops. Then list again,
        # for a worker it started between our listing and its end (its own close stops those
        # too, unless it was killed).
        known = [details.get("scheduler_task"), *details.get("worker_tasks", ())]
        stopped: list[str] = []
        for _round in range(3):
            tasks = [t for t in self._live_tasks(aws, cluster, rid, known) if t not in stopped]
            if not tasks:
                break
            for task in tasks:
                try:
                    aws.ecs.stop_task(cluster=cluster, task=task, reason=STOP_REASON)
                    stopped.append(task)
                except Exception as exc:
                    if _error_code(exc) not in _ALREADY_GONE:
                        raise
            known = []
        definitions = _deregister(aws, rid)
        groups = _delete_groups(aws, cluster, rid, stopped)
        if stopped or definitions or groups or not quiet:
            log.info(
                "run %s on %s: stopped %d task(s), deregistered %d task definition(s), deleted "
                "security group(s) %s",
                rid,
                cluster,
                len(stopped),
                len(definitions),
                ", ".join(groups) or "none",
            )

    @staticmethod
    def _live_tasks(aws: Aws, cluster: str, rid: str, known: list[str | None]) -> list[str]:
        """The run's tasks not stopped yet: those named (in this order), then those listed."""
        tasks = [t for t in known if t]
        try:
            tasks += [t for t in _list_tasks(aws, cluster, rid) if t not in tasks]
        except Exception as exc:
            if _error_code(exc) != "ClusterNotFoundException":
                raise
        if not tasks:
            return []
        # Twice is harmless, and the second time says it stopped nothing.
        live = {
            t["taskArn"]
            for t in _describe(aws, cluster, tasks)
            if t.get("desiredStatus") != "STOPPED"
        }
        return [t for t in tasks if t in live]


def _ensure_ecs_cluster(aws: Aws, name: str, tags: dict[str, str]) -> None:
    found = aws.ecs.describe_clusters(clusters=[name])["clusters"]
    if found and found[0].get("status") == "ACTIVE":
        return
    aws.ecs.create_cluster(
        clusterName=name,
        capacityProviders=["FARGATE", "FARGATE_SPOT"],
        defaultCapacityProviderStrategy=[{"capacityProvider": "FARGATE", "weight": 1}],
        tags=[{"key": "dagfactory:created-by", "value": tags["dagfactory:run"]}],
    )


def _network(aws: Aws, spec: ClusterSpec) -> tuple[list[str], str]:
    """The run's subnets and their VPC: the spec's, else the default VPC's."""
    if spec.subnets:
        found = aws.ec2.describe_subnets(SubnetIds=list(spec.subnets))["Subnets"]
        vpcs = {s["VpcId"] for s in found}
        if len(vpcs) != 1:
            raise ClusterError(f"cluster.subnets must be in one VPC; they are in {sorted(vpcs)}")
        return list(spec.subnets), vpcs.pop()
    vpcs = aws.ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise ClusterError(
            f"the region {aws.region} has no default VPC: set cluster.subnets (and "
            "cluster.security_groups or cluster.allow_from)"
        )
    vpc = vpcs[0]["VpcId"]
    subnets = aws.ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    return sorted(s["SubnetId"] for s in subnets), vpc


def _security_group(aws: Aws, spec: ClusterSpec, rid: str, vpc: str, tags: dict[str, str]) -> str:
    """A group for the run: the scheduler and dashboard ports from `allow_from` only, and
    everything between the run's own tasks (workers talk to each other on random ports)."""
    group = aws.ec2.create_security_group(
        GroupName=rid,
        Description=f"dagfactory run {rid}: Dask scheduler and workers",
        VpcId=vpc,
        TagSpecifications=[
            {
                "ResourceType": "security-group",
                "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
            }
        ],
    )["GroupId"]
    sources = list(spec.allow_from)
    if not sources:
        [described] = aws.ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"]
        sources = [described["CidrBlock"]]
    cidrs = [{"CidrIp": s, "Description": "dagfactory client"} for s in sources if "/" in s]
    pairs = [{"GroupId": s, "Description": "dagfactory client"} for s in sources if "/" not in s]
    aws.ec2.authorize_security_group_ingress(
        GroupId=group,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": SCHEDULER_PORT,
                "ToPort": DASHBOARD_PORT,
                "IpRanges": cidrs,
                "UserIdGroupPairs": pairs,
            },
            {
                "IpProtocol": "tcp",
                "FromPort": 0,
                "ToPort": 65535,
                "UserIdGroupPairs": [{"GroupId": group, "Description": "the run's own tasks"}],
            },
        ],
    )
    return group


def _ensure_log_group(aws: Aws, name: str) -> None:
    try:
        aws.logs.create_log_group(logGroupName=name, tags={"dagfactory": "logs"})
    except Exception as exc:
        if _error_code(exc) == "ResourceAlreadyExistsException":
            return
        raise
    aws.logs.put_retention_policy(logGroupName=name, retentionInDays=LOG_RETENTION_DAYS)


def _role_arn(aws: Aws, role: str) -> str:
    if role.startswith("arn:"):
        return role
    account = aws.sts.get_caller_identity()["Account"]
    return f"arn:aws:iam::{account}:role/{role}"


def _register(
    aws: Aws,
    spec: ClusterSpec,
    rid: str,
    role: str,
    image: str,
    execution_role: str,
    task_role: str | None,
    packages: list[str],
    tags: dict[str, str],
    cpu: int,
    memory: str,
    command: list[str],
) -> str:
    """One task definition of the run (family `<run id>-<role>`); returns its ARN."""
    mib = parse_size(memory) // 1024**2
    env = [{"name": "EXTRA_PIP_PACKAGES", "value": " ".join(packages)}] if packages else []
    extra = {"taskRoleArn": task_role} if task_role else {}
    registered = aws.ecs.register_task_definition(
        family=f"{rid}-{role}",
        networkMode="awsvpc",
        requiresCompatibilities=["FARGATE"],
        cpu=str(cpu * 1024),
        memory=str(mib),
        executionRoleArn=execution_role,
        containerDefinitions=[
            {
                "name": CONTAINER,
                "image": image,
                "essential": True,
                "command": command,
                "cpu": cpu * 1024,
                "memory": mib,
                "environment": env,
                "portMappings": [
                    {"containerPort": port, "protocol": "tcp"}
                    for port in (SCHEDULER_PORT, DASHBOARD_PORT)
                ]
                if role == "scheduler"
                else [],
                "logConfiguration": {
                    "logDriver": "awslogs",
                    "options": {
                        "awslogs-group": spec.log_group,
                        "awslogs-region": aws.region,
                        "awslogs-stream-prefix": rid,
                    },
                },
            }
        ],
        tags=[{"key": k, "value": v} for k, v in tags.items()],
        **extra,
    )
    return registered["taskDefinition"]["taskDefinitionArn"]


def _run_tasks(aws: Aws, count: int, **request: Any) -> list[str]:
    """Start `count` tasks (ECS starts at most 10 per call); all or ClusterError."""
    started: list[str] = []
    while len(started) < count:
        batch = min(RUN_TASK_BATCH, count - len(started))
        response = aws.ecs.run_task(count=batch, **request)
        started += [t["taskArn"] for t in response["tasks"]]
        if response.get("failures"):
            reasons = "; ".join(f.get("reason", "?") for f in response["failures"])
            raise ClusterError(f"ECS did not start every task: {reasons}")
    return started


def _list_tasks(aws: Aws, cluster: str, rid: str) -> list[str]:
    """Every task of the run that is not stopped yet (pending ones included)."""
    pages = aws.ecs.get_paginator("list_tasks").paginate(
        cluster=cluster, startedBy=rid, desiredStatus="RUNNING"
    )
    return [arn for page in pages for arn in page["taskArns"]]


def _describe(aws: Aws, cluster: str, tasks: list[str]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for start in range(0, len(tasks), 100):
        found += aws.ecs.describe_tasks(cluster=cluster, tasks=tasks[start : start + 100])["tasks"]
    return found


def _task_ip(task: dict[str, Any]) -> str:
    for attachment in task.get("attachments", []):
        for detail in attachment.get("details", []):
            if detail.get("name") == "privateIPv4Address":
                return detail["value"]
    return ""


def _stopped_message(task: dict[str, Any], log_group: str) -> str:
    containers = task.get("containers") or [{}]
    reason = containers[0].get("reason") or ""
    return (
        f"the Fargate task {task['taskArn'].rsplit('/', 1)[-1]} stopped: "
        f"{task.get('stoppedReason') or 'no reason given'}{f' ({reason})' if reason else ''}; "
        f"see CloudWatch Logs group {log_group}"
    )


def _wait_running(aws: Aws, cluster: str, task: str, log_group: str) -> str:
    """The task's private IP once it runs."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        [described] = _describe(aws, cluster, [task])
        if described.get("lastStatus") == "STOPPED":
            raise ClusterError(_stopped_message(described, log_group))
        ip = _task_ip(described)
        if described.get("lastStatus") == "RUNNING" and ip:
            return ip
        time.sleep(1)
    raise ClusterError(f"the scheduler's Fargate task did not run within {START_TIMEOUT:.0f}s")


async def _ask(address: str, message: dict[str, Any], args: dict[str, Any]) -> Any:
    from distributed.comm import connect

    comm = await connect(address, timeout=5, **args)
    try:
        await comm.write({**message, "reply": True})
        return await comm.read()
    finally:
        comm.abort()


def ask_scheduler(address: str, op: str, args: dict[str, Any]) -> Any:
    """One raw Dask request (`identity`, `versions`) over the run's TLS."""
    return asyncio.run(asyncio.wait_for(_ask(address, {"op": op}, args), 15))


def _wait_scheduler(
    aws: Aws,
    spec: ClusterSpec,
    task: str,
    address: str,
    args: dict[str, Any],
    context: ClusterContext,
) -> None:
    """Until the scheduler answers; then its versions must be the client's, before any worker
    is started (an image that is not a stock Dask one is checked here)."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            versions = ask_scheduler(address, "versions", args)["packages"]
            break
        except Exception:
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"the Dask scheduler at {address} did not answer within {START_TIMEOUT:.0f}s; "
                    f"see CloudWatch Logs group {spec.log_group}"
                ) from None
        [described] = _describe(aws, spec.ecs_cluster, [task])
        if described.get("lastStatus") == "STOPPED":
            raise ClusterError(_stopped_message(described, spec.log_group))
        time.sleep(1)
    if context.python:
        mine = _venv_versions(context.python)
        theirs = {
            "distributed": versions.get("distributed"),
            "python": ".".join(str(versions.get("python", "")).split(".")[:2]),
        }
        if theirs != mine:
            raise ClusterError(
                f"the scheduler runs distributed {theirs['distributed']} on Python "
                f"{theirs['python']}, the pipeline's virtualenv distributed "
                f"{mine['distributed']} on Python {mine['python']}: use an image with the "
                "virtualenv's versions"
            )


def _wait_workers(
    aws: Aws, spec: ClusterSpec, tasks: list[str], address: str, args: dict[str, Any]
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    joined = 0
    while time.monotonic() < deadline:
        try:
            joined = len(ask_scheduler(address, "identity", args).get("workers", {}))
        except Exception:
            joined = 0
        if joined >= spec.start_workers:
            return
        described = _describe(aws, spec.ecs_cluster, tasks)
        stopped = [t for t in described if t["lastStatus"] == "STOPPED"]
        if stopped:
            raise ClusterError(_stopped_message(stopped[0], spec.log_group))
        time.sleep(1)
    raise ClusterError(
        f"{joined} of {spec.start_workers} Fargate workers joined within {START_TIMEOUT:.0f}s; see "
        f"CloudWatch Logs group {spec.log_group}"
    )


def _deregister(aws: Aws, rid: str) -> list[str]:
    """Deregister the run's task definitions, then delete them (AWS keeps deregistered ones)."""
    done = []
    for role in ("scheduler", "worker"):
        family = f"{rid}-{role}"
        for status in ("ACTIVE", "INACTIVE"):
            arns = aws.ecs.list_task_definitions(familyPrefix=family, status=status)[
                "taskDefinitionArns"
            ]
            for arn in arns:
                if status == "ACTIVE":
                    aws.ecs.deregister_task_definition(taskDefinition=arn)
                    done.append(arn)
                try:
                    aws.ecs.delete_task_definitions(taskDefinitions=[arn])
                except Exception as exc:  # a policy without it: deregistered is enough
                    log.info("could not delete task definition %s (%s)", arn, _error_code(exc))
    return done


def _delete_groups(aws: Aws, cluster: str, rid: str, stopped: list[str]) -> list[str]:
    """Delete the run's own security group(s). AWS refuses while a stopped task's network
    interface still holds the group: wait for the tasks to be STOPPED, then retry a while."""
    groups = aws.ec2.describe_security_groups(
        Filters=[{"Name": "tag:dagfactory:run", "Values": [rid]}]
    )["SecurityGroups"]
    if not groups:
        return []
    deadline = time.monotonic() + 300
    while stopped and time.monotonic() < deadline:
        running = [t for t in _describe(aws, cluster, stopped) if t.get("lastStatus") != "STOPPED"]
        if not running:
            break
        time.sleep(2)
    deleted = []
    for group in groups:
        while True:
            try:
                aws.ec2.delete_security_group(GroupId=group["GroupId"])
                deleted.append(group["GroupId"])
                break
            except Exception as exc:
                code = _error_code(exc)
                if code == "InvalidGroup.NotFound":
                    break
                if code != "DependencyViolation" or time.monotonic() > deadline:
                    raise ClusterError(
                        f"could not delete security group {group['GroupId']} of run {rid}: {exc}"
                    ) from None
                time.sleep(5)
    return deleted
