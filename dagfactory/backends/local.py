"""`local`: a Dask scheduler and workers as processes on this host (the embedded default).

The processes run from the pipeline's virtualenv, in their own session so that they outlive the
`cluster_up` task that started them. Every one of them carries the run's key in its environment,
which is how `down` finds them all (nanny-spawned workers and orphans included) from any process
on this host, with or without the handle. The scheduler stops itself after `idle_timeout` with no
work and the workers follow it after `death_timeout`, so even a lost teardown cannot leave a
cluster running for long.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import psutil

from dagfactory.backends import (
    ClusterContext,
    ClusterHandle,
    scheduler_identity,
    shut_down_scheduler,
)
from dagfactory.errors import ClusterError
from dagfactory.run.workspace import dagfactory_home
from dagfactory.spec.pipeline import ClusterSpec, parse_duration, parse_size

log = logging.getLogger(__name__)

PRELOAD = Path(__file__).with_name("worker_preload.py")
HEALTH_VARIABLE = "DAGFACTORY_SCHEDULER_HEALTH"  # read by worker_preload.py
ADAPTIVE_PRELOAD = Path(__file__).with_name("adaptive.py")
ADAPTIVE_VARIABLE = "DAGFACTORY_ADAPTIVE"  # read by adaptive.py

KEY_VARIABLE = "DAGFACTORY_CLUSTER_KEY"
START_TIMEOUT = 120.0
DEATH_TIMEOUT = 30
STOP_GRACE = 0.3
STOP_ROUNDS = 5


def cluster_dir(key: str) -> Path:
    return dagfactory_home() / "clusters" / re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def processes_of(key: str) -> list[psutil.Process]:
    """Every live process on this host started for the cluster with this key.

    The marker is the cluster's state folder, not the bare key: two dagfactory homes on one
    host (two Airflow deployments, two test sessions) may well reuse a DAG id and run id.
    """
    marker = str(cluster_dir(key))
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(KEY_VARIABLE) == marker:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _ended(proc: psutil.Process) -> bool:
    """Gone, or a zombie: it runs no more code, whenever its parent gets round to reaping it."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_ended(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    alive = procs
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if not _ended(p)]
    for proc in procs:  # reap our own children, if any, so they leave no zombie behind
        with contextlib.suppress(psutil.Error, ChildProcessError):
            proc.wait(timeout=0)
    return alive


def _stop(key: str) -> int:
    """SIGTERM everything of the cluster, SIGKILL what is still there after a short grace.

    A per-run cluster holds nothing worth a long graceful shutdown: its results are already
    with the client, its spill files are deleted with its folder.
    """
    stopped: set[int] = set()
    # Again while any is left: a process can start one while it is being stopped (a nanny
    # restarting its worker, an adaptive scheduler starting one), after the list was taken.
    for _round in range(STOP_ROUNDS):
        procs = [p for p in processes_of(key) if not _ended(p)]
        if not procs:
            break
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGTERM)
        for proc in _wait_ended(procs, STOP_GRACE):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        _wait_ended(procs, 5)
        stopped.update(p.pid for p in procs)
    return len(stopped)


def _recorded(key: str) -> dict:
    """The handle a cluster of this host recorded at start ({} if none)."""
    try:
        return json.loads((cluster_dir(key) / "handle.json").read_text())
    except (OSError, ValueError):
        return {}


class _PortTaken(Exception):
    """Another process bound a port between our choosing it and the scheduler binding it."""


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def listen_address(listen: str) -> str:
    """The IPv4 address `cluster.listen` names on this host: loopback, an interface's, or one
    given as an address or host name (which must be this host's: the scheduler binds to it)."""
    if listen == "loopback":
        return "127.0.0.1"
    interfaces = psutil.net_if_addrs()
    if listen in interfaces:
        for addr in interfaces[listen]:
            if addr.family == socket.AF_INET:
                return addr.address
        raise ClusterError(f"cluster.listen: interface {listen!r} has no IPv4 address")
    try:
        address = socket.gethostbyname(listen)
    except OSError:
        address = ""
    mine = {a.address for addrs in interfaces.values() for a in addrs if a.family == socket.AF_INET}
    if address not in mine:
        raise ClusterError(
            f"cluster.listen: {listen!r} is no interface or address of this host "
            f"({socket.gethostname()}); interfaces: {', '.join(sorted(interfaces))}"
        )
    return address


class LocalBackend:
    def up(self, spec: ClusterSpec, context: ClusterContext) -> ClusterHandle:
        if not context.python:
            raise ClusterError("the local backend needs the pipeline's virtualenv")
        # An earlier attempt of this same run may have died half-way: start from nothing.
        self.down(ClusterHandle("local", context.key, ""))
        for _attempt in range(3):
            try:
                return self._start(spec, context)
            except _PortTaken:
                log.info("a port was taken while the cluster started; trying others")
        raise ClusterError("could not find free ports for the local Dask cluster")

    def _start(self, spec: ClusterSpec, context: ClusterContext) -> ClusterHandle:
        state = cluster_dir(context.key)
        state.mkdir(parents=True)
        # SPT_NOENV: setproctitle, when a pipeline installs it, must not blank the environment
        # that carries the marker.
        env = {**os.environ, KEY_VARIABLE: str(state), "PYTHONUNBUFFERED": "1", "SPT_NOENV": "1"}
        if context.code_dir:
            env["PYTHONPATH"] = context.code_dir
        # Ports are chosen here rather than by the scheduler so that the workers know the
        # address at once and start in parallel with the scheduler: each side spends about a
        # second importing Dask, and they would otherwise do it one after the other.
        host = listen_address(spec.listen)
        address = f"tcp://{host}:{_free_port(host)}"
        dashboard_port = _free_port(host)
        dashboard = f"http://{host}:{dashboard_port}"
        env[HEALTH_VARIABLE] = f"{dashboard}/health"
        # The nanny starts worker processes by forking a server that imported Dask once, not
        # by spawning interpreters that each import it again (measured: 2 workers up in about
        # 0.7x the time, 4 workers in 0.6x, on 2 cores). Forkserver, unlike fork, never forks
        # the nanny's own threads.
        env.setdefault("DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD", "forkserver")
        idle = int(parse_duration(spec.idle_timeout).total_seconds())
        worker = [context.python, "-m", "distributed.cli.dask_worker", address, "--host", host]
        worker_options = [
            "--nthreads", str(spec.cpu),
            "--memory-limit", str(parse_size(spec.memory)),
            "--death-timeout", str(DEATH_TIMEOUT),
            "--local-directory", str(state / "work"),
            "--no-dashboard",
            "--preload", str(PRELOAD),
        ]  # fmt: skip
        commands = {
            "scheduler": [
                context.python, "-m", "distributed.cli.dask_scheduler",
                "--host", host, "--port", address.rsplit(":", 1)[1],
                "--dashboard-address", f"{host}:{dashboard_port}",
                "--idle-timeout", f"{idle}s",
            ],
            "workers": [*worker, "--nworkers", str(spec.start_workers), *worker_options],
        }  # fmt: skip
        envs = {name: env for name in commands}
        if spec.adaptive:
            # The scheduler starts and stops the workers past the first ones itself
            # (adaptive.py says why), with the same options as these.
            commands["scheduler"] += ["--preload", str(ADAPTIVE_PRELOAD)]
            adaptive = {
                "minimum": spec.adaptive.minimum,
                "maximum": spec.adaptive.maximum,
                "start_workers": spec.start_workers,
                "processes": {"command": [*worker, *worker_options], "log_dir": str(state)},
            }
            envs["scheduler"] = {**env, ADAPTIVE_VARIABLE: json.dumps(adaptive)}
        try:
            procs = {}
            for name, cmd in commands.items():
                with open(state / f"{name}.log", "ab") as out:
                    procs[name] = subprocess.Popen(
                        cmd,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=context.code_dir or state,
                        env=envs[name],
                        start_new_session=True,
                    )
            self._wait(spec, state, procs, f"{dashboard}/json/counts.json")
            scheduler_id = scheduler_identity(address).get("id", "")
        except BaseException:
            self.down(ClusterHandle("local", context.key, ""))
            raise
        details = {
            "host": socket.gethostname(),
            "scheduler_id": scheduler_id,
            "pids": [p.pid for p in procs.values()],
            "state_dir": str(state),
            "idle_timeout": idle,
        }
        if spec.adaptive:
            details["adaptive"] = {
                "minimum": spec.adaptive.minimum,
                "maximum": spec.adaptive.maximum,
            }
        handle = ClusterHandle(
            backend="local",
            key=context.key,
            scheduler_address=address,
            dashboard_link=f"{dashboard}/status",
            details=details,
        )
        (state / "handle.json").write_text(json.dumps(handle.to_json()))
        return handle

    def _wait(
        self, spec: ClusterSpec, state: Path, procs: dict[str, subprocess.Popen], counts: str
    ) -> None:
        """Block until the scheduler answers and every worker has joined it."""
        deadline = time.monotonic() + START_TIMEOUT
        workers = -1
        while time.monotonic() < deadline:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    tail = _log_tail(state / f"{name}.log")
                    if "Address already in use" in tail:
                        raise _PortTaken()
                    raise ClusterError(
                        f"the Dask {name} exited with code {proc.returncode} while starting:\n"
                        f"{tail}"
                    )
            try:
                with urllib.request.urlopen(counts, timeout=2) as response:
                    workers = json.load(response)["workers"]
            # HTTPException: a worker took the dashboard's port first and answers in Dask's
            # protocol; the scheduler then exits with "Address already in use" (see above).
            except (OSError, ValueError, KeyError, http.client.HTTPException):
                workers = -1
            if workers >= spec.start_workers:
                return
            time.sleep(0.05)
        raise ClusterError(
            f"the local Dask cluster did not get {spec.start_workers} workers within "
            f"{START_TIMEOUT:.0f}s (has {max(workers, 0)}):\n{_log_tail(state / 'workers.log')}"
        )

    def alive(self, handle: ClusterHandle) -> bool:
        """The scheduler answers, is the one the handle names (a loopback address reaches
        another host's scheduler from here), and has a worker, unless it scales adaptively
        down to none: then it starts one for the next task itself."""
        if not handle.scheduler_address:
            return False
        identity = scheduler_identity(handle.scheduler_address)
        expected = handle.details.get("scheduler_id")
        if not identity or (expected and identity.get("id") != expected):
            return False
        adaptive = handle.details.get("adaptive") or {}
        return len(identity.get("workers") or {}) > 0 or adaptive.get("minimum") == 0

    def find(self, key: str) -> ClusterHandle | None:
        """The live cluster this host started under `key`, if any (a step that ran at the
        same time may have started it)."""
        recorded = _recorded(key)
        if not recorded:
            return None
        handle = ClusterHandle.from_json(recorded)
        return handle if self.alive(handle) else None

    def down(self, handle: ClusterHandle, spec: ClusterSpec | None = None) -> None:
        """Dask's shutdown first (it reaches the cluster from any host that reaches its
        address), then every process of the key on this host (the fallback: a hung scheduler,
        orphans, the entry point)."""
        recorded = _recorded(handle.key)
        address = handle.scheduler_address or recorded.get("scheduler_address", "")
        details = handle.details or recorded.get("details", {})
        asked = bool(address) and shut_down_scheduler(address, details.get("scheduler_id", ""))
        if asked:
            log.info("asked the Dask scheduler at %s to shut down", address)
        stopped = _stop(handle.key)
        if stopped:
            log.info("stopped %d process(es) of cluster %s", stopped, handle.key)
        elif address and not asked and details.get("host") not in (None, socket.gethostname()):
            log.warning(
                "the cluster at %s (started on %s) cannot be reached from %s: it stops itself "
                "after its idle timeout (%ss). Set cluster.listen to an address the other "
                "hosts reach, so that any host can stop it.",
                address,
                details.get("host"),
                socket.gethostname(),
                details.get("idle_timeout", "?"),
            )
        shutil.rmtree(cluster_dir(handle.key), ignore_errors=True)
