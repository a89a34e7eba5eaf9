"""`dagfactory run`: one pipeline run in this process, with the semantics Airflow gives it.

The same steps as the Airflow tasks (`steps.py`), and the same rules around them: params are
typed and checked before anything starts, `timeout` bounds the run step, `retries` retry it on a
cluster that is ensured again (a lost one is replaced), and the cluster is torn down whatever
happens: an exception, Ctrl-C, SIGTERM, SIGHUP (a closed terminal), or a reader that went away
(`| head`). Teardown comes first and printing after, and no output error can skip it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from dagfactory.errors import DagfactoryError, ParamError
from dagfactory.params import check_values, parse_text
from dagfactory.spec import PipelineSpec, parse_duration

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal arrived; like KeyboardInterrupt, no `except Exception` may swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunTimeout(DagfactoryError):
    """The run step took longer than the pipeline's `timeout`."""


@dataclass
class Terminal:
    """stderr and stdout that never raise: a closed or broken stream only stops the printing."""

    broken: bool = False

    def err(self, text: str) -> None:
        self._write(sys.stderr, text)

    def out(self, text: str) -> bool:
        """Print to stdout; False when it could not be delivered."""
        return self._write(sys.stdout, text)

    def _write(self, stream: Any, text: str) -> bool:
        if stream is None:
            return False
        try:
            stream.write(text + "\n")
            stream.flush()
            return True
        except OSError as exc:  # BrokenPipeError, EBADF on a closed descriptor, ...
            if exc.errno in (errno.EPIPE, errno.EBADF, errno.EIO) and not self.broken:
                self.broken = True
                # Python would complain again when it flushes the stream at exit.
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
            return False


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

    now = datetime.now(UTC)
    context = {
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
    from dagfactory import steps
    from dagfactory.workspace import credentials_from_env

    term = Terminal()
    params = parse_overrides(spec, overrides)
    run_id = f"cli_{datetime.now(UTC):%Y%m%dT%H%M%S}_{os.getpid()}"
    key = steps.run_key(spec.dag_id, run_id)
    params = render(params, spec.dag_id, run_id)
    credentials = credentials_from_env(spec.source.connection)
    started = time.monotonic()

    def step(name: str) -> None:
        term.err(f"[dagfactory] {name} ({time.monotonic() - started:.1f}s)")

    handles: list[dict[str, Any]] = []
    outcome: BaseException | None = None
    result: Any = None
    try:
        with stop_signals_raise():
            step("bootstrap")
            boot = _bootstrap(spec, credentials, term, worktree)
            step(f"cluster_up (run key {key})")
            handles.append(steps.cluster_up(spec, boot, key, credentials, term.err))
            result = _run_with_retries(spec, boot, key, params, credentials, handles, term, step)
    except (Exception, Interrupted, KeyboardInterrupt) as exc:
        outcome = exc
    finally:
        with stop_signals_held() as noted:
            step("teardown")
            steps.teardown(spec, key, *handles)
            step("done")
        if noted and outcome is None:
            outcome = Interrupted(noted[0])
    return _report(outcome, result, term)


def _bootstrap(spec: PipelineSpec, credentials: Any, term: Terminal, worktree: bool) -> dict:
    from dagfactory import steps

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
    params: dict[str, Any],
    credentials: Any,
    handles: list[dict[str, Any]],
    term: Terminal,
    step: Any,
) -> Any:
    """The run step with Airflow's retry semantics: each try ensures its cluster first."""
    from dagfactory import steps

    timeout = parse_duration(spec.timeout).total_seconds() if spec.timeout else None
    delay = parse_duration(spec.retry_delay).total_seconds()
    for attempt in range(spec.retries + 1):
        try:
            step("run" if attempt == 0 else f"run, retry {attempt} of {spec.retries}")
            handle = steps.ensure_cluster(spec, boot, key, handles[-1], credentials, term.err)
            if handle is not handles[-1]:
                handles.append(handle)
            with time_limit(timeout):
                return steps.run(spec, boot, handle, params, key, credentials, term.err)
        except DagfactoryError as exc:
            if attempt == spec.retries:
                raise
            wait = delay * (2**attempt if spec.retry_exponential_backoff else 1)
            term.err(f"[dagfactory] run failed ({_first_line(exc)}); retrying in {wait:g}s")
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
