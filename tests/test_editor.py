"""The JSON Schema in a real editor: yaml-language-server 1.25 over stdio.

Editors (VS Code's Red Hat YAML extension, Neovim, JetBrains) all use this server, so what it
completes, shows on hover and marks as wrong is what a person writing a pipeline file sees. The
server is a Node package that `./dev setup` installs into `.tools/` when npm exists; without it
these tests skip on a laptop and fail in CI (where `CI` is set and the server is installed).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dagfactory.spec.schema import schema_text
from tests.conftest import ROOT

SERVER = ROOT / ".tools" / "node_modules" / "yaml-language-server" / "bin" / "yaml-language-server"
pytestmark = pytest.mark.e2e

WAIT = 30.0  # seconds; generous for a loaded CI machine, never reached when things work


def _server_command() -> list[str]:
    node = shutil.which("node")
    if node and SERVER.is_file():
        return [node, str(SERVER), "--stdio"]
    why = f"yaml-language-server is not installed at {SERVER} (./dev setup installs it with npm)"
    if os.environ.get("CI"):
        pytest.fail(why)
    pytest.skip(why)


class LanguageServer:
    """A minimal LSP client: Content-Length framing over the server's stdin/stdout."""

    def __init__(self, command: list[str], root: Path) -> None:
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=root,
        )
        self._next_id = 0
        self._responses: dict[int, queue.Queue] = {}
        self._diagnostics: dict[str, queue.Queue] = {}
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, daemon=True)
        self._reader.start()

    # --- wire ---------------------------------------------------------------------------------

    def _send(self, message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        self.proc.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.proc.stdin.flush()

    def _read_message(self) -> dict[str, Any] | None:
        length = None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                return None
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return json.loads(self.proc.stdout.read(length))

    def _read_loop(self) -> None:
        while (message := self._read_message()) is not None:
            if "id" in message and "method" in message:
                # A request from the server (configuration, capability registration).
                result = None
                if message["method"] == "workspace/configuration":
                    result = [self.settings.get("yaml") for _ in message["params"]["items"]]
                self._send({"id": message["id"], "result": result})
            elif "id" in message:
                self._queue(self._responses, message["id"]).put(message)
            elif message.get("method") == "textDocument/publishDiagnostics":
                params = message["params"]
                self._queue(self._diagnostics, params["uri"]).put(params["diagnostics"])

    def _queue(self, table: dict, key: Any) -> queue.Queue:
        with self._lock:
            return table.setdefault(key, queue.Queue())

    def request(self, method: str, params: dict[str, Any]) -> Any:
        self._next_id += 1
        answers = self._queue(self._responses, self._next_id)
        self._send({"id": self._next_id, "method": method, "params": params})
        message = answers.get(timeout=WAIT)
        assert "error" not in message, message
        return message["result"]

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self._send({"method": method, "params": params})

    # --- LSP ----------------------------------------------------------------------------------

    def start(self, root: Path, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.request(
            "initialize",
            {
                "processId": os.getpid(),
                "rootUri": root.as_uri(),
                "capabilities": {
                    "textDocument": {
                        "completion": {"completionItem": {"snippetSupport": True}},
                        "hover": {"contentFormat": ["markdown", "plaintext"]},
                        "publishDiagnostics": {},
                    },
                    "workspace": {"configuration": True},
                },
            },
        )
        self.notify("initialized", {})
        self.notify("workspace/didChangeConfiguration", {"settings": settings})

    def open(self, path: Path, text: str) -> str:
        uri = path.as_uri()
        self.notify(
            "textDocument/didOpen",
            {"textDocument": {"uri": uri, "languageId": "yaml", "version": 1, "text": text}},
        )
        return uri

    def diagnostics(self, uri: str) -> list[dict[str, Any]]:
        """The last diagnostics published for uri once the server has been quiet for a moment.

        The server may publish an empty list first (before the schema is loaded), then the
        real one; reading until a short silence gets the settled result.
        """
        answers = self._queue(self._diagnostics, uri)
        latest = answers.get(timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                latest = answers.get(timeout=1.0)
            except queue.Empty:
                break
        return latest

    def completion(self, uri: str, line: int, character: int) -> list[str]:
        result = self.request(
            "textDocument/completion",
            {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}},
        )
        items = result["items"] if isinstance(result, dict) else result or []
        return [item["label"] for item in items]

    def hover(self, uri: str, line: int, character: int) -> str:
        result = self.request(
            "textDocument/hover",
            {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}},
        )
        if not result:
            return ""
        contents = result["contents"]
        return contents["value"] if isinstance(contents, dict) else str(contents)

    def close(self) -> None:
        try:
            self.request("shutdown", {})
            self.notify("exit", {})
            self.proc.wait(timeout=10)
        except Exception:
            pass
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


SCHEMA_LINE = "# yaml-language-server: $schema=../schemas/pipeline.schema.json\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pipelines repository as `dagfactory new` leaves it: schema beside the pipelines folder."""
    root = tmp_path_factory.mktemp("editor")
    (root / "schemas").mkdir()
    (root / "schemas" / "pipeline.schema.json").write_text(schema_text())
    (root / "pipelines").mkdir()
    return root


@pytest.fixture(scope="module")
def server(workspace: Path):
    """One server for the module (each test opens its own document): starting one takes seconds."""
    ls = LanguageServer(_server_command(), workspace)
    try:
        ls.start(workspace, {"yaml": {"validate": True, "hover": True, "completion": True}})
        yield ls
    finally:
        ls.close()


def _open(server: LanguageServer, workspace: Path, name: str, text: str) -> str:
    path = workspace / "pipelines" / name
    path.write_text(text)
    return server.open(path, text)


def _messages(diagnostics: list[dict[str, Any]]) -> list[tuple[int, str]]:
    return [(d["range"]["start"]["line"], d["message"]) for d in diagnostics]


VALID = SCHEMA_LINE + (
    "source:\n"
    "  git: https://github.com/acme/pipelines.git\n"
    "entrypoint: wordcount.job:main\n"
    "cluster:\n"
    "  workers: 2\n"
)


def test_a_valid_file_has_no_diagnostics(server, workspace):
    uri = _open(server, workspace, "good.yml", VALID)
    assert server.diagnostics(uri) == []


def test_top_level_completion_offers_the_pipeline_keys(server, workspace):
    text = SCHEMA_LINE + "source:\n  git: x\n\n"
    uri = _open(server, workspace, "top.yml", text)
    server.diagnostics(uri)
    labels = server.completion(uri, 3, 0)
    for key in ("entrypoint", "cluster", "schedule", "params"):
        assert key in labels, labels
    empty = _open(server, workspace, "empty.yml", SCHEMA_LINE + "\n")
    server.diagnostics(empty)
    assert {"source", "entrypoint", "cluster"} <= set(server.completion(empty, 1, 0))


def test_completion_under_cluster_offers_its_keys_and_backends(server, workspace):
    text = SCHEMA_LINE + "source:\n  git: x\nentrypoint: a.b:c\ncluster:\n  \n"
    uri = _open(server, workspace, "nested.yml", text)
    server.diagnostics(uri)
    labels = server.completion(uri, 5, 2)
    assert {"workers", "backend", "memory"} <= set(labels), labels
    text = SCHEMA_LINE + "source:\n  git: x\nentrypoint: a.b:c\ncluster:\n  backend: \n"
    uri = _open(server, workspace, "backend.yml", text)
    server.diagnostics(uri)
    assert {"local", "existing"} <= set(server.completion(uri, 5, 11))


def test_hover_shows_the_field_description(server, workspace):
    uri = _open(server, workspace, "hover.yml", VALID)
    server.diagnostics(uri)
    shown = server.hover(uri, 5, 4)
    assert "Number of Dask workers" in shown, shown


def test_diagnostics_name_the_mistakes_in_words(server, workspace):
    text = SCHEMA_LINE + (
        "source:\n"
        "  git: https://github.com/acme/pipelines.git\n"
        "entrypoint: wordcount/job.py\n"  # line 3: pattern
        "cluster:\n"
        "  n_workers: 2\n"  # line 5: unknown key
        "  workers: two\n"  # line 6: wrong type
        "  backend: lcoal\n"  # line 7: not a backend
        "  memory: 2 gigs\n"  # line 8: pattern
        "timeout: soon\n"  # line 9: pattern
    )
    uri = _open(server, workspace, "bad.yml", text)
    found = _messages(server.diagnostics(uri))
    by_line: dict[int, list[str]] = {}
    for line, message in found:
        by_line.setdefault(line, []).append(message)
    assert set(by_line) == {3, 5, 6, 7, 8, 9}, found
    assert any("n_workers" in m and "not allowed" in m for m in by_line[5]), found
    assert any("Incorrect type" in m and "integer" in m for m in by_line[6]), found
    assert any("local" in m and "existing" in m for m in by_line[7]), found
    for line in (3, 8, 9):
        for message in by_line[line]:
            assert "pattern" not in message and "^" not in message, message
    assert any("module:function" in m for m in by_line[3]), found
    assert any("2GiB" in m for m in by_line[8]), found
    assert any("30m" in m for m in by_line[9]), found


def test_the_schema_setting_works_without_the_modeline(workspace):
    """Teams that map the schema in editor settings (yaml.schemas) get the same checks."""
    ls = LanguageServer(_server_command(), workspace)
    try:
        schema = (workspace / "schemas" / "pipeline.schema.json").as_uri()
        ls.start(workspace, {"yaml": {"validate": True, "schemas": {schema: "pipelines/*.yml"}}})
        uri = _open(ls, workspace, "set.yml", VALID.replace(SCHEMA_LINE, "") + "  backend: lcoal\n")
        assert [line for line, _ in _messages(ls.diagnostics(uri))] == [5]
    finally:
        ls.close()


STAGES = SCHEMA_LINE + (
    "source:\n"
    "  git: https://github.com/acme/pipelines.git\n"
    "stages:\n"
    "  prepare:\n"
    "    cluster: {workers: 4, adaptive: {minimum: 1, maximum: 8}}\n"
    "    steps:\n"
    "      - extract: {entrypoint: jobs.extract:main}\n"
    "      - parallel:\n"
    "          - clean: {entrypoint: jobs.clean:main, params: {rows: '{{ steps.extract.rows }}'}}\n"
    "  model:\n"
    "    depends_on: [prepare]\n"
    "    prewarm: true\n"
    "    steps:\n"
    "      - train:\n"
    "          entrypoint: jobs.train:main\n"
    "          \n"
)


def test_stages_are_valid_and_complete_in_the_editor(server, workspace):
    uri = _open(server, workspace, "stages.yml", STAGES)
    assert server.diagnostics(uri) == []
    labels = set(server.completion(uri, 16, 10))  # inside the step 'train'
    assert {"params", "outlets", "timeout", "retries"} <= labels, labels
    text = STAGES.replace("          \n", "") + "  report:\n    \n"
    uri = _open(server, workspace, "stage_keys.yml", text)
    server.diagnostics(uri)
    assert {"steps", "cluster", "depends_on", "prewarm"} <= set(server.completion(uri, 17, 4))


def test_stage_mistakes_are_shown_where_they_are(server, workspace):
    text = (
        STAGES.replace("{workers: 4,", "{workers: 4, adaptiv: 2,")  # line 5
        .replace("entrypoint: jobs.extract:main", "entrypoint: jobs/extract.py")  # line 7
        .replace("prewarm: true", "prewarm: yes please")  # line 12
    )
    uri = _open(server, workspace, "stage_bad.yml", text)
    found = _messages(server.diagnostics(uri))
    lines = {line for line, _ in found}
    assert lines == {5, 7, 12}, found
    assert any("module:function" in m for line, m in found if line == 7), found
