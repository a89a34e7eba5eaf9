"""Remove cache entries no run has used for a while (`dagfactory prune`).

The caches of `workspace.py` only grow: a checkout per commit ever run, a virtualenv per set of
requirements, a git mirror per remote. "Used" is the stamp `workspace.prepare` puts on each
entry at every run (the mtime of the checkout's folder, of the virtualenv's completion marker,
of the mirror's folder), not a guess from file times that installs and fetches do not update.

An entry is never removed while something uses it: a virtualenv or mirror whose file lock is
held (being built or fetched), or any entry a live process runs from (a cluster, an entry
point, an Airflow task: its interpreter, working folder or PYTHONPATH is inside the entry).
A removed entry is first renamed out of its place, so a run sees all of it or none of it,
and simply rebuilds it.

Dask performance reports (`reports.py`) go by the same age limit, a run at a time: a run's
folder of reports is removed when the newest file in it is older than the limit, so a report
stays readable as long as any report of its run would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from dagfactory.run.reports import reports_dir
from dagfactory.run.workspace import _COMPLETE, dagfactory_home

DEFAULT_DAYS = 30.0
KINDS = {"checkout": "checkouts", "venv": "venvs", "mirror": "repos"}
"""Kind of cache entry -> its folder under the dagfactory home."""
REPORT = "report"
"""Kind of the entry that is one run's folder of performance reports (reports/<dag>/<run>)."""
_TRASH = ".pruning-"


@dataclass(frozen=True)
class CacheEntry:
    kind: str
    path: Path
    last_used: float
    """Epoch seconds of the last run that used it (its stamp)."""

    def idle_days(self, now: float) -> float:
        return max(0.0, now - self.last_used) / 86400


@dataclass
class PruneReport:
    removed: list[tuple[CacheEntry, int]] = field(default_factory=list)
    """Entries removed (or, in a dry run, that would be), each with the bytes it frees."""
    in_use: list[tuple[CacheEntry, str]] = field(default_factory=list)
    """Entries old enough to remove but kept, each with why."""
    recent: list[CacheEntry] = field(default_factory=list)
    """Entries used within the limit."""

    @property
    def freed(self) -> int:
        return sum(size for _, size in self.removed)


def cache_entries() -> list[CacheEntry]:
    """Every checkout, virtualenv and mirror in the cache, with when a run last used it, and
    every run's folder of performance reports, with when a report was last written to it."""
    home = dagfactory_home()
    folders = [(kind, home / folder) for kind, folder in KINDS.items()]
    if reports_dir().is_dir():
        dags = sorted(p for p in reports_dir().iterdir() if p.is_dir() and not p.is_symlink())
        folders += [(REPORT, dag) for dag in dags]
    entries = []
    for kind, base in folders:
        if not base.is_dir():
            continue
        for path in sorted(base.iterdir()):
            if path.is_dir() and not path.is_symlink():
                with contextlib.suppress(OSError):
                    entries.append(CacheEntry(kind, path, _last_used(kind, path)))
    return entries


def prune(
    days: float = DEFAULT_DAYS, dry_run: bool = False, now: float | None = None
) -> PruneReport:
    """Remove every entry not used for `days` days and not in use; report what and how much."""
    now = time.time() if now is None else now
    cutoff = now - days * 86400
    report = PruneReport()
    old = []
    for entry in cache_entries():
        # Leftovers of an interrupted prune or export go whatever their age says.
        if entry.path.name.startswith(_TRASH) or entry.last_used < cutoff:
            old.append(entry)
        else:
            report.recent.append(entry)
    used_by_processes = _paths_in_use() if old else set()
    for entry in old:
        reason = _user(entry, used_by_processes)
        if reason:
            report.in_use.append((entry, reason))
            continue
        with _lock(entry) as locked:
            if not locked:
                report.in_use.append((entry, "its lock is held (being built or fetched)"))
                continue
            # A run may have stamped it since the listing: that run wins.
            if not entry.path.name.startswith(_TRASH):
                with contextlib.suppress(OSError):
                    if _last_used(entry.kind, entry.path) >= cutoff:
                        report.recent.append(entry)
                        continue
            size = disk_usage(entry.path)
            if not dry_run:
                _remove(entry)
            report.removed.append((entry, size))
    return report


def disk_usage(path: Path) -> int:
    """Bytes on disk that removing path frees: files also hard-linked from elsewhere (uv links
    virtualenv files from its own cache) free nothing and are not counted."""
    inodes: dict[tuple[int, int], tuple[bool, int, int]] = {}  # -> (frees, links, bytes)
    seen: dict[tuple[int, int], int] = {}

    def add(name: str) -> None:
        try:
            st = os.lstat(name)
        except OSError:
            return
        inode = (st.st_dev, st.st_ino)
        inodes[inode] = (stat.S_ISDIR(st.st_mode), st.st_nlink, st.st_blocks * 512)
        seen[inode] = seen.get(inode, 0) + 1

    for folder, dirs, files in os.walk(path):
        add(folder)
        for name in files:
            add(os.path.join(folder, name))
        for name in dirs:  # os.walk lists symlinks to folders here and does not enter them
            if os.path.islink(os.path.join(folder, name)):
                add(os.path.join(folder, name))
    return sum(
        size for inode, (is_dir, links, size) in inodes.items() if is_dir or seen[inode] >= links
    )


def _last_used(kind: str, path: Path) -> float:
    """The entry's stamp; a virtualenv without its completion marker is a build, dated by its
    folder (a build in progress holds its lock and is never removed)."""
    marker = path / _COMPLETE
    if kind == "venv" and marker.exists():
        return marker.stat().st_mtime
    if kind == REPORT:  # a retry or a later step adds a report to an older run's folder
        newest = path.stat().st_mtime
        for folder, _, files in os.walk(path):
            for name in [*files, "."]:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(folder, name)).st_mtime)
        return newest
    return path.stat().st_mtime


def _lock_file(entry: CacheEntry) -> Path | None:
    """The file lock workspace.py takes on the entry (checkouts need none: they are renamed
    into place whole, and removed the same way; reports neither: each is renamed into place)."""
    return None if entry.kind in ("checkout", REPORT) else Path(f"{entry.path}.lock")


@contextlib.contextmanager
def _lock(entry: CacheEntry) -> Iterator[bool]:
    path = _lock_file(entry)
    if path is None or entry.path.name.startswith(_TRASH):
        yield True
        return
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def _remove(entry: CacheEntry) -> None:
    trash = entry.path
    if not entry.path.name.startswith(_TRASH):
        trash = entry.path.with_name(f"{_TRASH}{entry.path.name}-{os.getpid()}")
        os.rename(entry.path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    if entry.kind == "venv":  # written by the build next to the virtualenv
        with contextlib.suppress(OSError):
            entry.path.with_name(f"{entry.path.name}.requirements.txt").unlink()


def _user(entry: CacheEntry, used: set[Path]) -> str:
    """Why the entry must stay ('' if nothing uses it)."""
    for path in used:
        if path == entry.path or entry.path in path.parents:
            return f"a live process uses {path}"
    return ""


def _paths_in_use() -> set[Path]:
    """Interpreters, working folders and PYTHONPATH entries of every live process we can see."""
    home = str(dagfactory_home())
    found: set[Path] = set()
    for proc in psutil.process_iter():
        try:
            candidates = [proc.cwd(), *proc.cmdline()[:1]]
            env = proc.environ()
            candidates += env.get("PYTHONPATH", "").split(os.pathsep)
            candidates.append(env.get("VIRTUAL_ENV", ""))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for text in candidates:
            if text.startswith(home):
                found.add(Path(text))
    return found


def report_lines(report: PruneReport, days: float, dry_run: bool, now: float) -> list[str]:
    """What `dagfactory prune` prints: one line per entry removed or kept in use, a total."""
    home = dagfactory_home()
    verb = "would remove" if dry_run else "removed"
    lines = []
    for entry, size in report.removed:
        where = entry.path.relative_to(home)
        idle = entry.idle_days(now)
        age = f"written {idle:.0f} days ago" if entry.kind == REPORT else f"unused {idle:.0f} days"
        lines.append(f"{verb} {where} ({age}, {size_text(size)})")
    for entry, reason in report.in_use:
        lines.append(f"kept {entry.path.relative_to(home)}: {reason}")
    lines.append(
        f"{'would free' if dry_run else 'freed'} {size_text(report.freed)}: "
        f"{len(report.removed)} {'to remove' if dry_run else 'removed'}, "
        f"{len(report.in_use)} in use, "
        f"{len(report.recent)} used within {days:g} days kept"
    )
    return lines


def size_text(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
