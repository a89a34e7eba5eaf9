"""The dagfactory plugin of Airflow's api-server: each run task's Dask performance report.

A run's Dask dashboard goes away with its cluster; the report (`run/reports.py`) is a file under
DAGFACTORY_HOME that the run task writes when its entry point ends. This plugin serves those
files at /dagfactory/reports/<dag>/<run>/<task>/<try>, where the run task's "Dask report" link
points, behind Airflow's own auth: the api-server's `requires_access_dag` check, the one its
REST API puts in front of task instances, so whoever may see the task may see its report.

Airflow loads plugins in every one of its processes (scheduler, DAG processor, task runners),
but only the api-server serves the app; it is built on its first request, so that the others
never import FastAPI and the api-server's security module (over a second on this machine),
nor dagfactory's run side.
"""

from __future__ import annotations

import html
from typing import Any
from urllib.parse import quote, urlsplit

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/dagfactory"
# The report is a page Dask wrote, with scripts (Bokeh, inline: mode="inline"). Served from
# Airflow's own origin, a sandbox keeps those scripts from acting as the person who opened it
# (no cookies, no API), and the page may load nothing from elsewhere (Dask's favicon would be
# fetched from docs.dask.org).
REPORT_HEADERS = {
    "Content-Security-Policy": "sandbox allow-scripts allow-popups; default-src 'none'; "
    "script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
    "img-src data: blob:; font-src data:",
    "Cache-Control": "private, no-cache",
    "X-Content-Type-Options": "nosniff",
}


def report_url(dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
    """Where the api-server serves the report of one try of a task: a path on Airflow's own
    origin (under [api] base_url's path, where the api-server mounts everything)."""
    from airflow.configuration import conf

    root = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
    parts = "/".join(quote(part, safe="") for part in (dag_id, run_id, task_id))
    return f"{root}{URL_PREFIX}/reports/{parts}/{int(try_number)}"


def reports_app() -> Any:
    """The FastAPI app of the reports (imports FastAPI and the api-server's security)."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

    from dagfactory.run.reports import report_path

    app = FastAPI(title="dagfactory reports", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def log_in_first(request: Request, exc: HTTPException) -> Any:
        """A person whose session is missing or expired goes to the login page, and back here
        after it, as Airflow's own pages do; an API client gets the plain 401."""
        if exc.status_code == 401 and "text/html" in request.headers.get("accept", ""):
            from airflow.api_fastapi.app import get_auth_manager

            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)))
        return await http_exception_handler(request, exc)

    # The dag_id path parameter is the DAG whose access the check asks the auth manager for.
    may_read = Depends(requires_access_dag("GET", DagAccessEntity.TASK_INSTANCE))

    @app.get("/reports/{dag_id}/{run_id}/{task_id}/{try_number}", dependencies=[may_read])
    def report(dag_id: str, run_id: str, task_id: str, try_number: int) -> Any:
        path = report_path(dag_id, run_id, task_id, try_number)
        if not path.is_file():
            page = missing_page(dag_id, run_id, task_id, try_number)
            return HTMLResponse(page, status_code=404)
        return FileResponse(path, media_type="text/html", headers=REPORT_HEADERS)

    return app


def missing_page(dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
    """The 404 page: says which report is missing, why that happens, and which tries have one."""
    from dagfactory.run.reports import report_path

    folder = report_path(dag_id, run_id, task_id, try_number).parent
    tries = sorted(
        int(p.stem.removeprefix("try-"))
        for p in (folder.glob("try-*.html") if folder.is_dir() else ())
        if p.stem.removeprefix("try-").isdigit()
    )
    others = "".join(f'<li><a href="{n}">try {n}</a></li>' for n in tries if n != int(try_number))
    other_tries = f"<p>Reports of other tries of this task:</p><ul>{others}</ul>" if others else ""
    what = html.escape(f"{dag_id} / {run_id} / {task_id}, try {try_number}")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>No Dask report yet</title>
<style>body {{ font-family: sans-serif; max-width: 42em; margin: 3em auto; line-height: 1.5 }}
code {{ background: #f3f3f3; padding: 0 .2em }}</style></head>
<body><h1>No Dask report (yet)</h1>
<p>There is no Dask performance report for <code>{what}</code>.</p>
<p>The run task writes it when its entry point ends, so a task that is still running has none
yet; a try that failed before the entry point was called (no cluster, a broken checkout) has
{other_tries}</body></html>
"""


class ReportsApp:
    """The reports app as an ASGI app that builds the FastAPI one on its first request."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._app is None:
            self._app = reports_app()
        await self._app(scope, receive, send)


class DagfactoryPlugin(AirflowPlugin):
    """Registered through the `airflow.plugins` entry point (pyproject.toml)."""

    name = "dagfactory"
    fastapi_apps = [
        {"app": ReportsApp(), "url_prefix": URL_PREFIX, "name": "dagfactory: Dask reports"}
    ]
