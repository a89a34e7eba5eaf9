"""Property: whatever is done to a valid spec, loading it gives a spec or located errors.

Mutations at two levels: of the data (drop a key, change a value's type, add an unknown key)
and of the text (edit characters, lines, bytes). For every result, `load_file` either returns
a spec or raises SpecError whose every problem has a line and column >= 1, and
`dagfactory validate` exits 0 or 1 without a traceback.
"""

from __future__ import annotations

import contextlib
import copy
import io
import random
import signal
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dagfactory import cli
from dagfactory.dag.build import build_dag
from dagfactory.errors import SpecError
from dagfactory.spec.load import load_file
from tests.conftest import ROOT
from tests.test_cli import dagfactory

BASES: list[dict[str, Any]] = [
    {"source": {"git": "https://github.com/acme/jobs.git"}, "entrypoint": "jobs.main:run"},
    {
        "description": "Nightly sales rollup",
        "owner": "data-eng",
        "tags": ["sales", "nightly"],
        "schedule": "0 6 * * 1-5",
        "start_date": "2026-01-01",
        "catchup": False,
        "retries": 2,
        "timeout": "1h30m",
        "source": {
            "git": "ssh://git@github.com/acme/jobs.git",
            "ref": "v1.2.0",
            "subdir": "jobs/sales",
            "requirements": ["pandas>=2", "pyarrow"],
            "connection": "github_jobs",
        },
        "entrypoint": "sales.rollup:main",
        "params": {"day": "{{ ds }}", "regions": ["emea", "apac"], "limits": {"rows": 10}},
        "cluster": {"backend": "local", "workers": 4, "cpu": 2, "memory": "4GiB"},
    },
    {
        "source": {"git": "../examples/wordcount", "requirements": "requirements.txt"},
        "entrypoint": "wordcount.job:main",
        "schedule": "@daily",
        "cluster": {"backend": "existing", "address": "tcp://10.0.0.5:8786"},
    },
]
KNOWN_KEYS = ["source", "git", "ref", "workers", "memory", "schedule", "params", "cluster"]
SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["", "-x", "ext::sh", "..", "/etc", "@daly", "1h", "2GiB", "a.b:c", "0"]),
    st.dates(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=3),
    ),
    max_leaves=8,
)


def _paths(data: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside data (mapping keys and list indexes)."""
    found = []
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for key, value in items:
        found.append((*prefix, key))
        if isinstance(value, (dict, list)):
            found += _paths(value, (*prefix, key))
    return found


def _parent(data: Any, path: tuple) -> Any:
    for part in path[:-1]:
        data = data[part]
    return data


def mutations(
    bases: list[dict[str, Any]], names: st.SearchStrategy, new_values: st.SearchStrategy
) -> st.SearchStrategy:
    """Specs from `bases` with one to three mutations: a key dropped, a value replaced, an
    unknown (or misspelt) key added."""

    @st.composite
    def mutated(draw: st.DrawFn) -> dict[str, Any]:
        data = copy.deepcopy(draw(st.sampled_from(bases)))
        for _ in range(draw(st.integers(min_value=1, max_value=3))):
            paths = _paths(data)
            kind = draw(st.sampled_from(["drop", "replace", "unknown_key"]))
            if kind == "unknown_key" or not paths:
                mappings = [()] + [p for p in paths if isinstance(_get(data, p), dict)]
                target = _get(data, draw(st.sampled_from(mappings)))
                target[draw(names) + draw(st.sampled_from(["", "s", "_", "x"]))] = draw(new_values)
                continue
            path = draw(st.sampled_from(paths))
            parent = _parent(data, path)
            if kind == "drop":
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(new_values)
        return data

    return mutated()


def mutated_data() -> st.SearchStrategy:
    names = st.one_of(st.text(min_size=1, max_size=12), st.sampled_from(KNOWN_KEYS))
    return mutations(BASES, names, values)


def _get(data: Any, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


TEXT_ALPHABET = st.sampled_from(
    [*":-[]{}&*!|>'\"#%@`?,\t\n ", "  ", "\n  ", "- ", ": ", "é", "\x00", "\x1b", "\ufeff"]
)


@st.composite
def mutated_text(draw: st.DrawFn) -> bytes:
    text = yaml.safe_dump(draw(st.sampled_from(BASES)), sort_keys=False)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        lines = text.split("\n")
        kind = draw(st.sampled_from(["insert", "delete", "line_dup", "line_swap", "indent"]))
        if kind == "insert":
            at = draw(st.integers(0, len(text)))
            insert = "".join(draw(st.lists(TEXT_ALPHABET | st.text(max_size=3), max_size=4)))
            text = text[:at] + insert + text[at:]
        elif kind == "delete":
            start = draw(st.integers(0, len(text)))
            text = text[:start] + text[start + draw(st.integers(1, 12)) :]
        elif kind == "line_dup":
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            text = "\n".join(lines)
        elif kind == "line_swap":
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
        else:
            i = draw(st.integers(0, len(lines) - 1))
            lines[i] = draw(st.sampled_from(["", " ", "  ", "\t"])) + lines[i].lstrip(" ")
            text = "\n".join(lines)
    raw = text.encode("utf-8")
    if draw(st.booleans()) and draw(st.booleans()):
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.binary(min_size=1, max_size=3)) + raw[at:]
    return raw


def _check_load(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "p.yml"
        path.write_bytes(raw)
        try:
            spec = load_file(path)
        except SpecError as exc:
            assert exc.problems
            for problem in exc.problems:
                assert problem.line >= 1 and problem.column >= 1, problem
                assert problem.file == str(path) and problem.message
        else:
            assert build_dag(spec).dag_id == spec.dag_id  # what is valid must also build
        _check_cli(path)


def _check_cli(path: Path) -> None:
    """The validate command in this process: an exception here is a traceback for a user."""
    out, err = io.StringIO(), io.StringIO()
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(["validate", str(path)])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert code in (0, 1)
    assert "Traceback" not in out.getvalue() + err.getvalue()
    for line in out.getvalue().splitlines():
        assert line.startswith(f"{path}:") and ": error: " in line, line


@SETTINGS
@given(mutated_data())
def test_mutated_data_loads_or_fails_with_located_errors(data):
    _check_load(yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode("utf-8"))


@SETTINGS
@given(mutated_text())
def test_mutated_text_loads_or_fails_with_located_errors(raw):
    _check_load(raw)


def test_the_command_never_prints_a_traceback_for_a_folder_of_mutants(tmp_path):
    """The same as above through the real entry point, once, over a folder of mutants."""
    rng = random.Random(20260101)
    text = yaml.safe_dump(BASES[1], sort_keys=False)
    for n in range(200):
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(chars))
            if rng.random() < 0.5:
                del chars[at]
            else:
                chars.insert(at, rng.choice(":-[]{}&*!|>'\"#%@`\t\n é\x1b"))
        (tmp_path / f"m{n:03}.yml").write_bytes("".join(chars).encode("utf-8", "replace"))
    out = dagfactory("validate", str(tmp_path), cwd=ROOT)
    assert out.returncode in (0, 1)
    assert "Traceback" not in out.stdout + out.stderr
    for line in out.stdout.splitlines():
        assert line.startswith(str(tmp_path)) and ": error: " in line, line
