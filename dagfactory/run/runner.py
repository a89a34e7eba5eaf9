"""Call the pipeline's entry point in a subprocess of its virtualenv.

The subprocess runs `entry_shim.py`, which imports nothing from Airflow. Its output reaches
`output` (the task log) in chunks of whole lines: one call per burst rather than per line,
because each call becomes one structured record in Airflow's log, which is what made chatty
entry points slow. Its JSON result comes back through a file so that whatever the user prints
cannot corrupt it.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dagfactory.errors import EntrypointError
from dagfactory.run.workspace import Workspace

SHIM = Path(__file__).with_name("entry_shim.py")
# Variables of the host interpreter that would make the pipeline's interpreter load the wrong
# packages.
_HOST_ONLY = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")

FLUSH_INTERVAL = 0.15
"""Seconds a line may wait for more lines before it is handed to `output`."""
FLUSH_BYTES = 64 * 1024
"""Most bytes read at once, and the size at which a chunk is handed on without waiting."""
STOP_GRACE = 10.0
"""Seconds a stopped entry point gets to write its performance report and remove its code upload
before it is killed."""
CHECK_TIMEOUT = 300.0
PROGRESS_EVERY = 10.0
"""Seconds between the entry point's Dask progress lines (at most; only when changed). The
variable DAGFACTORY_PROGRESS_EVERY sets another default; 0 turns the lines off."""
_PR_SET_PDEATHSIG = 1


def _env(key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _HOST_ONLY}
    env["PYTHONUNBUFFERED"] = "1"
    if key:
        from dagfactory.backends.local import KEY_VARIABLE, cluster_dir

        # The same marker as the cluster's processes: a census or teardown by key finds the
        # entry point too, and whatever processes it starts.
        env[KEY_VARIABLE] = str(cluster_dir(key))
    return env


def check_entrypoint(workspace: Workspace, entrypoint: str) -> None:
    """Import `module:function` in the pipeline's virtualenv, without a cluster.

    Called before any cluster starts, so that a typo or an import error costs seconds, not a
    cluster start; raises EntrypointError with one line that says what to fix.
    """
    with tempfile.TemporaryDirectory(prefix="dagfactory-check-") as tmp:
        error = Path(tmp) / "error.json"
        cmd = [
            str(workspace.python), str(SHIM), "--check",
            "--entrypoint", entrypoint,
            "--code-dir", str(workspace.code_dir),
            "--error", str(error),
        ]  # fmt: skip
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                cwd=workspace.code_dir,
                env=_env(""),
                text=True,
                errors="replace",
                timeout=CHECK_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise EntrypointError(
                f"entrypoint {entrypoint}: importing it took more than {CHECK_TIMEOUT:.0f}s; "
                "move slow work from import time into the function"
            ) from None
        if proc.returncode != 0:
            raise _failure(entrypoint, proc.returncode, error, proc.stdout + proc.stderr)


def run_entrypoint(
    workspace: Workspace,
    entrypoint: str,
    params: dict[str, Any],
    scheduler_address: str,
    output: Callable[[str], None] = print,
    key: str = "",
    keepalive: float = 0.0,
    cluster_env: dict[str, str] | None = None,
    report: Path | None = None,
    progress_every: float | None = None,
) -> Any:
    """Run `entrypoint(client, **params)` against the scheduler; return its JSON result.

    `output` gets the entry point's stdout and stderr, in order, as text of one or more whole
    lines (without the last newline), and the shim's "dask progress: ..." lines among them.
    `key` is the run's cluster key: the entry point's process carries the cluster's marker,
    so that teardown finds it. `keepalive`: seconds between the tiny tasks that keep a cluster
    with an idle timeout from stopping while the entry point runs (0: none). `cluster_env`:
    what a client of the cluster needs in its environment (its TLS settings, say). `report`:
    where to write Dask's performance report of the call (also when it fails; None: none).
    `progress_every`: seconds between progress lines (None: PROGRESS_EVERY, 0: none).

    The entry point's process dies with this thread: Linux's parent-death signal fires when
    the thread that forked it ends, and this thread waits for it to the end.
    """
    with tempfile.TemporaryDirectory(prefix="dagfactory-run-") as tmp:
        files = {name: Path(tmp) / f"{name}.json" for name in ("params", "result", "error")}
        files["params"].write_text(json.dumps(params))
        cmd = [
            str(workspace.python), str(SHIM),
            "--scheduler", scheduler_address,
            "--entrypoint", entrypoint,
            "--code-dir", str(workspace.code_dir),
            "--keepalive", str(keepalive),
            "--progress", str(_progress_every() if progress_every is None else progress_every),
            *(arg for name, path in files.items() for arg in (f"--{name}", str(path))),
            *(("--report", str(report)) if report else ()),
        ]  # fmt: skip
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=workspace.code_dir,
            env={**_env(key), **(cluster_env or {})},
            bufsize=0,
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
        try:
            assert proc.stdout is not None
            _stream(proc.stdout.fileno(), output)
            code = proc.wait()
        finally:
            # A task timeout or kill lands here while the entry point still runs: stop it
            # too, with a moment to remove its code upload from the cluster.
            if proc.poll() is None:
                _stop(proc)
            proc.stdout.close()
        if code != 0:
            raise _failure(entrypoint, code, files["error"])
        return json.loads(files["result"].read_text(), parse_constant=_not_json)


def _progress_every() -> float:
    text = os.environ.get("DAGFACTORY_PROGRESS_EVERY", "")
    try:
        return float(text) if text else PROGRESS_EVERY
    except ValueError:
        raise EntrypointError(
            f"DAGFACTORY_PROGRESS_EVERY={text!r}: write the seconds between progress lines "
            "(0: none)"
        ) from None


def _not_json(name: str) -> None:
    raise EntrypointError(f"the entry point's result holds {name}, which is not JSON")


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGKILL when the forking thread dies (Linux).

    libc is loaded here, before the fork: the child must not import or lock anything.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent, kill = os.getpid(), int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, kill)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _stream(fd: int, output: Callable[[str], None]) -> None:
    """Hand everything read from fd to output: whole lines, complete and in order.

    A chunk goes out when FLUSH_INTERVAL has passed since its first byte arrived or when it
    reaches FLUSH_BYTES, so a burst of lines becomes a few calls and a slow trickle still
    shows line by line. A line without its newline waits for it (or for FLUSH_BYTES, or the
    end), so that no line is ever cut in two records.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = bytearray()
    since = 0.0  # when the oldest byte of `pending` not yet offered to output arrived

    def emit(data: bytes, final: bool = False) -> None:
        text = decoder.decode(data, final).replace("\r\n", "\n").replace("\r", "\n")
        if text:
            output(text.removesuffix("\n"))

    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            wait = None if not pending else max(0.0, since + FLUSH_INTERVAL - time.monotonic())
            if selector.select(wait):
                data = os.read(fd, FLUSH_BYTES)
                if not data:
                    break
                if not pending:
                    since = time.monotonic()
                pending += data
            now = time.monotonic()
            if pending and (len(pending) >= FLUSH_BYTES or now - since >= FLUSH_INTERVAL):
                cut = pending.rfind(b"\n") + 1
                if cut == 0 and len(pending) >= FLUSH_BYTES:
                    cut = len(pending)  # one very long line: better in pieces than held
                if cut:
                    emit(bytes(pending[:cut]))
                    del pending[:cut]
                since = now
    emit(bytes(pending), final=True)


def _failure(entrypoint: str, code: int, error_file: Path, printed: str = "") -> EntrypointError:
    """One line: the traceback, if any, was printed once, to the log, by the shim."""
    try:
        error = json.loads(error_file.read_text())
    except (OSError, ValueError):
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"
        tail = f": {printed.strip().splitlines()[-1]}" if printed.strip() else " (see above)"
        return EntrypointError(f"{entrypoint}: its process {how}{tail}")
    if error["type"] in ("problem", "stopped"):
        return EntrypointError(error["message"])
    message = f": {error['message']}" if error["message"] else ""
    if printed:  # --check captures the output: it goes into the message, not a log
        return EntrypointError(f"{entrypoint}: {error['type']}{message}")
    return EntrypointError(f"{entrypoint} raised {error['type']}{message}; traceback above")
