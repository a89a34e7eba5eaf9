"""`dagfactory run`: one pipeline run in this process, with the semantics Airflow gives it.

The same steps as the Airflow tasks (`steps.py`), and the same rules around them: params are
typed and checked before anything starts, `timeout` bounds the run step, `retries` retry it on a
cluster that is ensured again (a lost one is replaced), and the cluster is torn down whatever
happens: an exception, Ctrl-C, SIGTERM, SIGHUP (a closed terminal), or a reader that went away
(`| head`). Teardown comes first and printing after, and no output error can skip it.

Each run step writes a Dask performance report, as the Airflow task does, and the paths are
printed at the end. On a terminal the entry point's Dask progress is one bar redrawn in place;
anywhere else it is the plain lines a task log gets.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dagfactory.errors import DagfactoryError, ParamError
from dagfactory.spec.params import check_values, parse_text
from dagfactory.spec.pipeline import PipelineSpec, StepSpec, parse_duration

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PROGRESS_LINE = re.compile(r"dask progress: (\d+)/(\d+) tasks done(?: \((.*)\))?")
"""The entry shim's progress line: on a terminal, `Terminal.entry` draws it as a bar."""
BAR_EVERY = 1.0
"""Seconds between progress updates on a terminal: a bar redrawn in place floods nothing."""
BAR_WIDTH = 24


class Interrupted(BaseException):
    """A stop signal arrived; like KeyboardInterrupt, no `except Exception` may swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunTimeout(DagfactoryError):
    """The run step took longer than the pipeline's `timeout`."""


@dataclass
class Terminal:
    """stderr and stdout that never raise: a closed or broken stream only stops the printing.

    With `bar` (stderr is a terminal), the entry point's progress lines become one line at
    the bottom, redrawn in place, until `end_bar`.
    """

    broken: bool = False
    bar: bool = False
    shown: str = ""
    """The progress bar on the screen now ("" when none)."""

    def err(self, text: str) -> None:
        if self.shown:
            self._write(sys.stderr, "\r\x1b[K", end="")
        self._write(sys.stderr, text)
        if self.shown:
            self._write(sys.stderr, self.shown, end="")

    def out(self, text: str) -> bool:
        """Print to stdout; False when it could not be delivered."""
        return self._write(sys.stdout, text)

    def entry(self, text: str) -> None:
        """The entry point's output: as it is, but progress lines as the bar on a terminal."""
        if not self.bar:
            self.err(text)
            return
        lines: list[str] = []
        for line in text.split("\n"):
            found = PROGRESS_LINE.fullmatch(line)
            if found is None:
                lines.append(line)
                continue
            if lines:
                self.err("\n".join(lines))
                lines = []
            self.shown = bar_text(*found.groups(), width=_columns())
            self._write(sys.stderr, f"\r{self.shown}\x1b[K", end="")
        if lines:
            self.err("\n".join(lines))

    def end_bar(self) -> None:
        """Leave the last state of the bar on its own line: the entry point has ended."""
        if self.shown:
            self.shown = ""
            self._write(sys.stderr, "")

    def _write(self, stream: Any, text: str, end: str = "\n") -> bool:
        if stream is None:
            return False
        try:
            stream.write(text + end)
            stream.flush()
            return True
        except OSError as exc:  # BrokenPipeError, EBADF on a closed descriptor, ...
            if exc.errno in (errno.EPIPE, errno.EBADF, errno.EIO) and not self.broken:
                self.broken = True
                # Python would complain again when it flushes the stream at exit.
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
            return False


def bar_text(done: str, total: str, kinds: str | None, width: int = 80) -> str:
    """The bar, `dask [#####-------] 120/400 tasks (count_words 100/300, ...)`, cut to width."""
    filled = BAR_WIDTH * int(done) // max(int(total), 1)
    text = f"dask [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done}/{total} tasks"
    if kinds:
        text += f" ({kinds})"
    return text if len(text) < width else text[: max(width - 4, 0)] + "..."


def _columns() -> int:
    try:  # a terminal that never said its size says 0
        return os.get_terminal_size(sys.stderr.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return 80


def parse_overrides(spec: PipelineSpec, pairs: list[str]) -> dict[str, Any]:
    """`-p name=value` pairs read by each param's type, then checked like a trigger's conf."""
    given: dict[str, Any] = {}
    specs = spec.param_specs
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name:
            raise ParamError(f"-p {pair!r}: write -p name=value")
        given[name] = parse_text(name, text, specs[name]) if name in specs else text
    return check_values(specs, given, spec.origin)


def render(params: dict[str, Any], dag_id: str, run_id: str) -> dict[str, Any]:
    """The Jinja rendering Airflow does at run time, with the macros a laptop run can know."""
    import jinja2

    context = run_context(params, dag_id, run_id)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)

    def one(name: str, value: Any) -> Any:
        if isinstance(value, str):
            try:
                return env.from_string(value).render(context)
            except jinja2.TemplateError as exc:
                raise ParamError(f"param {name!r}: cannot render {value!r}: {exc}") from None
        if isinstance(value, dict):
            return {k: one(name, v) for k, v in value.items()}
        if isinstance(value, list):
            return [one(name, v) for v in value]
        return value

    return {name: one(name, value) for name, value in params.items()}


def run_context(params: dict[str, Any], dag_id: str, run_id: str) -> dict[str, Any]:
    """What Jinja sees at run time, as far as a laptop run can know it."""
    now = datetime.now(UTC)
    return {
        "ds": now.strftime("%Y-%m-%d"),
        "ds_nodash": now.strftime("%Y%m%d"),
        "ts": now.isoformat(),
        "ts_nodash": now.strftime("%Y%m%dT%H%M%S"),
        "logical_date": now,
        "data_interval_start": now,
        "data_interval_end": now,
        "run_id": run_id,
        "dag": {"dag_id": dag_id},
        "params": params,
    }


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread while inside."""

    def raise_(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[list[int]]:
    """Stop signals are noted, not acted on, while inside (a teardown must finish)."""
    noted: list[int] = []
    previous = {
        s: signal.signal(s, lambda signum, frame: noted.append(signum)) for s in STOP_SIGNALS
    }
    try:
        yield noted
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise RunTimeout in the main thread after `seconds` (Airflow's execution_timeout)."""
    if not seconds:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise RunTimeout(f"the run step timed out after {seconds:g}s (timeout: in the file)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_pipeline(spec: PipelineSpec, overrides: list[str], worktree: bool = False) -> int:
    """Run the pipeline end to end here; returns the exit status. Prints its JSON result."""
    from dagfactory.run import steps
    from dagfactory.run.workspace import credentials_from_env

    term = Terminal(bar=_is_terminal(sys.stderr))
    params = parse_overrides(spec, overrides)
    run_id = f"cli_{datetime.now(UTC):%Y%m%dT%H%M%S}_{os.getpid()}"
    key = steps.run_key(spec.dag_id, run_id)
    params = render(params, spec.dag_id, run_id)
    credentials = credentials_from_env(spec.source.connection)
    started = time.monotonic()

    def step(name: str) -> None:
        term.err(f"[dagfactory] {name} ({time.monotonic() - started:.1f}s)")

    # Each stage's cluster key with the handles of the clusters started under it.
    clusters: dict[str | None, list[dict[str, Any]]] = {}
    outcome: BaseException | None = None
    result: Any = None
    try:
        with stop_signals_raise():
            step("bootstrap")
            boot = _bootstrap(spec, credentials, term, worktree)
            if not spec.staged:
                handles = clusters.setdefault(None, [])
                step(f"cluster_up (run key {key})")
                handles.append(steps.cluster_up(spec, boot, key, credentials, term.err))
                result = _run_with_retries(
                    spec, boot, key, run_id, params, credentials, handles, term, step
                )
            else:
                context = run_context(params, spec.dag_id, run_id)
                result = _run_stages(spec, boot, key, context, credentials, clusters, term, step)
    except (Exception, Interrupted, KeyboardInterrupt) as exc:
        outcome = exc
    finally:
        with stop_signals_held() as noted:
            for stage, handles in clusters.items():
                _teardown(spec, stage, key, handles, step)
            step("done")
        if noted and outcome is None:
            outcome = Interrupted(noted[0])
    from dagfactory.run.reports import run_reports

    for path in run_reports(spec.dag_id, run_id):
        term.err(f"Dask performance report: {path}")
    return _report(outcome, result, term)


def _is_terminal(stream: Any) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (OSError, ValueError):
        return False


def _teardown(
    spec: PipelineSpec, stage: str | None, key: str, handles: list[dict[str, Any]], step: Any
) -> None:
    from dagfactory.run import steps

    if not handles:
        return
    step("teardown" if stage is None else f"{stage}: teardown")
    steps.teardown(spec.for_stage(stage), steps.stage_key(key, stage), *handles)
    handles.clear()


def _run_stages(
    spec: PipelineSpec,
    boot: dict[str, Any],
    key: str,
    context: dict[str, Any],
    credentials: Any,
    clusters: dict[str | None, list[dict[str, Any]]],
    term: Terminal,
    step: Any,
) -> dict[str, Any]:
    """Every stage in order, one step at a time (a parallel group's steps one after the other
    here); each stage's cluster is torn down as soon as its last step is done. Returns
    {step: result}."""
    import jinja2

    from dagfactory.run import steps
    from dagfactory.spec.params import render_step_params

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    results: dict[str, Any] = {}
    for name in spec.stage_order():
        staged = spec.for_stage(name)
        stage_key = steps.stage_key(key, name)
        handles = clusters.setdefault(name, [])
        step(f"{name}: cluster_up ({stage_key})")
        handles.append(steps.cluster_up(staged, boot, stage_key, credentials, term.err))
        for step_name, step_spec in spec.stages[name].all_steps:
            params = render_step_params(step_spec.params, {**context, "steps": results}, env)
            results[step_name] = _run_with_retries(
                staged,
                boot,
                stage_key,
                context["run_id"],
                params,
                credentials,
                handles,
                term,
                step,
                step_spec,
                f"{name}.{step_name}",
            )
        _teardown(spec, name, key, handles, step)
    return results


def _bootstrap(spec: PipelineSpec, credentials: Any, term: Terminal, worktree: bool) -> dict:
    from dagfactory.run import steps

    if worktree:
        return steps.bootstrap_worktree(spec, term.err)
    boot = steps.bootstrap(spec, credentials, term.err)
    changed = steps.local_changes(spec)
    if changed:
        shown = ", ".join(changed[:5]) + (
            f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        )
        term.err(
            f"warning: {len(changed)} uncommitted change(s) in {spec.source.git} are not part of "
            f"this run ({shown}); it runs commit {boot['commit'][:12]}. Commit them, or run the "
            "working tree as it is with --worktree"
        )
    return boot


def _run_with_retries(
    spec: PipelineSpec,
    boot: dict[str, Any],
    key: str,
    run_id: str,
    params: dict[str, Any],
    credentials: Any,
    handles: list[dict[str, Any]],
    term: Terminal,
    step: Any,
    step_spec: StepSpec | None = None,
    task: str = "run",
) -> Any:
    """A run task (or a stage's step) with Airflow's retry semantics: each try ensures its
    cluster first, and writes its own performance report (try 1, 2, ... as Airflow counts)."""
    from dagfactory.run import steps
    from dagfactory.run.reports import report_path

    limit = (step_spec.timeout if step_spec else None) or spec.timeout
    timeout = parse_duration(limit).total_seconds() if limit else None
    retries = step_spec.retries if step_spec and step_spec.retries is not None else spec.retries
    delay = parse_duration(spec.retry_delay).total_seconds()
    entrypoint = step_spec.entrypoint if step_spec else ""
    for attempt in range(retries + 1):
        try:
            step(task if attempt == 0 else f"{task}, retry {attempt} of {retries}")
            handle = steps.ensure_cluster(spec, boot, key, handles[-1], credentials, term.err)
            if handle is not handles[-1]:
                handles.append(handle)
            report = report_path(spec.dag_id, run_id, task, attempt + 1)
            try:
                with time_limit(timeout):
                    return steps.run(
                        spec, boot, handle, params, key, credentials, term.entry, entrypoint,
                        report, BAR_EVERY if term.bar else None,
                    )  # fmt: skip
            finally:
                term.end_bar()
        except DagfactoryError as exc:
            if attempt == retries:
                raise
            wait = delay * (2**attempt if spec.retry_exponential_backoff else 1)
            term.err(f"[dagfactory] {task} failed ({_first_line(exc)}); retrying in {wait:g}s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _report(outcome: BaseException | None, result: Any, term: Terminal) -> int:
    """Print how the run ended, after teardown; returns the exit status."""
    if isinstance(outcome, Interrupted):
        term.err(f"dagfactory run: interrupted ({outcome}); the cluster was torn down")
        return 128 + outcome.signum
    if isinstance(outcome, KeyboardInterrupt):
        term.err("dagfactory run: interrupted; the cluster was torn down")
        return 128 + signal.SIGINT
    if outcome is not None:
        if not isinstance(outcome, DagfactoryError):
            raise outcome
        term.err(f"dagfactory run: error: {outcome}")
        return 1
    if not term.out(json.dumps(result, allow_nan=False)):
        term.err("dagfactory run: the result could not be printed (stdout is closed)")
        return 1
    return 0
