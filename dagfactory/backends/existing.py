"""`existing`: a Dask scheduler that someone else runs and keeps running.

`up` checks that the scheduler answers and that the pipeline's virtualenv speaks its version of
Dask; `down` leaves it alone, because stopping a shared cluster is not this run's decision. Only
the pipeline's code reaches the cluster (uploaded by the entry point's process, and removed when
it ends); its requirements are not installed on the cluster's workers.

A client whose `distributed` differs from the cluster's fails late and obscurely (Dask prints a
version table twice, then loses the scheduler connection), so the versions are compared before
the run, and `pins` lets bootstrap build the virtualenv with the cluster's versions to begin with.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from typing import Any
from urllib.parse import urlsplit

from dagfactory.backends import ClusterContext, ClusterHandle, scheduler_answers
from dagfactory.errors import ClusterError
from dagfactory.spec.pipeline import ClusterSpec

CONNECT_TIMEOUT = 10.0

EXACT = ("distributed", "dask")
"""Client and cluster must run the same release: they share a wire protocol and graph format."""
SAME_MINOR = ("python", "cloudpickle")
"""Functions are pickled by value with bytecode (python) and cloudpickle's own helpers."""
PINNED = ("distributed", "cloudpickle")
"""Pinned in the virtualenv to the cluster's versions (dask follows distributed's own pin)."""

# Runs in the pipeline's virtualenv: reads package metadata, imports no Dask.
_VENV_VERSIONS = """
import json, sys
from importlib.metadata import PackageNotFoundError, version
found = {"python": ".".join(map(str, sys.version_info[:3]))}
for name in sys.argv[1:]:
    if name in found:
        continue
    try:
        found[name] = version(name)
    except PackageNotFoundError:
        found[name] = None
print(json.dumps(found))
"""


def cluster_versions(address: str, timeout: float = CONNECT_TIMEOUT) -> dict[str, dict[str, Any]]:
    """{"scheduler": packages, "<worker address>": packages, ...} as the cluster reports them.

    Asked with Dask's raw `versions` operation, not through a Client, so that a mismatch is
    ours to explain rather than Dask's table to print.
    """

    async def ask() -> dict[str, dict[str, Any]]:
        from distributed.comm import connect

        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "versions", "reply": True})
            scheduler = await comm.read()
            await comm.write(
                {"op": "broadcast", "msg": {"op": "versions"}, "on_error": "ignore", "reply": True}
            )
            workers = await comm.read()
        finally:
            comm.abort()
        found = {"scheduler": scheduler["packages"]}
        found.update((w, v["packages"]) for w, v in sorted(workers.items()) if v)
        return found

    return asyncio.run(asyncio.wait_for(ask(), timeout * 2))


def venv_versions(python: str, packages: tuple[str, ...]) -> dict[str, str | None]:
    proc = subprocess.run(
        [python, "-c", _VENV_VERSIONS, *packages],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode:
        raise ClusterError(f"cannot read the package versions of {python}: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def _release(version: str | None, package: str) -> str | None:
    if version is None or package not in SAME_MINOR:
        return version
    return ".".join(version.split(".")[:2])


def mismatches(
    address: str, cluster: dict[str, dict[str, Any]], venv: dict[str, str | None]
) -> list[str]:
    """One clause per package whose versions would break the run, saying how to fix it."""
    found: list[str] = []
    wrong: set[str] = set()
    for package in (*EXACT, *SAME_MINOR):
        ours = _release(venv.get(package), package)
        theirs = sorted({str(_release(p.get(package), package)) for p in cluster.values()})
        if theirs == [str(ours)] or (package == "dask" and "distributed" in wrong):
            continue  # distributed pins its own dask: one fix for both
        wrong.add(package)
        if len(theirs) > 1:
            found.append(
                f"the cluster at {address} itself mixes {package} {' and '.join(theirs)} "
                "(scheduler and workers); its owner must align them"
            )
        elif package == "python":
            found.append(
                f"the cluster at {address} runs Python {theirs[0]} but the pipeline's virtualenv "
                f"has Python {ours} (the Airflow host's); run the cluster on Python {ours}"
            )
        else:
            exact = cluster["scheduler"].get(package)
            found.append(
                f"the Dask cluster at {address} runs {package} {exact} but the pipeline's "
                f"virtualenv has {venv.get(package) or 'none'}: write {package}=={exact} in "
                f"source.requirements, or drop your own pin of {package} (dagfactory then pins "
                "the cluster's version)"
            )
    return found


class ExistingBackend:
    def up(self, spec: ClusterSpec, context: ClusterContext) -> ClusterHandle:
        if not spec.address:
            raise ClusterError("the 'existing' backend needs cluster.address")
        url = urlsplit(spec.address)
        try:
            with socket.create_connection((url.hostname, url.port), timeout=CONNECT_TIMEOUT):
                pass
        except OSError as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {spec.address}: {exc.strerror or exc}; "
                "check cluster.address and that the scheduler is running"
            ) from None
        if context.python:
            self._check_versions(spec.address, context.python)
        return ClusterHandle("existing", context.key, spec.address)

    def _check_versions(self, address: str, python: str) -> None:
        try:
            cluster = cluster_versions(address)
        except (OSError, TimeoutError, KeyError, TypeError) as exc:
            raise ClusterError(
                f"the Dask scheduler at {address} accepts connections but does not answer "
                f"Dask's versions request ({type(exc).__name__}: {exc}); is it a Dask scheduler?"
            ) from None
        problems = mismatches(address, cluster, venv_versions(python, (*EXACT, *SAME_MINOR)))
        if problems:
            raise ClusterError("; ".join(problems))

    def pins(self, spec: ClusterSpec) -> dict[str, str]:
        """The versions the virtualenv must have to talk to this cluster ({} if unreachable).

        Bootstrap builds the virtualenv with these; when the scheduler cannot be reached now,
        `up` reaches it later or says why not.
        """
        if not spec.address:
            return {}
        try:
            scheduler = cluster_versions(spec.address)["scheduler"]
        except (OSError, TimeoutError, KeyError, TypeError):
            return {}
        return {name: scheduler[name] for name in PINNED if scheduler.get(name)}

    def alive(self, handle: ClusterHandle) -> bool:
        return scheduler_answers(handle.scheduler_address)

    def down(self, handle: ClusterHandle, spec: ClusterSpec | None = None) -> None:
        return None
