"""Runs inside the pipeline's virtualenv: connect to Dask, call the entry point, save its result.

This file is executed as a script by the pipeline's own interpreter, where neither Airflow nor
dagfactory is installed, so it imports only the standard library and Dask. With `--check` it only
imports the entry point (no Dask client), so that a typo fails the run before a cluster starts.

Whatever goes wrong is written to the `--error` file as one actionable line; a traceback, when
there is one worth reading, is printed once, to the output the runner streams to the task log.

While the entry point runs, a thread prints how far the cluster's work is (`--progress`
seconds apart, only when it changed), and with `--report` the call is wrapped in Dask's
performance report, written whether the entry point returns or raises.
"""

import argparse
import contextlib
import difflib
import hashlib
import html
import importlib
import inspect
import json
import math
import os
import pathlib
import pkgutil
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
import zipfile

SHIM_FILE = os.path.abspath(__file__)
MAX_NAMES = 12
PROGRESS_KINDS = 6
"""Most kinds of task (key prefixes) a progress line names; the busiest ones."""
OWN_PREFIX = "dagfactory-"
"""Key prefix of the tasks the shim itself submits: not the pipeline's work, never counted."""
REPORT_TIMEOUT = 120.0
"""Seconds the scheduler gets to build the performance report (a stopped run: STOP_REPORT,
inside the runner's grace, so that the code upload is still removed after it)."""
STOP_REPORT = 6.0
PROBE_TIMEOUT = 10.0
"""Seconds to wait for the scheduler's answer before a report or a last progress line."""


class Problem(Exception):
    """A mistake dagfactory can explain in one line: no traceback is worth printing."""


class Stopped(BaseException):
    """SIGTERM: the task is being stopped. Unwinds the call so the code upload is removed."""


def _stop(signum, frame):
    raise Stopped("the entry point was stopped (SIGTERM: the task was killed or timed out)")


def _first_line(text: str) -> str:
    lines = [line for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] + (" ..." if len(lines) > 1 else "")


def _names_in(path: list[str]) -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(path) if not m.name.startswith("_"))


def _shown(names: list[str]) -> str:
    return ", ".join(names[:MAX_NAMES]) + (" ..." if len(names) > MAX_NAMES else "")


def _suggest(name: str, candidates: list[str], kind: str) -> str:
    """A did-you-mean, else the candidates: the fix is then in the message itself."""
    close = difflib.get_close_matches(name, candidates, n=1)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; {kind}: {_shown(candidates) if candidates else 'none'}"


def _user_frame(exc: BaseException, code_dir: str) -> str:
    """`file:line` of the innermost frame in the pipeline's code, for a one-line message."""
    root = os.path.abspath(code_dir)
    if isinstance(exc, SyntaxError) and exc.filename:
        frames = [(exc.filename, exc.lineno)]
    else:
        frames = [(f.filename, f.lineno) for f in traceback.extract_tb(exc.__traceback__)]
    inside = [(f, n) for f, n in frames if os.path.abspath(f).startswith(root + os.sep)]
    for filename, lineno in reversed(inside or frames):
        if os.path.abspath(filename) != SHIM_FILE:
            return f"{os.path.relpath(filename, root) if inside else filename}:{lineno}"
    return ""


def load(entrypoint: str, code_dir: str):
    """Import `module:function` and return the function; Problem says what is wrong if not."""
    module_name, _, function_name = entrypoint.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            parent = missing.rpartition(".")[0]
            path = getattr(sys.modules.get(parent), "__path__", None) if parent else [code_dir]
            names = [f"{parent}.{n}" if parent else n for n in _names_in(path or [])]
            hint = _suggest(missing, names, "modules there" if parent else "its modules")
            raise Problem(
                f"entrypoint {entrypoint}: no module {missing!r} in the code folder {code_dir} "
                f"(source.subdir){hint}"
            ) from None
        raise Problem(
            f"entrypoint {entrypoint}: importing {module_name} failed: No module named "
            f"{missing!r} (at {_user_frame(exc, code_dir)}); add the package that provides it "
            "to source.requirements"
        ) from None
    except Exception as exc:
        raise Problem(
            f"entrypoint {entrypoint}: importing {module_name} raised {type(exc).__name__}: "
            f"{_first_line(exc)} (at {_user_frame(exc, code_dir)})"
        ) from None
    function = getattr(module, function_name, None)
    if not callable(function):
        functions = sorted(
            name
            for name, obj in vars(module).items()
            if inspect.isfunction(obj) and obj.__module__ == module.__name__
            and not name.startswith("_")
        )  # fmt: skip
        what = "has no function" if function is None else "has a non-callable"
        raise Problem(
            f"entrypoint {entrypoint}: module {module_name!r} {what} {function_name!r}"
            + _suggest(function_name, functions, "its functions")
        )
    return function


def _ship_code(client, code_dir: str) -> str:
    """Upload the repository's Python packages and modules to the scheduler and every worker.

    Dask pickles functions by reference and, since 2024, the scheduler unpickles task graphs:
    both need to import the pipeline's code. A cluster that never saw the repository (an
    existing one, or one in the cloud) gets it this way, and so does every worker that joins
    while the entry point runs. Returns the plugins' name, for `_unship_code`.
    """
    from distributed.diagnostics.plugin import SchedulerUploadFile, UploadFile

    root = pathlib.Path(code_dir)
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    folder = pathlib.Path(tempfile.mkdtemp(prefix="dagfactory-code-"))
    # Named by code folder (so by commit): a worker puts the file on its sys.path once.
    archive = folder / f"dagfactory_code_{digest}.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(root.iterdir()):
            if path.name.startswith(".") or path.name == "__pycache__":
                continue
            if path.suffix == ".py" and path.is_file():
                zf.write(path, path.name)
            elif path.is_dir() and (path / "__init__.py").is_file():
                for item in sorted(path.rglob("*")):
                    if item.is_file() and "__pycache__" not in item.parts:
                        zf.write(item, item.relative_to(root).as_posix())
    # One name per run, so that two runs sharing a cluster never remove each other's upload.
    name = f"dagfactory-code-{digest}-{uuid.uuid4().hex[:12]}"
    try:
        client.register_plugin(SchedulerUploadFile(str(archive), load=True), name=name)
        client.register_plugin(UploadFile(str(archive), load=True), name=name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return name


def _unship_code(client, name: str) -> None:
    """Remove the upload plugins, so that a shared cluster is left as the run found it.

    Otherwise every run adds one more plugin to the scheduler, and every worker that joins
    later replays all of them. A client that lost its scheduler skips this: the plugins went
    with that scheduler, and waiting for a reconnection would only delay the retry that
    replaces it.
    """
    if client.status != "running":
        return
    for unregister in (client.unregister_scheduler_plugin, client.unregister_worker_plugin):
        try:
            unregister(name)
        except Exception as exc:
            print(
                f"dagfactory: warning: could not remove the code upload {name} from the "
                f"cluster: {type(exc).__name__}: {_first_line(exc)}",
                file=sys.stderr,
            )


def _call(args: argparse.Namespace) -> object:
    function = load(args.entrypoint, args.code_dir)
    with open(args.params) as f:
        params = json.load(f)
    try:  # before connecting: a wrong param is a one-line mistake, not a traceback
        inspect.signature(function).bind(None, **params)
    except TypeError as exc:
        raise Problem(f"entrypoint {args.entrypoint}: {exc}; check the pipeline's params") from None
    except ValueError:
        pass  # no signature to check (a builtin): the call itself will say
    from distributed import Client

    try:
        client = Client(args.scheduler, timeout=60)
    except OSError as exc:
        raise Problem(
            f"cannot connect to the Dask scheduler at {args.scheduler}: {_first_line(exc)}"
        ) from None
    with client:
        name = _ship_code(client, args.code_dir)
        if args.keepalive:
            threading.Thread(target=_keep_busy, args=(client, args.keepalive), daemon=True).start()
        try:
            with (
                _performance_report(client, args.report, function),
                _progress(client, args.progress),
            ):
                return function(client, **params)
        finally:
            _unship_code(client, name)


def _keep_busy(client, every: float) -> None:
    """Give the scheduler a tiny task now and then, so that its idle timeout, the backstop for
    a lost teardown, never stops the cluster while the entry point does non-Dask work. This
    process dies with its task (parent-death signal), so it cannot keep a cluster alive longer.
    """
    while True:
        time.sleep(every)
        try:  # a builtin (the scheduler can unpickle it), under a key progress leaves out
            client.submit(int, pure=False, key=f"{OWN_PREFIX}keepalive-{uuid.uuid4().hex}")
        except Exception:
            return  # the client is closing or gone: nothing left to keep busy


class _performance_report:
    """Dask's performance report of the call, written to `path` however the call ends.

    Written to a temporary file beside it and renamed, so that whoever serves the reports
    never sees half of one. The report is self-contained (Bokeh inline): it is read long after
    the cluster is gone, maybe where no CDN can be reached. Its "calling code" is the entry
    point's source. A report that cannot be made is a warning: it never fails a run, nor hides
    the entry point's own error.
    """

    def __init__(self, client, path: str | None, function) -> None:
        self.client, self.path, self.function = client, path, function
        self.report = None

    def __enter__(self):
        if not self.path:
            return self
        from distributed import performance_report

        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.tmp = os.path.join(
            os.path.dirname(self.path), f".{os.path.basename(self.path)}.{os.getpid()}.tmp"
        )
        report = performance_report(filename=self.tmp, mode="inline")
        try:
            self.client.sync(report.__aenter__, callback_timeout=REPORT_TIMEOUT)
        except Exception as exc:
            self._warn(exc)
        else:
            self.report = report
        return self

    def __exit__(self, kind, value, tb) -> None:
        if self.report is None:
            return
        if _lost(self.client, value):  # waiting for a lost scheduler only delays the retry
            self._warn(ConnectionError("the scheduler is gone"))
            return
        try:
            source = inspect.getsource(self.function)
        except (OSError, TypeError):
            source = "<the entry point's source is not available>"
        timeout = STOP_REPORT if kind is Stopped else REPORT_TIMEOUT
        try:
            # Refused connections are retried for Dask's connect timeout: ask once, briefly.
            self.client.sync(self.client.scheduler.identity, callback_timeout=PROBE_TIMEOUT)
            # Dask puts the code into the page as it is: escaped, a `<` in it stays text.
            self.client.sync(
                self.report.__aexit__, kind, value, tb, code=html.escape(source),
                callback_timeout=timeout,
            )  # fmt: skip
            os.replace(self.tmp, self.path)
        except Exception as exc:
            self._warn(exc)
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)

    def _warn(self, exc: BaseException) -> None:
        print(
            f"dagfactory: warning: no Dask performance report for this run: "
            f"{type(exc).__name__}: {_first_line(exc) or 'no details'}",
            file=sys.stderr,
            flush=True,
        )


def _lost(client, error: BaseException | None) -> bool:
    """Whether the call ended because the client lost its scheduler (a retry replaces it)."""
    from distributed.comm import CommClosedError

    return isinstance(error, CommClosedError) or client.status != "running"


def _task_counts(dask_scheduler) -> dict:
    """Runs on the scheduler: per key prefix, [tasks finished ever, tasks waiting to finish].

    Read from the counters the scheduler keeps per prefix anyway (what its dashboard's
    progress shows), so a look costs one pass over the prefixes, not over the tasks.
    """
    waiting = ("released", "waiting", "queued", "processing", "no-worker")
    counts = {}
    for name, prefix in dask_scheduler.task_prefixes.items():
        done = prefix.state_counts.get("memory", 0) + prefix.state_counts.get("erred", 0)
        counts[str(name)] = [done, sum(prefix.states.get(state, 0) for state in waiting)]
    return counts


def progress_line(start: dict, now: dict) -> str:
    """The line `dask progress: 120/400 tasks done (count_words 100/300, merge 20/100)`,
    counting what happened since `start`; "" when no task of the pipeline's ran since."""
    kinds = []
    for name, (done, waiting) in now.items():
        done -= start.get(name, [0, 0])[0]
        if name.startswith(OWN_PREFIX) or done + waiting <= 0:
            continue
        kinds.append((name, max(done, 0), max(done, 0) + waiting))
    if not kinds:
        return ""
    done, total = sum(k[1] for k in kinds), sum(k[2] for k in kinds)
    busiest = sorted(kinds, key=lambda k: -k[2])[:PROGRESS_KINDS]
    shown = [f"{name} {d}/{t}" for name, d, t in kinds if (name, d, t) in busiest]
    more = ", ..." if len(kinds) > PROGRESS_KINDS else ""
    return f"dask progress: {done}/{total} tasks done ({', '.join(shown)}{more})"


class _progress:
    """A thread printing `progress_line` every `every` seconds while the call runs, when it
    changed, and once at the end if the last line printed is not the final count."""

    def __init__(self, client, every: float) -> None:
        self.client, self.every = client, every
        self.finished = threading.Event()
        self.thread = None

    def __enter__(self):
        if self.every <= 0:
            return self
        try:
            start = self.client.run_on_scheduler(_task_counts)
        except Exception as exc:
            print(f"dagfactory: no Dask progress: {_first_line(exc)}", file=sys.stderr)
            return self
        self.thread = threading.Thread(target=self._watch, args=(start,), daemon=True)
        self.thread.start()
        return self

    def __exit__(self, kind, value, tb) -> None:
        if self.thread is not None:
            self.finished.set()
            if not _lost(self.client, value):  # else its last look would wait in vain
                self.thread.join(timeout=0.5 if kind is Stopped else PROBE_TIMEOUT)

    def _watch(self, start: dict) -> None:
        shown = ""
        while True:
            last = self.finished.wait(self.every)
            try:
                line = progress_line(start, self.client.run_on_scheduler(_task_counts))
            except Exception:
                return  # the scheduler is gone or the client closing: the call will say
            if line and line != shown:
                # One write per line: the entry point prints from another thread.
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
                shown = line
            if last:
                return


def _path(path: str, key) -> str:
    return f"{path}[{json.dumps(key) if isinstance(key, str) else repr(key)}]"


def _nulled(value, path: str, found: list[str]):
    """The value with NaN and infinities replaced by None; their paths appended to found."""
    if isinstance(value, float) and not math.isfinite(value):
        found.append(path)
        return None
    if isinstance(value, dict):
        return {k: _nulled(v, _path(path, k), found) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_nulled(v, _path(path, i), found) for i, v in enumerate(value)]
    return value


def to_json(result) -> str:
    """The result as strict JSON (RFC 8259): NaN and infinities become null, with a warning.

    A result is a summary of work already done; failing the task for a NaN in it would make
    Airflow redo all of that work for a value JSON cannot hold. null is what JavaScript's
    JSON.stringify and pandas' to_json write for them too.
    """
    try:
        json.dumps(result)
    except (TypeError, ValueError, RecursionError) as exc:
        raise Problem(
            f"the entry point returned a {type(result).__name__}, which is not JSON "
            f"({_first_line(exc)}); return a dict, list, string, number or None"
        ) from None
    found: list[str] = []
    text = json.dumps(_nulled(result, "result", found), allow_nan=False)
    if found:
        print(
            "dagfactory: warning: the result holds NaN or Infinity, which JSON cannot "
            f"represent; written as null at {_shown(found)}",
            file=sys.stderr,
            flush=True,
        )
    return text


def _print_traceback(exc: BaseException) -> None:
    """The traceback from the first frame that is not this file's: the user's code first."""
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) == SHIM_FILE:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _write_error(path: str, kind: str, message: str) -> None:
    with open(path, "w") as f:
        json.dump({"type": kind, "message": message}, f)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="only import the entry point")
    parser.add_argument("--scheduler")
    parser.add_argument("--entrypoint", required=True)
    parser.add_argument("--code-dir", required=True)
    parser.add_argument("--params")
    parser.add_argument("--keepalive", type=float, default=0.0)
    parser.add_argument("--progress", type=float, default=0.0, help="seconds between lines")
    parser.add_argument("--report", help="where to write Dask's performance report")
    parser.add_argument("--result")
    parser.add_argument("--error", required=True)
    args = parser.parse_args()
    sys.path.insert(0, args.code_dir)
    signal.signal(signal.SIGTERM, _stop)
    try:
        if args.check:
            load(args.entrypoint, args.code_dir)
            return 0
        text = to_json(_call(args))
    except Problem as exc:
        _write_error(args.error, "problem", str(exc))
        return 1
    except Stopped as exc:
        _write_error(args.error, "stopped", str(exc))
        return 1
    except BaseException as exc:
        sys.stdout.flush()
        _print_traceback(exc)
        sys.stderr.flush()
        _write_error(args.error, type(exc).__name__, _first_line(exc))
        return 1
    with open(args.result, "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
