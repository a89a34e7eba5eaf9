"""Call the pipeline's entry point in a subprocess of its virtualenv.

The subprocess runs `entry_shim.py`, which imports nothing from Airflow; its output is streamed
line by line to `output` (the task log), and its JSON result comes back through a file so that
whatever the user prints cannot corrupt it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dagfactory.errors import EntrypointError
from dagfactory.workspace import Workspace

SHIM = Path(__file__).with_name("entry_shim.py")
# Variables of the host interpreter that would make the pipeline's interpreter load the wrong
# packages.
_HOST_ONLY = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")


def run_entrypoint(
    workspace: Workspace,
    entrypoint: str,
    params: dict[str, Any],
    scheduler_address: str,
    output: Callable[[str], None] = print,
) -> Any:
    """Run `entrypoint(client, **params)` against the scheduler; return its JSON result."""
    with tempfile.TemporaryDirectory(prefix="dagfactory-run-") as tmp:
        files = {name: Path(tmp) / f"{name}.json" for name in ("params", "result", "error")}
        files["params"].write_text(json.dumps(params))
        env = {k: v for k, v in os.environ.items() if k not in _HOST_ONLY}
        env["PYTHONUNBUFFERED"] = "1"
        cmd = [
            str(workspace.python), str(SHIM),
            "--scheduler", scheduler_address,
            "--entrypoint", entrypoint,
            "--code-dir", str(workspace.code_dir),
            *(arg for name, path in files.items() for arg in (f"--{name}", str(path))),
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=workspace.code_dir,
            env=env,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                output(line.rstrip("\n"))
            code = proc.wait()
        finally:
            # A task timeout or kill lands here while the entry point still runs: stop it too.
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if code != 0:
            raise _failure(entrypoint, code, files["error"])
        return json.loads(files["result"].read_text())


def _failure(entrypoint: str, code: int, error_file: Path) -> EntrypointError:
    try:
        error = json.loads(error_file.read_text())
    except (OSError, ValueError):
        return EntrypointError(f"{entrypoint} exited with code {code} (see the output above)")
    return EntrypointError(
        f"{entrypoint} raised {error['type']}: {error['message']}\n{error['traceback']}".rstrip()
    )
