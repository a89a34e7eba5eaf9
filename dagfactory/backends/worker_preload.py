"""Preloaded into each worker of a `local` cluster (`dask worker --preload`): wait for the
scheduler with short, steady polls before the worker first tries to register.

Workers start at the same time as the scheduler. Left alone, a worker that finds no scheduler
yet retries with exponential backoff, and an unlucky draw makes it sleep seconds after the
scheduler is up; this keeps cluster start-up close to the slower of the two imports.
Runs inside the pipeline's virtualenv: standard library only.
"""

import asyncio
import os
import time
import urllib.request

HEALTH_VARIABLE = "DAGFACTORY_SCHEDULER_HEALTH"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


async def dask_setup(worker) -> None:
    url = os.environ.get(HEALTH_VARIABLE)
    deadline = time.monotonic() + 60
    while url and time.monotonic() < deadline:
        if await asyncio.to_thread(_healthy, url):
            return
        await asyncio.sleep(0.02)
