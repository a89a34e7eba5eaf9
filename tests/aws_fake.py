"""A small AWS on loopback for the fargate backend's tests: moto's server, plus a container agent
that really runs each Fargate task's command as a local process, so that a real Dask scheduler and
real workers answer on the addresses ECS reports.

Every task gets its own loopback address (moto's ``random_private_ip`` is replaced in the server's
process), which Linux answers on ``lo`` with no set-up: each task is a distinct "host" and no
traffic leaves the machine. Each fake AWS takes its addresses from its own ``127.X.Y.0/24``
(X from the test process id, Y counting the fake AWSes it started), so that test sessions running
side by side on one machine do not bind the same address and port.

What moto 5.2.5 does in server mode, checked with boto3 1.44.5 (the fargate backend relies on it):

- Supported: ``sts.get_caller_identity``; ``ecs.create_cluster`` with ``capacityProviders``;
  ``run_task`` with ``capacityProviderStrategy`` (FARGATE_SPOT: ``capacityProviderName`` is set,
  ``launchType`` is empty), ``tags``, ``startedBy``, ``overrides`` (returned as given by
  ``describe_tasks``); ``list_tasks(startedBy=...)``; ``deregister_task_definition``;
  ``delete_task_definitions`` (an ACTIVE one comes back in ``failures``, as on AWS);
  ``list_task_definitions(familyPrefix=..., status=...)`` (an exact family, as on AWS);
  ``ec2.create_security_group`` with ``TagSpecifications``; ``authorize_security_group_ingress``
  with ``UserIdGroupPairs`` (the group itself) and with CIDR ranges;
  ``describe_security_groups`` with a ``tag:`` filter; ``logs.create_log_group``,
  ``put_retention_policy``, ``delete_log_group``.
- ``propagateTags`` is accepted and ignored: pass the task's tags to ``run_task`` itself.
- moto's default for ``ecs::task`` advances ``lastStatus`` one step per ``describe_tasks``
  (RUNNING, DEACTIVATING, ... STOPPED). The server here holds tasks at RUNNING until
  ``stop_task``, after which ``describe_tasks`` shows ``lastStatus`` and ``desiredStatus``
  STOPPED and the ``stoppedReason`` at once, but no ``stoppedAt`` and no ``stopCode``.
- ``delete_cluster`` succeeds while tasks run (AWS refuses); the cluster stays listed, INACTIVE.
- ``run_task`` takes overrides of any size; the server here refuses more than 8192 characters of
  them (their JSON), with AWS's message, because AWS does.

The agent runs a container's ``entryPoint`` + ``command`` (the run's container override replaces
the command; override environment wins over the definition's) with the virtualenv mapped to its
image first on PATH, in its own session, in a fresh environment: the task's variables plus
``DAGFACTORY_FAKE_TASK`` (the task ARN), ``DAGFACTORY_FAKE_AWS`` (this fake AWS) and
``DAGFACTORY_FAKE_TASK_IP`` (for test commands that must bind their address; real Fargate has no
such variable), and ``SPT_NOENV=1`` (Dask's process titles would blank /proc/PID/environ, markers
included). A task reaches this fake AWS as a real one reaches AWS: ``AWS_ENDPOINT_URL`` points
its SDK here (the network edge; a real task resolves AWS's endpoints), ``AWS_REGION`` and
``AWS_DEFAULT_REGION`` are set as Fargate sets them, and a task whose definition has a
``taskRoleArn`` gets that role's credentials the way Fargate gives them, from a credentials
endpoint (``AWS_CONTAINER_CREDENTIALS_FULL_URI``, here on 127.0.0.1), never in its environment;
a task without a role gets none (and no instance metadata service to fall back to).
``dask scheduler`` and ``dask worker`` get ``--host <task ip>`` and a dashboard on that address
appended, because the product cannot know the task's address when it writes the command.
Nothing from ``EXTRA_PIP_PACKAGES`` is installed: the mapped virtualenv has it already.
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import ipaddress
import itertools
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REGION = "eu-west-2"
TASK_MARKER = "DAGFACTORY_FAKE_TASK"
AWS_MARKER = "DAGFACTORY_FAKE_AWS"
TASK_IP_VARIABLE = "DAGFACTORY_FAKE_TASK_IP"
EXITED_REASON = "Essential container in task exited"
REFUSALS = "refused-task-definitions.txt"
POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 3.0
# The dashboard ports the stock image uses; the scheduler's and a worker's are two ports of one
# task address, so they never meet.
DASK_DASHBOARD_PORTS = {"scheduler": 8787, "worker": 8789}
_DASK_PROGRAMS = {
    ("dask", "scheduler"): "scheduler",
    ("dask", "worker"): "worker",
    ("-m", "distributed.cli.dask_scheduler"): "scheduler",
    ("-m", "distributed.cli.dask_worker"): "worker",
}
# From a random start, so that two test processes whose ids share X still differ in Y.
_servers_started = itertools.count(random.randrange(256))


# --- the server's own process ---------------------------------------------------------------


def loopback_addresses(first: str) -> Callable[[], str]:
    """An allocator of task addresses from ``first`` to the end of its /24, never one twice.

    Thread safe, because moto's server answers run_task calls on several threads at once.
    """
    start = ipaddress.IPv4Address(first)
    network = ipaddress.IPv4Network(f"{start}/24", strict=False)
    counter = itertools.count(int(start))
    lock = threading.Lock()

    def allocate(*_args: object, **_kwargs: object) -> str:
        with lock:
            address = ipaddress.IPv4Address(next(counter))
        if address not in network or address == network.broadcast_address:
            raise RuntimeError(f"the fake AWS has no task address left in {network}")
        return str(address)

    return allocate


def serve(first_address: str, region: str, refusals: str) -> None:
    """Run moto's server on a free port of 127.0.0.1 until stdin closes (the harness exits or
    dies), with tasks on loopback addresses that stay RUNNING until someone stops them."""
    import logging

    import moto.ecs.models
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends
    from moto.moto_api import state_manager
    from moto.server import ThreadedMotoServer

    moto.ecs.models.random_private_ip = loopback_addresses(first_address)
    _refuse_task_definitions(Path(refusals))
    _limit_overrides()
    state_manager.set_transition("ecs::task", {"progression": "manual", "times": 10**9})
    # Made here, while the harness imports boto3, instead of on the first request.
    for backends in (ec2_backends, moto.ecs.models.ecs_backends):
        backends[DEFAULT_ACCOUNT_ID][region]
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    print(server.get_host_and_port()[1], flush=True)
    sys.stdin.read()
    # Nothing to save: skip the server's orderly shutdown and the interpreter's.
    os._exit(0)


def _refuse_task_definitions(refusals: Path) -> None:
    """Make ECS refuse to register a task definition whose family matches a pattern written
    in `refusals` (one regular expression per line): how AWS answers a definition it will
    not take (a bad size, a role it may not pass), for tests of a start that fails half-way."""
    import re

    from moto.ecs.exceptions import EcsClientException
    from moto.ecs.models import EC2ContainerServiceBackend

    register = EC2ContainerServiceBackend.register_task_definition

    def refusing(self, family, *args, **kwargs):
        patterns = refusals.read_text().split() if refusals.exists() else []
        if any(re.search(pattern, family) for pattern in patterns):
            raise EcsClientException(f"the fake AWS refuses task definition family {family}")
        return register(self, family, *args, **kwargs)

    EC2ContainerServiceBackend.register_task_definition = refusing


OVERRIDES_LIMIT = 8192


def _limit_overrides() -> None:
    """Make ECS refuse run_task overrides longer than AWS takes (8192 characters of JSON)."""
    from moto.ecs.exceptions import InvalidParameterException
    from moto.ecs.models import EC2ContainerServiceBackend

    run_task = EC2ContainerServiceBackend.run_task

    def limited(self, cluster_str, task_definition_str, count, overrides, *args, **kwargs):
        if len(json.dumps(overrides or {}, separators=(",", ":"))) > OVERRIDES_LIMIT:
            raise InvalidParameterException(
                f"Container Overrides length must be at most {OVERRIDES_LIMIT}"
            )
        return run_task(self, cluster_str, task_definition_str, count, overrides, *args, **kwargs)

    EC2ContainerServiceBackend.run_task = limited


# --- the task roles' credentials ------------------------------------------------------------


class RoleCredentials:
    """The credentials endpoint of the tasks that have a task role: what Fargate serves on
    169.254.170.2, here on 127.0.0.1 (boto3 takes a loopback ``FULL_URI``). Keys are made up
    (moto takes any); the test sees which roles were asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        credentials = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                role = self.path.rsplit("/", 1)[-1]
                credentials.asked.append(role)
                body = json.dumps(
                    {
                        "AccessKeyId": "ASIAFAKETASKROLE",
                        "SecretAccessKey": f"fake-secret-of-{role}",
                        "Token": f"fake-token-of-{role}",
                        "Expiration": time.strftime(
                            "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 6 * 3600)
                        ),
                        "RoleArn": role,
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fake-task-role-credentials", daemon=True
        )

    def url(self, role_arn: str) -> str:
        return f"http://127.0.0.1:{self._server.server_port}/roles/{role_arn.rsplit('/', 1)[-1]}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --- what the agent ran ---------------------------------------------------------------------


@dataclass
class FakeContainer:
    """One container of a task as the agent ran it: the command and environment it got."""

    name: str
    image: str
    essential: bool
    command: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen | None = None
    exit_code: int | None = None


@dataclass
class FakeTask:
    """One ECS task the agent saw. ``stop_reason`` is moto's ``stoppedReason`` when someone
    called stop_task, or the agent's own (the container exited, the image had no virtualenv)."""

    arn: str
    cluster: str
    ip: str
    started_by: str
    containers: list[FakeContainer] = field(default_factory=list)
    started_at: float = field(default_factory=time.time)
    stopped_at: float | None = None
    stop_reason: str | None = None

    @property
    def container(self) -> FakeContainer:
        """The task's only container (the product's tasks have one)."""
        (only,) = self.containers
        return only

    @property
    def command(self) -> list[str]:
        return self.container.command

    @property
    def env(self) -> dict[str, str]:
        return self.container.env

    @property
    def image(self) -> str:
        return self.container.image

    @property
    def extra_pip_packages(self) -> str | None:
        """What the stock image's entrypoint would have installed (the agent installs nothing)."""
        return self.container.env.get("EXTRA_PIP_PACKAGES")

    @property
    def running(self) -> bool:
        return self.stopped_at is None

    def logs(self) -> str:
        parts = []
        for container in self.containers:
            text = container.log.read_text(errors="replace") if container.log.exists() else ""
            parts.append(f"--- {self.arn} {container.name} ({self.ip}) ---\n{text}")
        return "\n".join(parts)


# --- the container agent --------------------------------------------------------------------


def bind_to_task_address(argv: list[str], ip: str) -> list[str]:
    """Append the options that keep a Dask process on its task's address; click takes the last
    value of an option, so whatever the product passed is overridden."""
    for first, second in itertools.pairwise(argv):
        program = _DASK_PROGRAMS.get((os.path.basename(first), second))
        if program:
            port = DASK_DASHBOARD_PORTS[program]
            return [*argv, "--host", ip, "--dashboard-address", f"{ip}:{port}"]
    for word in argv:
        name = os.path.basename(word)
        if name in ("dask-scheduler", "dask-worker"):
            port = DASK_DASHBOARD_PORTS[name.removeprefix("dask-")]
            return [*argv, "--host", ip, "--dashboard-address", f"{ip}:{port}"]
    return argv


def marked_processes(aws_marker: str, task_arn: str | None = None) -> list:
    """Live processes of one fake AWS (of one of its tasks), found by the markers in their
    environment; the agent sets SPT_NOENV so that setproctitle (Dask's process titles) leaves
    the environment readable."""
    found = []
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
            if (
                env.get(AWS_MARKER) == aws_marker
                and task_arn in (None, env.get(TASK_MARKER))
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


class ContainerAgent:
    """What the ECS agent does on a Fargate host, for every task of one moto server: start the
    containers of new tasks, kill the ones someone stopped, report the ones that exited."""

    def __init__(
        self,
        client_factory: Callable[[str], object],
        images: Mapping[str, Path],
        workdir: Path,
        aws_env: Mapping[str, str] | None = None,
        role_credentials: RoleCredentials | None = None,
    ):
        self._client_factory = client_factory
        self._images = dict(images)
        self._workdir = workdir
        self._aws_env = dict(aws_env or {})
        self._role_credentials = role_credentials
        self._tasks: dict[str, FakeTask] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-ecs-agent", daemon=True)
        self._definitions: dict[str, dict] = {}
        self._dying: dict[str, float] = {}  # task ARN -> when what is left gets SIGKILL
        self.errors: list[str] = []

    @property
    def tasks(self) -> list[FakeTask]:
        with self._lock:
            return list(self._tasks.values())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        ecs = self._client_factory("ecs")
        while not self._stopping.is_set():
            try:
                self._poll(ecs)
            except Exception as exc:  # keep running: a test reads the errors at exit
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stopping.wait(POLL_SECONDS)

    def _poll(self, ecs) -> None:
        running: set[str] = set()
        for cluster in self._paginate(ecs, "list_clusters", "clusterArns"):
            arns = self._paginate(
                ecs, "list_tasks", "taskArns", cluster=cluster, desiredStatus="RUNNING"
            )
            running.update(arns)
            new = [arn for arn in arns if arn not in self._tasks]
            for chunk in range(0, len(new), 100):
                described = ecs.describe_tasks(cluster=cluster, tasks=new[chunk : chunk + 100])
                for task in described["tasks"]:
                    self._start(ecs, task)
        for task in self.tasks:
            if not task.running:
                continue
            if task.arn not in running:
                described = ecs.describe_tasks(cluster=task.cluster, tasks=[task.arn])["tasks"]
                self._stop(task, described[0].get("stoppedReason", "") if described else "")
            elif any(c.essential and c.process.poll() is not None for c in task.containers):
                self._stop(task, EXITED_REASON)
                ecs.stop_task(cluster=task.cluster, task=task.arn, reason=EXITED_REASON)
        self._reap()

    @staticmethod
    def _paginate(client, operation: str, key: str, **kwargs) -> list[str]:
        found: list[str] = []
        for page in client.get_paginator(operation).paginate(**kwargs):
            found.extend(page[key])
        return found

    def _definition(self, ecs, arn: str) -> dict:
        if arn not in self._definitions:
            described = ecs.describe_task_definition(taskDefinition=arn)
            self._definitions[arn] = described["taskDefinition"]
        return self._definitions[arn]

    def _start(self, ecs, described: dict) -> None:
        arn = described["taskArn"]
        details = {
            detail["name"]: detail["value"]
            for attachment in described.get("attachments", [])
            for detail in attachment.get("details", [])
        }
        task = FakeTask(
            arn=arn,
            cluster=described["clusterArn"],
            ip=details.get("privateIPv4Address", ""),
            started_by=described.get("startedBy", ""),
        )
        with self._lock:
            self._tasks[arn] = task
        task_dir = self._workdir / "tasks" / arn.rsplit("/", 1)[-1]
        (task_dir / "tmp").mkdir(parents=True)
        overrides = {
            o["name"]: o for o in described.get("overrides", {}).get("containerOverrides", [])
        }
        problem = "" if task.ip else "the fake AWS runs only awsvpc tasks (no privateIPv4Address)"
        definition = self._definition(ecs, described["taskDefinitionArn"])
        aws_env = dict(self._aws_env)
        if definition.get("taskRoleArn") and self._role_credentials:
            credentials = self._role_credentials.url(definition["taskRoleArn"])
            aws_env["AWS_CONTAINER_CREDENTIALS_FULL_URI"] = credentials
        for spec in definition["containerDefinitions"] if not problem else []:
            override = overrides.get(spec["name"], {})
            venv = self._images.get(spec["image"], self._images.get("*"))
            if venv is None:
                problem = (
                    f"CannotPullContainerError: the fake AWS maps no virtualenv to image "
                    f"{spec['image']!r}"
                )
                break
            argv = spec.get("entryPoint", []) + override.get("command", spec.get("command", []))
            variables = {
                item["name"]: item["value"]
                for item in spec.get("environment", []) + override.get("environment", [])
            }
            container = FakeContainer(
                name=spec["name"],
                image=spec["image"],
                essential=spec.get("essential", True),
                command=bind_to_task_address(argv, task.ip),
                env={
                    "PATH": f"{Path(venv) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                    "HOME": str(task_dir),
                    "TMPDIR": str(task_dir / "tmp"),
                    "LANG": "C.UTF-8",
                    "SPT_NOENV": "1",
                    **variables,
                    **aws_env,
                    TASK_MARKER: arn,
                    AWS_MARKER: str(self._workdir),
                    TASK_IP_VARIABLE: task.ip,
                },
                log=task_dir / f"{spec['name']}.log",
            )
            task.containers.append(container)
            try:
                with container.log.open("ab") as log:
                    container.process = subprocess.Popen(
                        container.command,
                        cwd=task_dir,
                        env=container.env,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
            except OSError as exc:
                task.containers.pop()
                problem = f"CannotStartContainerError: {container.command}: {exc}"
                break
        if problem or not task.containers:
            self._stop(task, problem or "the task definition has no container")
            ecs.stop_task(cluster=task.cluster, task=arn, reason=task.stop_reason)

    def _stop(self, task: FakeTask, reason: str) -> None:
        """SIGTERM every process of the task now, SIGKILL what is left after the grace."""
        task.stopped_at = time.time()
        task.stop_reason = reason
        self._signal(task, signal.SIGTERM)
        self._dying[task.arn] = time.monotonic() + STOP_GRACE_SECONDS

    def _signal(self, task: FakeTask, sig: signal.Signals) -> None:
        """Signal every process of a task: its containers' process groups while their leaders
        are unreaped (so the group id cannot have been reused), then anything else that carries
        the task's marker (what outlived its leader, or left the group)."""
        signalled = set()
        for container in task.containers:
            if container.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(container.process.pid, sig)
                    signalled.add(container.process.pid)
            container.exit_code = container.process.returncode
        for proc in marked_processes(str(self._workdir), task.arn):
            with contextlib.suppress(psutil.Error, OSError):  # also when it is gone by now
                if os.getpgid(proc.pid) not in signalled:
                    proc.send_signal(sig)

    def _reap(self) -> None:
        for task in self.tasks:
            for container in task.containers:
                container.exit_code = container.process.poll()
        now = time.monotonic()
        for arn, deadline in list(self._dying.items()):
            if now >= deadline:
                self._signal(self._tasks[arn], signal.SIGKILL)
                del self._dying[arn]

    def kill_all(self) -> list[FakeTask]:
        """Stop every task still running (the agent's thread must have stopped); the tasks that
        were still running, for a test that expects none."""
        left = [task for task in self.tasks if task.running]
        for task in left:
            self._stop(task, "the fake AWS shut down")
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline and any(
            c.process.poll() is None for t in self.tasks for c in t.containers
        ):
            time.sleep(0.05)
        for arn in list(self._dying):
            self._signal(self._tasks[arn], signal.SIGKILL)
        self._dying.clear()
        for task in self.tasks:
            for container in task.containers:
                container.exit_code = container.process.wait(timeout=10)
        return left


# --- the fake AWS ---------------------------------------------------------------------------


class FakeAWS:
    """A running fake AWS: its endpoint, clients for it, and what its container agent ran."""

    def __init__(self, port: int, region: str, images: Mapping[str, str | Path], workdir: Path):
        self.endpoint = f"http://127.0.0.1:{port}"
        self.region = region
        self.workdir = workdir
        self._clients: dict[str, object] = {}
        self._clients_lock = threading.Lock()
        self._session = None
        venvs = {image: Path(venv) for image, venv in images.items()}
        self.role_credentials = RoleCredentials()
        task_env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": region,
            "AWS_DEFAULT_REGION": region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.agent = ContainerAgent(self.client, venvs, workdir, task_env, self.role_credentials)

    @property
    def env(self) -> dict[str, str]:
        """The variables that point boto3 (in this process or a subprocess) at the fake AWS."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, service: str):
        """A boto3 client for the fake AWS that does not depend on this process's environment;
        one per service, because making one takes a good part of a second."""
        import boto3

        with self._clients_lock:
            if self._session is None:
                self._session = boto3.session.Session()
            if service not in self._clients:
                self._clients[service] = self._session.client(
                    service,
                    endpoint_url=self.endpoint,
                    region_name=self.region,
                    aws_access_key_id="testing",
                    aws_secret_access_key="testing",
                )
            return self._clients[service]

    @property
    def tasks(self) -> list[FakeTask]:
        return self.agent.tasks

    def task(self, arn: str, timeout: float = 15.0) -> FakeTask:
        """The task once the agent has started it (it looks every POLL_SECONDS)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for task in self.tasks:
                if task.arn == arn:
                    return task
            time.sleep(0.05)
        raise AssertionError(f"the fake ECS agent did not start {arn} in {timeout} s")

    def live_processes(self) -> list:
        """Every live process of every task of this fake AWS, found by its marker (so also a
        process that left its task's process group)."""
        return marked_processes(str(self.workdir))

    def refuse_task_definitions(self, family_pattern: str) -> None:
        """From now on ECS refuses to register a task definition whose family matches."""
        with (self.workdir / REFUSALS).open("a") as refusals:
            refusals.write(family_pattern + "\n")

    def logs(self) -> str:
        """Every task's output, for a test to print when it fails."""
        return "\n".join(task.logs() for task in self.tasks)


def _start_server(first_address: str, region: str, workdir: Path) -> subprocess.Popen:
    program = [sys.executable, str(Path(__file__).resolve()), "serve", first_address, region]
    with (workdir / "moto.log").open("ab") as err:
        return subprocess.Popen(
            [*program, str(workdir / REFUSALS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )


def _server_port(server: subprocess.Popen, log: Path) -> int:
    ready, _, _ = select.select([server.stdout], [], [], 60)
    line = server.stdout.readline() if ready else b""
    if not line.strip().isdigit():
        raise RuntimeError(f"moto's server did not start:\n{log.read_text(errors='replace')}")
    return int(line)


def _stop_server(server: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        server.stdin.close()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _first_address() -> str:
    """The first task address of a new fake AWS: a /24 of its own (see the module docstring)."""
    return f"127.{1 + os.getpid() % 254}.{next(_servers_started) % 256}.2"


@contextlib.contextmanager
def fake_aws(
    images: Mapping[str, str | Path],
    region: str = REGION,
    workdir: Path | None = None,
    require_stopped: bool = False,
) -> Iterator[FakeAWS]:
    """Start moto's server and the container agent; on exit kill every process of every task
    and stop the server.

    ``images`` maps a container image to the virtualenv that stands for it (``"*"``: any other
    image). With ``require_stopped`` the exit fails when a task was still running, i.e. the code
    under test did not stop what it started. Task logs are printed when the body fails.
    """
    own_dir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="fake-aws-")) if own_dir else Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    server = _start_server(_first_address(), region, root)
    started = False
    failed = True
    try:
        import boto3  # noqa: F401  (while the server starts)

        aws = FakeAWS(_server_port(server, root / "moto.log"), region, images, root)
        agent = aws.agent
        ec2 = aws.client("ec2")
        default_vpc = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])
        for vpc in default_vpc["Vpcs"]:
            ec2.modify_vpc_attribute(VpcId=vpc["VpcId"], EnableDnsHostnames={"Value": True})
        aws.role_credentials.start()
        agent.start()
        started = True
        yield aws
        failed = False
    finally:
        problems = []
        if started:
            agent.stop()
            aws.role_credentials.stop()
            left = agent.kill_all()
            if failed:
                print(aws.logs(), file=sys.stderr)
            elif require_stopped and left:
                problems.append(
                    "tasks still running when the fake AWS shut down (killed): "
                    + ", ".join(f"{task.arn} {task.command}" for task in left)
                )
            strays = aws.live_processes()
            for proc in strays:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            if strays:
                problems.append(f"processes of tasks outlived SIGKILL (killed again): {strays}")
            if agent.errors:
                problems.append("the fake ECS agent failed: " + "; ".join(agent.errors[:5]))
        _stop_server(server)
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
        if problems and not failed:
            raise AssertionError("\n".join(problems))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_command = commands.add_parser("serve", help="run moto's server (stdin closed: stop)")
    serve_command.add_argument("first_address", help="the first task address, e.g. 127.1.0.2")
    serve_command.add_argument("region", help="the region whose backends to make at once")
    serve_command.add_argument("refusals", help="a file of task definition families to refuse")
    arguments = parser.parse_args(argv)
    serve(arguments.first_address, arguments.region, arguments.refusals)


if __name__ == "__main__":
    main()
