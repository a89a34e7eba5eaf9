"""Preloaded into the scheduler of a cluster with `cluster.adaptive` (`dask scheduler
--preload`): the scheduler grows and shrinks its own workers.

Dask's adaptive scaling is driven by a client-side `Cluster` object (`cluster.adapt()`), which
asks its resource manager for workers. Our clusters have no such object: they outlive the task
that started them, and every step connects with a bare client. The scheduler is the one part
that lives as long as the cluster, so it adapts itself, with Dask's own policy (`AdaptiveCore`:
the target from `Scheduler.adaptive_target`, the workers to close from
`Scheduler.workers_to_close`, Dask's wait count before scaling down) and a resource manager of
its own, chosen by the configuration (JSON in DAGFACTORY_ADAPTIVE):

- `processes` (local.py): `dask worker` processes, children of the scheduler, one worker each.
  They inherit the scheduler's environment, the cluster's marker included, so `down` finds them
  like every other process of the cluster; they log to the cluster's folder.
- `ecs` (fargate.py): ECS tasks, started with the run's `run_task` arguments (the same as the
  first workers': startedBy = run id, so `down` finds them by key) and the scheduler's task
  role. The TLS settings they need are the scheduler's own: read from its environment, never
  from the configuration, which holds no secret.

Either way a worker that is retired is closed through the scheduler first (its data moves to
the others), then its process or task is stopped; and every worker stops after its death
timeout when the scheduler is gone. Runs inside the pipeline's virtualenv or the stock Dask
image, shipped as source text: standard library and distributed only, and boto3 for `ecs`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed.core import Status
from distributed.deploy.adaptive_core import AdaptiveCore
from tornado.ioloop import PeriodicCallback

CONFIG_VARIABLE = "DAGFACTORY_ADAPTIVE"
SCHEDULER_ADDRESS = "{scheduler_address}"  # in a worker command: this scheduler's address
START_TIMEOUT = 120.0  # local.py gives the first workers as long to join
RETIRE_GRACE = 10.0  # a retired worker closes its nanny, and its process exits by itself
STOP_GRACE = 5.0
LEFT_GRACE = 60.0  # a worker that left unasked may be a nanny restarting it: wait, then stop
CHECK_EVERY = 5.0  # how often ECS is asked about the tasks whose worker has not joined

log = logging.getLogger("distributed.dagfactory.adaptive")


class SchedulerAdaptive(AdaptiveCore):
    """Dask's adaptive policy over the workers this scheduler starts and stops.

    Workers are known by name. `observed`: the workers in the scheduler (the first ones,
    started by the backend, included). `requested` and `plan`: those, and the workers started
    here that have not joined (yet, or again); starting one is the request, so the two are the
    same.
    """

    def __init__(
        self,
        scheduler,
        minimum: int,
        maximum: int,
        start_workers: int,
        workers: ProcessWorkers | TaskWorkers,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        # Dask's defaults, as for cluster.adapt(): a check every second, and a worker retires
        # only after three checks in a row found it superfluous.
        super().__init__(
            minimum=minimum,
            maximum=maximum,
            wait_count=dask.config.get("distributed.adaptive.wait-count"),
        )
        self.interval = parse_timedelta(dask.config.get("distributed.adaptive.interval"))
        self.scheduler = scheduler
        self.start_workers = start_workers
        self.workers = workers
        self.numbers = itertools.count(1)
        self.start_deadline = time.monotonic() + start_timeout
        self.running = False
        self.closed = False

    @property
    def observed(self) -> set[str]:
        return {str(ws.name) for ws in self.scheduler.workers.values()}

    @property
    def requested(self) -> set[str]:
        return self.observed | set(self.workers.started)

    @property
    def plan(self) -> set[str]:
        return self.requested

    async def target(self) -> int:
        return self.scheduler.adaptive_target()

    async def workers_to_close(self, target: int) -> list[str]:
        names = self.scheduler.workers_to_close(target=target, attribute="name")
        return [str(name) for name in names]

    async def scale_up(self, n: int) -> None:
        names = [f"adaptive-{next(self.numbers)}" for _ in range(n - len(self.plan))]
        await self.workers.start(names, self.scheduler.address)

    async def scale_down(self, workers: list[str]) -> None:
        names = {str(w) for w in workers}
        joined = {
            ws.address: str(ws.name)
            for ws in self.scheduler.workers.values()
            if str(ws.name) in names
        }
        retired: dict = {}
        if joined:
            log.info("retiring workers %s", sorted(joined.values()))
            retired = await self.scheduler.retire_workers(
                names=list(joined.values()),
                close_workers=True,
                stimulus_id=f"adaptive-{time.time()}",
            )
        # A worker that could not hand its data over stays; one that never joined just stops.
        await self.workers.stop({joined[a]: a for a in retired if a in joined}, grace=RETIRE_GRACE)
        await self.workers.stop({name: "" for name in names - set(joined.values())}, grace=0)

    async def tick(self) -> None:
        """The periodic callback. Adapting starts once the backend's first workers have
        joined: before that the cluster would start workers of its own in their place."""
        if self.closed or self.scheduler.status != Status.running:
            return
        if not self.running:
            joined = len(self.scheduler.workers) >= self.start_workers
            if not joined and time.monotonic() < self.start_deadline:
                return
            self.running = True
            log.info("adaptive scaling between %d and %d workers", self.minimum, self.maximum)
        try:
            await self.workers.forget_ended(self.observed)
            await self.adapt()
        except Exception:
            log.warning("adaptive scaling failed this time", exc_info=True)

    async def close(self) -> None:
        self.closed = True
        await self.workers.close()


class ProcessWorkers:
    """`dask worker` processes, children of the scheduler, one worker each (local backend)."""

    def __init__(self, command: list[str], log_dir: str) -> None:
        self.command = command
        self.log_dir = Path(log_dir)
        self.env = {k: v for k, v in os.environ.items() if k != CONFIG_VARIABLE}
        self.started: dict[str, subprocess.Popen] = {}
        self.ending: set[asyncio.Task] = set()

    async def start(self, names: list[str], address: str) -> None:
        command = [address if word == SCHEDULER_ADDRESS else word for word in self.command]
        for name in names:
            with open(self.log_dir / f"{name}.log", "ab") as out:
                self.started[name] = subprocess.Popen(
                    [*command, "--name", name],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                )
            log.info("started worker %s (pid %d)", name, self.started[name].pid)

    async def stop(self, workers: dict[str, str], grace: float) -> None:
        """End the processes of these workers (name -> address); a retired one gets `grace`
        to exit by itself. The first workers are nannies of the backend's process: retiring
        them was all there was to do."""
        for name in workers:
            proc = self.started.pop(name, None)
            if proc is not None:
                task = asyncio.create_task(_until_ended(proc, grace))
                self.ending.add(task)
                task.add_done_callback(self.ending.discard)

    async def forget_ended(self, observed: set[str]) -> None:
        """Forget (and reap) the started workers whose process exited on its own."""
        for name, proc in list(self.started.items()):
            if proc.poll() is not None:
                log.warning("worker %s exited with code %s", name, proc.returncode)
                del self.started[name]

    async def close(self) -> None:
        """Stop every worker started here and wait for their processes (no zombie left).

        The scheduler runs this before it stops its periodic callbacks, and a tick may be
        half-way: the loop also catches a worker that tick starts or retires meanwhile."""
        while self.started or any(not task.done() for task in self.ending):
            await self.stop(dict.fromkeys(self.started, ""), grace=0)
            await asyncio.gather(*self.ending, return_exceptions=True)


async def _until_ended(proc: subprocess.Popen, grace: float) -> None:
    """Let the process exit by itself for `grace` seconds, then SIGTERM it, then SIGKILL it."""
    for sig, wait in ((None, grace), (signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, STOP_GRACE)):
        if sig is not None:
            log.info("sending signal %s to worker process %d", sig.name, proc.pid)
            proc.send_signal(sig)
        deadline = time.monotonic() + wait
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if proc.returncode is not None:
            return


class TaskWorkers:
    """ECS tasks, one worker each (fargate backend), started and stopped with boto3 under the
    scheduler's task role. boto3 blocks: its calls run in threads, never in the event loop.

    `run_task`: the backend's arguments for its first workers (cluster, task definition,
    network, capacity, startedBy, tags). `environment`: names of the scheduler's own variables
    the workers get too (the TLS settings). A task is known by its worker's name, which its
    command carries; the backend's first workers, which have none, by their address.
    """

    def __init__(
        self,
        region: str,
        run_task: dict[str, Any],
        container: str,
        command: list[str],
        environment: list[str],
        start_timeout: float,
    ) -> None:
        self.region = region
        self.request = run_task
        self.container = container
        self.command = command
        self.environment = environment
        self.start_timeout = start_timeout
        self.started: dict[str, str] = {}  # worker name -> task ARN
        self.waiting: dict[str, float] = {}  # not in the scheduler (yet, or again) -> since
        self.joined: set[str] = set()
        self.checked = 0.0
        self.lock = asyncio.Lock()  # a start under way finishes before close stops all
        self._ecs = None

    @property
    def ecs(self):
        if self._ecs is None:
            import boto3
            from botocore.config import Config

            # Short timeouts: these calls also run while the scheduler closes.
            config = Config(connect_timeout=5, read_timeout=20, retries={"max_attempts": 3})
            self._ecs = boto3.client("ecs", region_name=self.region, config=config)
        return self._ecs

    async def start(self, names: list[str], address: str) -> None:
        async with self.lock:
            for name in names:
                arn = await asyncio.to_thread(self._run_task, name, address)
                if arn:
                    self.started[name] = arn
                    self.waiting[name] = time.monotonic()
                    log.info("started worker %s (task %s)", name, arn)

    def _run_task(self, name: str, address: str) -> str:
        command = [address if word == SCHEDULER_ADDRESS else word for word in self.command]
        environment = [
            {"name": variable, "value": os.environ[variable]}
            for variable in self.environment
            if variable in os.environ
        ]
        override = {
            "name": self.container,
            "command": [*command, "--name", name],
            "environment": environment,
        }
        response = self.ecs.run_task(
            count=1, overrides={"containerOverrides": [override]}, **self.request
        )
        if response.get("failures") or not response.get("tasks"):
            reasons = "; ".join(f.get("reason", "?") for f in response.get("failures", []))
            log.warning("ECS did not start worker %s: %s", name, reasons or "no task")
            return ""
        return response["tasks"][0]["taskArn"]

    async def stop(self, workers: dict[str, str], grace: float) -> None:
        """Stop the tasks of these workers (name -> address; retired ones have closed already,
        so `grace` is not needed): a task whose worker closed would stop by itself when its
        container exits, but a hung one would run, and cost, until its death timeout."""
        tasks = {name: self.started.pop(name, "") for name in workers}
        for name in workers:
            self.waiting.pop(name, None)
            self.joined.discard(name)
        unknown = {workers[name] for name, arn in tasks.items() if not arn and workers[name]}
        if unknown:  # the backend's first workers: found by their address
            by_ip = await asyncio.to_thread(self._tasks_by_ip)
            for name, arn in tasks.items():
                if not arn:
                    tasks[name] = by_ip.get(_host(workers[name]), "")
        arns = sorted({arn for arn in tasks.values() if arn})
        if arns:
            log.info("stopping worker task(s) %s", ", ".join(arns))
            await asyncio.to_thread(self._stop_tasks, arns)

    def _tasks_by_ip(self) -> dict[str, str]:
        cluster, started_by = self.request["cluster"], self.request["startedBy"]
        listed = self.ecs.list_tasks(cluster=cluster, startedBy=started_by, desiredStatus="RUNNING")
        arns = listed["taskArns"]
        found = {}
        for start in range(0, len(arns), 100):
            described = self.ecs.describe_tasks(cluster=cluster, tasks=arns[start : start + 100])
            for task in described["tasks"]:
                for attachment in task.get("attachments", []):
                    for detail in attachment.get("details", []):
                        if detail.get("name") == "privateIPv4Address":
                            found[detail["value"]] = task["taskArn"]
        return found

    def _stop_tasks(self, arns: list[str]) -> None:
        for arn in arns:
            try:
                self.ecs.stop_task(
                    cluster=self.request["cluster"], task=arn, reason="dagfactory adaptive"
                )
            except Exception as exc:  # stopped already, or ECS busy: the death timeout ends it
                log.warning("could not stop task %s: %s", arn, exc)

    async def forget_ended(self, observed: set[str]) -> None:
        """Forget the tasks that stopped before their worker joined, and stop those whose
        worker never joined or left and did not come back in time."""
        now = time.monotonic()
        for name in self.started:
            if name in observed:
                self.joined.add(name)
                self.waiting.pop(name, None)
            else:
                self.waiting.setdefault(name, now)
        late = {
            name: ""
            for name, since in self.waiting.items()
            if now - since > (LEFT_GRACE if name in self.joined else self.start_timeout)
        }
        if late:
            log.warning("workers %s did not join (again) in time", sorted(late))
            await self.stop(late, grace=0)
        if self.waiting and now - self.checked > CHECK_EVERY:
            self.checked = now
            waiting = {self.started[name]: name for name in self.waiting}
            described = await asyncio.to_thread(
                self.ecs.describe_tasks, cluster=self.request["cluster"], tasks=list(waiting)
            )
            for task in described["tasks"]:
                if task.get("lastStatus") == "STOPPED":
                    name = waiting[task["taskArn"]]
                    log.warning(
                        "the task of worker %s stopped: %s", name, task.get("stoppedReason")
                    )
                    self.started.pop(name, None)
                    self.waiting.pop(name, None)
                    self.joined.discard(name)

    async def close(self) -> None:
        """Stop every task started here; what a close cannot reach stops after its death
        timeout, and `down` finds it by the run id in any case."""
        async with self.lock:
            if self.started:
                await self.stop(dict.fromkeys(self.started, ""), grace=0)


def _host(address: str) -> str:
    return address.rsplit("://", 1)[-1].rsplit(":", 1)[0]


def adaptive_from_config(scheduler, config: dict[str, Any]) -> SchedulerAdaptive:
    """The adaptive object the configuration describes (see the module docstring)."""
    start_timeout = float(config.get("start_timeout", START_TIMEOUT))
    if "ecs" in config:
        workers: ProcessWorkers | TaskWorkers = TaskWorkers(
            start_timeout=start_timeout, **config["ecs"]
        )
    else:
        workers = ProcessWorkers(**config["processes"])
    return SchedulerAdaptive(
        scheduler,
        minimum=config["minimum"],
        maximum=config["maximum"],
        start_workers=config["start_workers"],
        workers=workers,
        start_timeout=start_timeout,
    )


_adaptive: SchedulerAdaptive | None = None


def dask_setup(scheduler) -> None:
    global _adaptive
    _adaptive = adaptive_from_config(scheduler, json.loads(os.environ[CONFIG_VARIABLE]))
    # The scheduler starts its periodic callbacks after the preloads, and stops them at close.
    scheduler.periodic_callbacks["dagfactory-adaptive"] = PeriodicCallback(
        _adaptive.tick, _adaptive.interval * 1000
    )


async def dask_teardown(scheduler) -> None:
    if _adaptive is not None:
        await _adaptive.close()
