"""Preloaded into the scheduler of a `local` cluster with `cluster.adaptive`
(`dask scheduler --preload`): the scheduler grows and shrinks its own workers.

Dask's adaptive scaling is driven by a client-side `Cluster` object (`cluster.adapt()`), which
asks its resource manager for workers. A `local` cluster has no such object: it is a set of
detached processes that outlive the task that started them, and every step connects with a bare
client. The scheduler is the one part that lives as long as the cluster, so it adapts itself,
with Dask's own policy (`AdaptiveCore`: the target from `Scheduler.adaptive_target`, the workers
to close from `Scheduler.workers_to_close`, Dask's wait count before scaling down) and a resource
manager of its own: `dask worker` processes it starts as its children, one worker each.

Those processes inherit the scheduler's environment, the cluster's marker included, so `down`
finds them like every other process of the cluster; they log to the cluster's folder and stop
after the death timeout when the scheduler is gone. local.py passes the configuration in
DAGFACTORY_ADAPTIVE (JSON). Runs inside the pipeline's virtualenv: standard library and
distributed only.
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

import dask.config
from dask.utils import parse_timedelta
from distributed.core import Status
from distributed.deploy.adaptive_core import AdaptiveCore
from tornado.ioloop import PeriodicCallback

CONFIG_VARIABLE = "DAGFACTORY_ADAPTIVE"
START_TIMEOUT = 120.0  # local.py gives the first workers as long to join
RETIRE_GRACE = 10.0  # a retired worker closes its nanny, and its process exits by itself
STOP_GRACE = 5.0

log = logging.getLogger("distributed.dagfactory.adaptive")


class ProcessAdaptive(AdaptiveCore):
    """Dask's adaptive policy over `dask worker` processes this scheduler starts and stops.

    Workers are known by name. `observed`: the workers in the scheduler (the first ones,
    started by local.py, included). `requested` and `plan`: those, and the processes started
    here that have not joined yet; starting a process is the request, so the two are the same.
    """

    def __init__(
        self,
        scheduler,
        minimum: int,
        maximum: int,
        start_workers: int,
        worker_command: list[str],
        log_dir: str,
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
        self.worker_command = worker_command
        self.log_dir = Path(log_dir)
        self.env = {k: v for k, v in os.environ.items() if k != CONFIG_VARIABLE}
        self.started: dict[str, subprocess.Popen] = {}
        self.ending: set[asyncio.Task] = set()
        self.numbers = itertools.count(1)
        self.start_deadline = time.monotonic() + START_TIMEOUT
        self.running = False
        self.closed = False

    @property
    def observed(self) -> set[str]:
        return {str(ws.name) for ws in self.scheduler.workers.values()}

    @property
    def requested(self) -> set[str]:
        return self.observed | set(self.started)

    @property
    def plan(self) -> set[str]:
        return self.requested

    async def target(self) -> int:
        return self.scheduler.adaptive_target()

    async def workers_to_close(self, target: int) -> list[str]:
        names = self.scheduler.workers_to_close(target=target, attribute="name")
        return [str(name) for name in names]

    async def scale_up(self, n: int) -> None:
        for _ in range(n - len(self.plan)):
            name = f"adaptive-{next(self.numbers)}"
            with open(self.log_dir / f"{name}.log", "ab") as out:
                self.started[name] = subprocess.Popen(
                    [*self.worker_command, "--name", name],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                )
            log.info("started worker %s (pid %d)", name, self.started[name].pid)

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
        for name in {joined[a] for a in retired if a in joined}:
            self._end(name, RETIRE_GRACE)
        for name in names - set(joined.values()):
            self._end(name, 0)

    def _end(self, name: str, grace: float) -> None:
        proc = self.started.pop(name, None)
        if proc is not None:
            task = asyncio.create_task(_until_ended(proc, grace))
            self.ending.add(task)
            task.add_done_callback(self.ending.discard)

    def _reap(self) -> None:
        """Forget (and reap) the started workers whose process exited on its own."""
        for name, proc in list(self.started.items()):
            if proc.poll() is not None:
                log.warning("worker %s exited with code %s", name, proc.returncode)
                del self.started[name]

    async def tick(self) -> None:
        """The periodic callback. Adapting starts once local.py's first workers have joined:
        before that the cluster would start workers of its own in their place."""
        if self.closed or self.scheduler.status != Status.running:
            return
        if not self.running:
            joined = len(self.scheduler.workers) >= self.start_workers
            if not joined and time.monotonic() < self.start_deadline:
                return
            self.running = True
            log.info("adaptive scaling between %d and %d workers", self.minimum, self.maximum)
        self._reap()
        try:
            await self.adapt()
        except Exception:
            log.warning("adaptive scaling failed this time", exc_info=True)

    async def close(self) -> None:
        """Stop every worker started here and wait for their processes (no zombie left).

        The scheduler runs this before it stops its periodic callbacks, and a tick may be
        half-way: the loop also catches a worker that tick starts or retires meanwhile."""
        self.closed = True
        while self.started or any(not task.done() for task in self.ending):
            for name in list(self.started):
                self._end(name, 0)
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


_adaptive: ProcessAdaptive | None = None


def dask_setup(scheduler) -> None:
    global _adaptive
    _adaptive = ProcessAdaptive(scheduler, **json.loads(os.environ[CONFIG_VARIABLE]))
    # The scheduler starts its periodic callbacks after the preloads, and stops them at close.
    scheduler.periodic_callbacks["dagfactory-adaptive"] = PeriodicCallback(
        _adaptive.tick, _adaptive.interval * 1000
    )


async def dask_teardown(scheduler) -> None:
    if _adaptive is not None:
        await _adaptive.close()
