"""Which clusters this dagfactory home started on this host, and stopping them by key.

Two records are read and compared, because either can outlive the other: the state folder the
local backend keeps per cluster (`clusters/<key>/`, with `handle.json` once it is up), and the
live processes that carry a marker naming that folder in their environment. A folder with no
process is a cluster that stopped without teardown (idle timeout, a reboot); processes with no
folder are orphans that a teardown missed. Both show here, and `stop` clears both.

Only this host is seen: clusters of remote backends keep no state folder here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from dagfactory.backends import ClusterHandle, get_backend, scheduler_answers
from dagfactory.backends.local import KEY_VARIABLE, processes_of
from dagfactory.errors import ClusterError
from dagfactory.run.workspace import dagfactory_home

RUNNING = "running"
"""Processes live, and the scheduler answers on its address."""
UNRESPONSIVE = "unresponsive"
"""Processes live, but the scheduler does not answer: stop it, a retry will start a new one."""
STARTING = "starting"
"""Processes live, no handle yet: `up` is under way, or died before it wrote the handle."""
STOPPED = "stopped"
"""A state folder without any process: the cluster ended without a teardown."""
ORPHANED = "orphaned"
"""Processes whose state folder is gone: a teardown removed the folder but missed them."""


@dataclass(frozen=True)
class ClusterInfo:
    """One cluster as this host sees it: its handle (if any) and its live processes."""

    key: str
    """The run key the cluster was started under (the folder name when no handle says more)."""
    state: str
    backend: str = "local"
    scheduler_address: str = ""
    dashboard_link: str = ""
    started: float = 0.0
    """Epoch seconds: when its oldest live process started, else when its folder was made."""
    pids: tuple[int, ...] = ()
    state_dir: str = ""
    handle: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def processes(self) -> int:
        return len(self.pids)

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.started)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("handle")
        data["pids"] = list(self.pids)
        data["processes"] = self.processes
        data["age_seconds"] = round(self.age(), 1)
        return data


def clusters_root() -> Path:
    return dagfactory_home() / "clusters"


def census() -> list[ClusterInfo]:
    """Every cluster of this dagfactory home on this host, stopped ones included, oldest first."""
    root = clusters_root()
    marked = _marked_processes(root)
    found = []
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for folder in folders:
        found.append(_from_folder(folder, marked.pop(str(folder), [])))
    for marker, procs in sorted(marked.items()):
        found.append(
            ClusterInfo(
                key=Path(marker).name,
                state=ORPHANED,
                started=min(p.create_time() for p in procs),
                pids=tuple(sorted(p.pid for p in procs)),
                state_dir=marker,
            )
        )
    return sorted(found, key=lambda c: (c.started, c.key))


def live_clusters() -> list[ClusterInfo]:
    """The clusters that have at least one live process on this host."""
    return [c for c in census() if c.processes]


def find(key: str) -> ClusterInfo | None:
    """The cluster started under `key` (or whose state folder is named `key`), if any."""
    for info in census():
        if key in (info.key, Path(info.state_dir).name):
            return info
    return None


def stop(key: str) -> ClusterInfo | None:
    """Stop the cluster under `key` through its backend's `down`; None if there is none.

    Returns the cluster as it was before it was stopped. Calling it again is harmless.
    Raises ClusterError if any of its processes survive the backend's `down`.
    """
    info = find(key)
    if info is None:
        return None
    handle = (
        ClusterHandle.from_json(info.handle)
        if info.handle
        else ClusterHandle(info.backend, Path(info.state_dir).name, "")
    )
    get_backend(handle.backend).down(handle)
    left = [p for p in processes_of(Path(info.state_dir).name) if _live(p)]
    if left:
        raise ClusterError(
            f"cluster {info.key}: {len(left)} process(es) survived the stop "
            f"(pids {', '.join(str(p.pid) for p in left)}); stop them with `kill -9`"
        )
    return info


def stop_all() -> list[ClusterInfo]:
    """Stop every cluster of this dagfactory home on this host, stopped folders cleared too."""
    stopped = []
    for info in census():
        if done := stop(Path(info.state_dir).name):
            stopped.append(done)
    return stopped


def _live(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _marked_processes(root: Path) -> dict[str, list[psutil.Process]]:
    """Live processes carrying a cluster marker under root, by marker (their state folder)."""
    prefix = str(root) + os.sep
    found: dict[str, list[psutil.Process]] = {}
    for proc in psutil.process_iter():
        try:
            marker = proc.environ().get(KEY_VARIABLE, "")
            if marker.startswith(prefix) and proc.status() != psutil.STATUS_ZOMBIE:
                proc.create_time()  # cached now: the census must not fail on a later exit
                found.setdefault(marker, []).append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def _from_folder(folder: Path, procs: list[psutil.Process]) -> ClusterInfo:
    try:
        handle = json.loads((folder / "handle.json").read_text())
    except (OSError, ValueError):
        handle = {}
    if not procs:
        state = STOPPED
    elif not handle:
        state = STARTING
    elif scheduler_answers(handle.get("scheduler_address", ""), timeout=2):
        state = RUNNING
    else:
        state = UNRESPONSIVE
    try:
        made = folder.stat().st_mtime
    except OSError:
        made = 0.0
    return ClusterInfo(
        key=handle.get("key") or folder.name,
        state=state,
        backend=handle.get("backend", "local"),
        scheduler_address=handle.get("scheduler_address", ""),
        dashboard_link=handle.get("dashboard_link", ""),
        started=min((p.create_time() for p in procs), default=made),
        pids=tuple(sorted(p.pid for p in procs)),
        state_dir=str(folder),
        handle=handle,
    )


def table(clusters: list[ClusterInfo], now: float | None = None) -> str:
    """The census as an aligned text table, one cluster a line (for `dagfactory clusters`)."""
    rows = [("KEY", "BACKEND", "STATE", "AGE", "PROCS", "SCHEDULER", "DASHBOARD")]
    for c in clusters:
        rows.append(
            (
                c.key,
                c.backend,
                c.state,
                duration_text(c.age(now)),
                str(c.processes),
                c.scheduler_address or "-",
                c.dashboard_link or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def duration_text(seconds: float) -> str:
    """45s, 12m, 3h05m, 2d04h: short enough for a table column."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
