"""A production topology on one machine: Postgres, Redis, and Celery workers on hosts of their own.

Each piece is a context manager that starts a real program and stops it, and removes what it
made, on exit (also when the test failed):

- `hosts(n)`: n "hosts", each a network namespace joined to a Linux bridge in the root namespace
  by a veth pair. The namespace end is called `dfx0` on every host (so one pipeline file says
  `listen: dfx0` for all of them) and has an address that exists only on this bridge. No
  namespace has a default route and the root namespace does not forward: a host reaches the
  bridge's subnet and nothing else.
- `postgres(...)`: a cluster made by Debian's PostgreSQL 15 `initdb` in a temp dir, with a
  database and a password-protected user for Airflow.
- `redis(...)`: Debian's redis-server with a password and no persistence.
- `celery_worker(host, queues, env, logs)`: `airflow celery worker` inside a host's namespace
  (and its own UTS namespace, so that Airflow records the host's name on the task instances).

The Airflow services themselves (api-server, scheduler, DAG processor) are started by
tests/airflow_services.py in the root namespace, listening on the bridge's address.

Needs root (namespaces, links; Postgres is then run as the `postgres` user, which it insists
on), iproute2, util-linux, PostgreSQL 15 and redis-server: `missing()` says what is not there.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.airflow_services import free_port

INTERFACE = "dfx0"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
NETNS_RUN = Path("/run/netns")
START_TIMEOUT = 120.0  # seconds; generous for a loaded 2-core machine, never reached when well
STOP_GRACE = 20.0


class TopologyError(AssertionError):
    """A piece of the topology did not start; the message ends with its log."""


def missing() -> str:
    """What this machine lacks to build the topology ('' when nothing): a test skips on a
    laptop for it and fails in CI."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    needs = {
        "ip (iproute2)": shutil.which("ip"),
        "unshare (util-linux)": shutil.which("unshare"),
        "setpriv (util-linux)": shutil.which("setpriv"),
        "redis-server": shutil.which("redis-server"),
        f"PostgreSQL 15 ({PG_BIN})": (PG_BIN / "postgres").is_file() or None,
    }
    absent = [name for name, found in needs.items() if not found]
    if absent:
        return f"not installed: {', '.join(absent)}"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no user `postgres` to run PostgreSQL as (Debian's postgresql package makes it)"
    return ""


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise TopologyError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return f"\n--- {path.name} ---\n{path.read_text(errors='replace')[-chars:]}"
    except OSError:
        return ""


def _spawn(command: list[str], log: Path, **options) -> subprocess.Popen:
    """A service in its own session (so that `_stop_group` reaches all of it), output to `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **options,
        )


def _stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the process group `proc` leads, SIGKILL it after a grace, and reap `proc`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_GRACE)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# --- hosts ---------------------------------------------------------------------------------------


def _netns_inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class Host:
    """One machine of the topology: a network namespace with `dfx0` at `address`."""

    name: str  # also its hostname, as Airflow records it on task instances
    netns: str
    address: str

    def contains(self, pid: int) -> bool:
        """Whether process `pid` runs on this host (in its network namespace)."""
        mine = _netns_inode(str(NETNS_RUN / self.netns))
        return mine is not None and _netns_inode(f"/proc/{pid}/ns/net") == mine

    def pids(self) -> list[int]:
        """Every process in this host's namespace."""
        return [int(pid) for pid in _ip("netns", "pids", self.netns).split()]


@dataclass(frozen=True)
class Network:
    """The bridge in the root namespace (`address`, where the shared services listen) and the
    hosts on it."""

    bridge: str
    address: str
    subnet: str  # CIDR, for Postgres' pg_hba.conf
    hosts: tuple[Host, ...]

    def host_of(self, pid: int) -> str:
        """The name of the host process `pid` runs on ('root': none of them)."""
        for host in self.hosts:
            if host.contains(pid):
                return host.name
        return "root"


def _free_subnet() -> tuple[int, int]:
    """10.A.B.0/24 for this test session: picked from the pid so that sessions running at the
    same time differ, and moved on while the machine already has an address in it."""
    used = _ip("-o", "-4", "addr", "show")
    start = os.getpid() % 12800
    for step in range(12800):
        index = (start + step) % 12800
        second, third = 200 + index // 256, index % 256
        if f" 10.{second}.{third}." not in used:
            return second, third
    raise TopologyError("no free 10.2xx.y.0/24 subnet on this machine")


@contextlib.contextmanager
def hosts(n: int, names: Sequence[str] = ("a", "b", "c", "d")) -> Iterator[Network]:
    """A bridge and n namespaces on it; everything removed on exit, processes left in a
    namespace included (they would keep it alive after `ip netns del`)."""
    pid = os.getpid()
    second, third = _free_subnet()
    prefix = f"10.{second}.{third}"
    bridge = f"dfxbr{pid}"
    made = [Host(f"dfx-{names[i]}", f"dfx-{pid}-{names[i]}", f"{prefix}.{2 + i}") for i in range(n)]
    created: list[Host] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{prefix}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, host in enumerate(made):
            _ip("netns", "add", host.netns)
            created.append(host)
            outer = f"dfx{pid}{names[i]}"
            _ip(
                "link", "add", outer, "type", "veth", "peer", "name", INTERFACE, "netns", host.netns
            )
            _ip("link", "set", outer, "master", bridge, "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", INTERFACE)
            _ip("-n", host.netns, "link", "set", INTERFACE, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        yield Network(bridge, f"{prefix}.1", f"{prefix}.0/24", tuple(made))
    finally:
        for host in created:
            with contextlib.suppress(TopologyError):
                procs = [psutil.Process(p) for p in host.pids() if psutil.pid_exists(p)]
                for proc in procs:
                    with contextlib.suppress(psutil.Error):
                        proc.kill()
                psutil.wait_procs(procs, timeout=10)
            with contextlib.suppress(TopologyError):
                _ip("netns", "del", host.netns)  # deletes its veth pair too
        with contextlib.suppress(TopologyError):
            _ip("link", "del", bridge)


# --- Postgres ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str
    database: str

    def url(self, host: str, driver: str = "postgresql+psycopg2") -> str:
        return f"{driver}://{self.user}:{self.password}@{host}:{self.port}/{self.database}"


@contextlib.contextmanager
def postgres(
    tmp: Path, listen: Sequence[str] = ("127.0.0.1",), clients: Sequence[str] = ()
) -> Iterator[Postgres]:
    """A PostgreSQL 15 cluster on `listen` with a database `airflow` for the user `airflow`.

    Postgres refuses to run as root, so as root it runs as the `postgres` user, in a data dir
    of its own under /tmp (pytest's temp dirs are private to root). `clients` are the CIDRs
    besides loopback that may log in (with the password). Durability is off: the data dies
    with the test.
    """
    import psycopg2

    tmp.mkdir(parents=True, exist_ok=True)
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix=f"dagfactory-pg-{os.getpid()}-", dir="/tmp"))
    run_as: list[str] = []
    if as_root:
        owner = pwd.getpwnam("postgres")
        os.chown(base, owner.pw_uid, owner.pw_gid)
        run_as = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
    data = base / "data"
    log = tmp / "postgres.log"
    proc = None
    try:
        initdb = [
            *run_as, str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8",
            "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "--no-instructions",
        ]  # fmt: skip
        done = subprocess.run(initdb, cwd=base, capture_output=True, text=True)
        if done.returncode:
            raise TopologyError(f"initdb failed:\n{done.stdout}{done.stderr}")
        with open(data / "pg_hba.conf", "a") as hba:
            for cidr in clients:
                hba.write(f"host all all {cidr} scram-sha-256\n")
        port = free_port()
        command = [
            *run_as, str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port),
            "-c", f"listen_addresses={','.join(listen)}",
            "-c", f"unix_socket_directories={base}",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]  # fmt: skip
        proc = _spawn(command, log, cwd=base)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise TopologyError(f"postgres exited with {proc.returncode}" + _tail(log))
            try:
                admin = psycopg2.connect(host=str(base), port=port, user="postgres")
                break
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise TopologyError(
                        "postgres did not accept connections" + _tail(log)
                    ) from None
                time.sleep(0.2)
        server = Postgres(port, "airflow", secrets.token_hex(12), "airflow")
        admin.autocommit = True
        with contextlib.closing(admin), admin.cursor() as cur:
            cur.execute(f"CREATE USER {server.user} PASSWORD %s", (server.password,))
            cur.execute(f"CREATE DATABASE {server.database} OWNER {server.user}")
        yield server
    finally:
        if proc is not None:
            _stop_group(proc, signal.SIGINT)  # "fast" shutdown: disconnects clients
        shutil.rmtree(base, ignore_errors=True)


# --- Redis ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Redis:
    port: int
    password: str

    def url(self, host: str, db: int = 0) -> str:
        return f"redis://:{self.password}@{host}:{self.port}/{db}"


@contextlib.contextmanager
def redis(tmp: Path, bind: Sequence[str] = ("127.0.0.1",)) -> Iterator[Redis]:
    """redis-server on `bind`, with a password (without one, Redis' protected mode would turn
    away the hosts) and nothing saved to disk."""
    import redis as redis_client

    tmp.mkdir(parents=True, exist_ok=True)
    server = Redis(free_port(), secrets.token_hex(12))
    log = tmp / "redis.log"
    command = [
        "redis-server", "--port", str(server.port), "--bind", *bind,
        "--requirepass", server.password, "--save", "", "--appendonly", "no",
        "--dir", str(tmp), "--daemonize", "no",
    ]  # fmt: skip
    proc = _spawn(command, log)
    try:
        client = redis_client.Redis(host="127.0.0.1", port=server.port, password=server.password)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise TopologyError(f"redis-server exited with {proc.returncode}" + _tail(log))
            try:
                client.ping()
                break
            except redis_client.ConnectionError:
                if time.monotonic() > deadline:
                    raise TopologyError("redis-server did not answer" + _tail(log)) from None
                time.sleep(0.1)
        client.close()
        yield server
    finally:
        _stop_group(proc)


# --- Celery workers ------------------------------------------------------------------------------


@dataclass
class CeleryWorker:
    host: Host
    queues: tuple[str, ...]
    proc: subprocess.Popen
    log: Path

    @property
    def celery_hostname(self) -> str:
        return f"worker@{self.host.name}"

    def tail(self) -> str:
        return _tail(self.log)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until Celery says the worker consumes its queues (separate from starting it, so
        that several workers import Airflow at the same time)."""
        deadline = time.monotonic() + timeout
        ready = f"{self.celery_hostname} ready."
        while ready not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise TopologyError(f"the Celery worker on {self.host.name} exited" + self.tail())
            if time.monotonic() > deadline:
                raise TopologyError(f"the Celery worker on {self.host.name} never got ready")
            time.sleep(0.3)


@contextlib.contextmanager
def celery_worker(
    host: Host, queues: Sequence[str], env: dict[str, str], logs: Path, concurrency: int = 2
) -> Iterator[CeleryWorker]:
    """`airflow celery worker` on `host`, consuming `queues` (see `CeleryWorker.wait_ready`).

    It runs in the host's network namespace and in a UTS namespace named after the host, so
    that the task instances it runs show that host's name. `env` is its whole environment: give
    each host its own DAGFACTORY_HOME, as separate machines have separate caches. Worker logs
    are not served (--skip-serve-logs): the hosts share this machine's disk, where the
    api-server reads the task logs.
    """
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"celery-{host.name}.log"
    command = [
        "ip", "netns", "exec", host.netns, "unshare", "--uts", "--",
        "sh", "-c", 'hostname "$0" && exec "$@"', host.name,
        sys.executable, "-m", "airflow", "celery", "worker",
        "--queues", ",".join(queues), "--concurrency", str(concurrency),
        "--celery-hostname", f"worker@{host.name}", "--skip-serve-logs",
    ]  # fmt: skip
    proc = _spawn(command, log, env=env)
    try:
        yield CeleryWorker(host, tuple(queues), proc, log)
    finally:
        # SIGTERM: Celery's warm shutdown, which lets running tasks finish within the grace.
        _stop_group(proc)
