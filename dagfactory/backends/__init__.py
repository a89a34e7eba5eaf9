"""One small interface for "a Dask cluster", many backends behind it.

A backend starts a cluster for one run (`up`) and stops it (`down`). The handle it returns is
plain JSON, so it can travel through XCom to a teardown task in another process or on another
host. `down` must be idempotent: safe to call twice, or on a half-made cluster.

Third parties add a backend with an entry point in the `dagfactory.backends` group that names a
class implementing `ClusterBackend`.
"""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import asdict, dataclass, field
from functools import cache
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any, Protocol
from urllib.parse import urlsplit

from dagfactory.errors import ClusterError
from dagfactory.spec.pipeline import ClusterSpec

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dagfactory.backends"
BUILTIN = {
    "local": "dagfactory.backends.local:LocalBackend",
    "existing": "dagfactory.backends.existing:ExistingBackend",
    "fargate": "dagfactory.backends.fargate:FargateBackend",
}


@dataclass(frozen=True)
class ClusterHandle:
    """Everything needed to use a running cluster and to find and stop all of it later."""

    backend: str
    key: str
    scheduler_address: str
    dashboard_link: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | str) -> ClusterHandle:
        return cls(**(json.loads(data) if isinstance(data, str) else data))


@dataclass(frozen=True)
class ClusterContext:
    """What a backend may need from the pipeline besides the cluster spec."""

    key: str
    """Unique per pipeline run; names every resource so teardown can find it from elsewhere."""
    python: str = ""
    """The pipeline virtualenv's interpreter (for backends that start processes here)."""
    code_dir: str = ""
    """The checked-out code, put on the workers' PYTHONPATH where the backend can."""


class ClusterBackend(Protocol):
    def up(self, spec: ClusterSpec, context: ClusterContext) -> ClusterHandle:
        """Start a cluster; on failure, stop whatever was started and raise ClusterError."""

    def alive(self, handle: ClusterHandle) -> bool:
        """Whether the cluster the handle names still answers (cheap: a retry asks it first)."""

    def down(self, handle: ClusterHandle, spec: ClusterSpec | None = None) -> None:
        """Stop everything the handle names, or everything of `handle.key` when the handle
        names nothing else (a teardown that only knows the run key; `spec` then says where to
        look). Idempotent."""


def shut_down_scheduler(
    address: str, scheduler_id: str = "", timeout: float = 3.0, connection_args: Any = None
) -> bool:
    """Ask a Dask scheduler to close, with its workers and nannies: Dask's own protocol, which
    works from any host that reaches the address. False when it could not be asked (gone
    already, unreachable, or another scheduler answers there); never raises, because teardown
    must go on to its fallbacks.

    `scheduler_id` guards against stopping someone else's cluster: a loopback address means
    another scheduler on another host, and a port can be reused once its scheduler is gone.

    A raw message, not a Client: a client whose `distributed` differs from the cluster's
    would print Dask's version table, and connecting one costs a second.
    """
    import asyncio

    async def terminate() -> bool:
        from distributed.comm import connect

        comm = await connect(address, timeout=timeout, **(connection_args or {}))
        try:
            if scheduler_id:
                await comm.write({"op": "identity", "reply": True})
                identity = await comm.read()
                if not isinstance(identity, dict) or identity.get("id") != scheduler_id:
                    log.warning(
                        "another Dask scheduler answers at %s (not %s): left alone",
                        address,
                        scheduler_id,
                    )
                    return False
            await comm.write({"op": "terminate", "reply": False})
            return True
        finally:
            await comm.close()

    try:
        return asyncio.run(asyncio.wait_for(terminate(), timeout))
    except Exception:
        return False


def scheduler_identity(
    address: str, timeout: float = 5.0, connection_args: Any = None
) -> dict[str, Any]:
    """The scheduler's identity (id, workers, ...) through Dask's own protocol; {} when no
    scheduler answers there.

    Not the dashboard's /json/identity.json: once a task has run, the identity holds
    tuple-keyed metrics that JSON cannot encode, and that page answers 500 from then on.
    """
    import asyncio

    async def ask() -> Any:
        from distributed.comm import connect

        comm = await connect(address, timeout=timeout, **(connection_args or {}))
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            await comm.close()

    if not scheduler_answers(address, timeout):
        return {}  # refused at once: Dask's connect would retry that until its timeout
    try:
        identity = asyncio.run(asyncio.wait_for(ask(), timeout))
    except Exception:
        return {}
    return identity if isinstance(identity, dict) else {}


def scheduler_answers(address: str, timeout: float = 5.0) -> bool:
    """A TCP connection to the scheduler's address opens: it is there (or its host is)."""
    url = urlsplit(address)
    if not url.hostname or not url.port:
        return False
    try:
        with socket.create_connection((url.hostname, url.port), timeout=timeout):
            return True
    except OSError:
        return False


def backend_names() -> tuple[str, ...]:
    """Names of every available backend, built-in and installed through entry points."""
    return tuple(sorted(_registry()))


def backend_exists(name: str) -> bool:
    # Built-ins first: scanning installed distributions for entry points costs milliseconds,
    # which DAG parsing should not pay for the common case.
    return name in BUILTIN or name in _registry()


def get_backend(name: str) -> ClusterBackend:
    target = _registry().get(name)
    if target is None:
        raise ClusterError(
            f"unknown cluster backend {name!r}; available: {', '.join(backend_names())}"
        )
    module, _, attr = target.partition(":")
    return getattr(import_module(module), attr)()


@cache
def _registry() -> dict[str, str]:
    found = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found
