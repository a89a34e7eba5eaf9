"""`existing`: a Dask scheduler that someone else runs and keeps running.

`up` only checks that the scheduler answers; `down` leaves it alone, because stopping a shared
cluster is not this run's decision.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from dagfactory.backends import ClusterContext, ClusterHandle
from dagfactory.errors import ClusterError
from dagfactory.spec import ClusterSpec

CONNECT_TIMEOUT = 10.0


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
        return ClusterHandle("existing", context.key, spec.address)

    def down(self, handle: ClusterHandle) -> None:
        return None
